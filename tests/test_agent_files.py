"""File operations of protocol version 2 against the real agent in --stdio mode (no VM).

Most tests go through :class:`AgentChannel`'s helpers (both ends of the protocol at
once); the flow-control and atomicity tests drive the frames by hand. The agent runs
as the test's user on this host, so every path is under the test's tmp_path.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_driver import (  # noqa: F401 (fixtures)
    Agent,
    ChannelAgent,
    agent_binary_fixture,
    agent_fixture,
    spawn_agent,
    vm_rss_kib,
)
from pyro_mcp.errors import InvalidInputError
from pyro_mcp.guest.protocol import (
    MAX_DATA_CHUNK,
    Cancel,
    Credit,
    Data,
    Entries,
    Eof,
    Error,
    FileKind,
    FileStat,
    Grant,
    ListDir,
    ListEnd,
    Ping,
    Pong,
    ReadData,
    ReadEnd,
    ReadFile,
    Stat,
    WriteEnd,
    WriteFile,
    encode,
)

T = 10.0  # seconds the helpers wait for the agent between frames


class Guest(ChannelAgent):
    """The agent with one-call read and write helpers."""

    def read(self, path: Path | bytes, **kw: int) -> tuple[bytes, ReadEnd | Error]:
        out = bytearray()
        raw = path if isinstance(path, bytes) else bytes(path)
        end = self.channel.read_file(ReadFile(raw, **kw), out.extend, T)
        return bytes(out), end

    def write(self, path: Path | bytes, data: bytes, **kw: object) -> WriteEnd | Error:
        raw = path if isinstance(path, bytes) else bytes(path)
        return self.channel.write_file(WriteFile(raw, **kw), [data], T)  # type: ignore[arg-type]


@pytest.fixture
def guest(agent_binary: Path, tmp_path: Path) -> Iterator[Guest]:
    g = Guest(agent_binary, tmp_path / "agent.stderr")
    try:
        yield g
    finally:
        g.close()


def ok(reply: object) -> object:
    assert not isinstance(reply, Error), reply
    return reply


# ------------------------------------------------------------ read and write


@pytest.mark.parametrize("size", [0, 1, 1 << 20])
def test_write_then_read_round_trip(guest: Guest, tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    target = tmp_path / "f.bin"
    end = ok(guest.write(target, data, mode=0o640))
    assert isinstance(end, WriteEnd)
    assert end.bytes_written == size
    assert end.stat.kind == FileKind.FILE and end.stat.size == size and end.stat.mode == 0o640
    assert target.read_bytes() == data
    assert stat.S_IMODE(target.stat().st_mode) == 0o640  # exactly: no umask in between
    got, read_end = guest.read(target)
    assert got == data
    assert isinstance(read_end, ReadEnd)
    assert (read_end.bytes_sent, read_end.truncated, read_end.stat.size) == (size, False, size)


def test_40_mib_streamed_both_ways_with_bounded_agent_memory(guest: Guest, tmp_path: Path) -> None:
    block = os.urandom(1 << 20)
    total = 40
    digest = hashlib.sha256(block * total).hexdigest()
    pid = guest.proc.pid
    baseline = vm_rss_kib(pid)
    peak = [baseline]

    def chunks() -> Iterator[bytes]:
        for _ in range(total):
            peak[0] = max(peak[0], vm_rss_kib(pid))
            yield block

    target = tmp_path / "big.bin"
    started = time.monotonic()
    end = ok(guest.channel.write_file(WriteFile(bytes(target)), chunks(), T))
    wrote = time.monotonic() - started
    assert isinstance(end, WriteEnd) and end.bytes_written == total << 20
    assert hashlib.sha256(target.read_bytes()).hexdigest() == digest

    h = hashlib.sha256()
    seen = [0]

    def sink(data: bytes) -> None:
        h.update(data)
        seen[0] += 1
        if seen[0] % 16 == 0:
            peak[0] = max(peak[0], vm_rss_kib(pid))

    started = time.monotonic()
    read_end = ok(guest.channel.read_file(ReadFile(bytes(target)), sink, T))
    read = time.monotonic() - started
    assert isinstance(read_end, ReadEnd) and read_end.bytes_sent == total << 20
    assert h.hexdigest() == digest
    assert peak[0] - baseline < 2048, (baseline, peak[0])  # frame buffers, no file copies
    print(f"40 MiB: write {wrote:.2f} s, read {read:.2f} s; VmRSS {baseline}->{peak[0]} KiB")


def test_read_offset_max_bytes_and_truncated(guest: Guest, tmp_path: Path) -> None:
    f = tmp_path / "digits"
    f.write_bytes(b"0123456789")
    assert guest.read(f, offset=3, max_bytes=4)[0] == b"3456"
    assert guest.read(f, offset=3, max_bytes=4)[1].truncated  # type: ignore[union-attr]
    data, end = guest.read(f, offset=6, max_bytes=4)
    assert data == b"6789" and isinstance(end, ReadEnd) and not end.truncated
    data, end = guest.read(f, offset=100)  # past the end: nothing, not an error
    assert data == b"" and isinstance(end, ReadEnd) and end.bytes_sent == 0


def test_write_keeps_or_sets_mode_and_owner(guest: Guest, tmp_path: Path) -> None:
    f = tmp_path / "script.sh"
    f.write_bytes(b"old")
    f.chmod(0o700)
    ok(guest.write(f, b"new", mode=0o644))  # keep_mode is the default
    assert f.read_bytes() == b"new" and stat.S_IMODE(f.stat().st_mode) == 0o700
    ok(guest.write(f, b"newer", mode=0o604, keep_mode=False))
    assert stat.S_IMODE(f.stat().st_mode) == 0o604
    if os.geteuid() == 0:
        end = ok(guest.write(tmp_path / "owned", b"x", uid=1234, gid=5678))
        assert isinstance(end, WriteEnd) and (end.stat.uid, end.stat.gid) == (1234, 5678)
        st = (tmp_path / "owned").stat()
        assert (st.st_uid, st.st_gid) == (1234, 5678)


def test_write_makes_parents_only_when_asked(guest: Guest, tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "c.txt"
    end = guest.write(deep, b"x")
    assert isinstance(end, Error) and end.errno_code == errno.ENOENT
    assert not (tmp_path / "a").exists()
    ok(guest.write(deep, b"x", make_parents=True))
    assert deep.read_bytes() == b"x"
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o755


def test_write_replaces_a_symlink_itself_never_its_target(guest: Guest, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    link = tmp_path / "link"
    link.symlink_to(outside)
    ok(guest.write(link, b"replaced", keep_mode=False))
    assert outside.read_bytes() == b"precious"
    assert not link.is_symlink() and link.read_bytes() == b"replaced"


def test_write_is_atomic_and_leaves_no_temporary_file(agent: Agent, tmp_path: Path) -> None:
    target = tmp_path / "config"
    target.write_bytes(b"old contents")
    agent.send(1, WriteFile(bytes(target)))
    assert agent.next_frame() == (1, Credit(1 << 20))
    agent.send(1, Data(b"new "))
    agent.send(2, Ping())
    assert agent.next_frame() == (2, Pong())  # the DATA was handled
    assert target.read_bytes() == b"old contents"  # nothing of the new file is visible
    temps = [p for p in tmp_path.iterdir() if p.name.startswith(".pyro-write-")]
    assert len(temps) == 1 and temps[0].read_bytes() == b"new "
    agent.send(1, Data(b"contents"))
    agent.send(1, Eof())
    rid, end = agent.next_frame()
    assert rid == 1 and isinstance(end, WriteEnd) and end.bytes_written == 12
    assert target.read_bytes() == b"new contents"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.stderr", "config"]


def test_cancelled_write_leaves_the_old_file(agent: Agent, tmp_path: Path) -> None:
    target = tmp_path / "keep"
    target.write_bytes(b"keep me")
    agent.send(1, WriteFile(bytes(target)))
    assert agent.next_frame() == (1, Credit(1 << 20))
    agent.send(1, Data(b"half"))
    agent.send(1, Cancel())
    assert agent.next_frame() == (1, Error(errno.ECANCELED, "cancelled"))
    assert target.read_bytes() == b"keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.stderr", "keep"]


def test_malformed_data_abandons_the_write(agent: Agent, tmp_path: Path) -> None:
    """(A write cannot be pushed past its credit from here: the agent writes each DATA
    at once and hands the credit straight back. A malformed DATA shows the same path.)"""
    agent.send(1, WriteFile(bytes(tmp_path / "x")))
    assert agent.next_frame() == (1, Credit(1 << 20))
    big = b"z" * (MAX_DATA_CHUNK + 1)  # over the DATA limit: hand-made, the codec refuses it
    payload = len(big).to_bytes(4, "big") + big
    agent.send_raw(
        b"PY\x01\x15" + (1).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + payload
    )
    assert agent.next_frame() == (1, Error(errno.EPROTO, "malformed stream frame (type 21)"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.stderr"]


# ------------------------------------------------------------------ errors


def test_errors_name_the_path_and_errno(guest: Guest, tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    _, end = guest.read(missing)
    assert end == Error(errno.ENOENT, f"open {missing}: No such file or directory")
    _, end = guest.read(tmp_path)
    assert isinstance(end, Error) and end.errno_code == errno.EISDIR
    a_file = tmp_path / "file"
    a_file.write_bytes(b"")
    end2 = guest.write(a_file / "child", b"x")
    assert isinstance(end2, Error) and end2.errno_code == errno.ENOTDIR
    end2 = guest.write(tmp_path, b"x")
    assert isinstance(end2, Error) and end2.errno_code == errno.EISDIR
    end2 = guest.write(bytes(tmp_path) + b"/newdir/", b"x")
    assert isinstance(end2, Error) and end2.errno_code == errno.EISDIR
    assert isinstance(guest.channel.stat(bytes(missing), T), Error)
    entries, lend = guest.channel.list_dir(ListDir(bytes(a_file)), T)
    assert entries == [] and isinstance(lend, Error) and lend.errno_code == errno.ENOTDIR


def test_a_fifo_is_refused_without_hanging(guest: Guest, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    _, end = guest.read(fifo)
    assert isinstance(end, Error) and end.errno_code == errno.EINVAL
    assert time.monotonic() - started < 2


def test_paths_with_nul_never_leave_the_host() -> None:
    with pytest.raises(InvalidInputError, match="NUL"):
        encode(1, ReadFile(b"/etc/passwd\x00.txt"))
    with pytest.raises(InvalidInputError, match="NUL"):
        encode(1, WriteFile(b"/tmp/a\x00b"))


def test_malformed_file_requests_get_eproto(agent: Agent) -> None:
    # a READ_FILE whose path holds a NUL (hand-made: the host codec refuses to encode it)
    path = b"/a\x00b"
    payload = len(path).to_bytes(4, "big") + path + b"\x00" * 20
    agent.send_raw(
        b"PY\x01\x18" + (7).to_bytes(4, "big") + len(payload).to_bytes(4, "big") + payload
    )
    rid, msg = agent.next_frame()
    assert rid == 7 and msg == Error(errno.EPROTO, "malformed READ_FILE payload")


# ------------------------------------------------------------ stat and list


def test_stat_describes_symlinks_without_following_them(guest: Guest, tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"12345")
    f.chmod(0o4751)
    os.utime(f, ns=(1, 1_700_000_000_123_456_789))
    st = ok(guest.channel.stat(bytes(f), T))
    assert st == FileStat(
        FileKind.FILE, 0o4751, os.getuid(), os.getgid(), 5, 1_700_000_000_123_456_789
    )
    link = tmp_path / "link"
    link.symlink_to("/etc/passwd")
    st = ok(guest.channel.stat(bytes(link), T))
    assert isinstance(st, FileStat)
    assert (st.kind, st.link_target, st.size) == (FileKind.SYMLINK, b"/etc/passwd", 11)
    st = ok(guest.channel.stat(bytes(tmp_path), T))
    assert isinstance(st, FileStat) and st.kind == FileKind.DIR


def make_tree(root: Path) -> None:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"a")
    (root / "sub" / "b.bin").write_bytes(b"bb")
    (root / "sub" / "deeper" / "c").write_bytes(b"ccc")
    (root / "linkdir").symlink_to(root / "sub")  # listed, never descended
    (root / "dangling").symlink_to("nowhere")
    os.mkfifo(root / "fifo")
    with open(os.fsencode(root) + b"/\xff\xfe-not-utf8", "wb") as f:
        f.write(b"raw")


def test_list_flat_and_recursive(guest: Guest, tmp_path: Path) -> None:
    root = tmp_path / "tree"
    root.mkdir()
    make_tree(root)
    entries, end = guest.channel.list_dir(ListDir(bytes(root)), T)
    assert isinstance(end, ListEnd) and not end.truncated and end.count == len(entries)
    by_name = {e.name: e.stat for e in entries}
    assert set(by_name) == {
        b"a.txt",
        b"sub",
        b"linkdir",
        b"dangling",
        b"fifo",
        b"\xff\xfe-not-utf8",
    }
    assert by_name[b"a.txt"].kind == FileKind.FILE and by_name[b"a.txt"].size == 1
    assert by_name[b"sub"].kind == FileKind.DIR
    assert by_name[b"linkdir"].kind == FileKind.SYMLINK
    assert by_name[b"linkdir"].link_target == bytes(root / "sub")
    assert by_name[b"dangling"].link_target == b"nowhere"
    assert by_name[b"fifo"].kind == FileKind.FIFO

    entries, end = guest.channel.list_dir(ListDir(bytes(root), recursive=True), T)
    names = sorted(e.name for e in entries)
    assert names == sorted(
        [
            b"a.txt",
            b"sub",
            b"sub/b.bin",
            b"sub/deeper",
            b"sub/deeper/c",
            b"linkdir",
            b"dangling",
            b"fifo",
            b"\xff\xfe-not-utf8",
        ]
    )
    assert isinstance(end, ListEnd) and end.count == 9


def test_list_stops_at_max_entries(guest: Guest, tmp_path: Path) -> None:
    for i in range(50):
        (tmp_path / f"f{i:02}").write_bytes(b"")
    entries, end = guest.channel.list_dir(ListDir(bytes(tmp_path), max_entries=10), T)
    assert len(entries) == 10 and end == ListEnd(10, True)
    entries, end = guest.channel.list_dir(ListDir(bytes(tmp_path), max_entries=51), T)
    assert len(entries) == 51 and end == ListEnd(51, False)  # 50 files + agent.stderr


def test_list_of_many_entries_spans_frames_and_grants(guest: Guest, tmp_path: Path) -> None:
    root = tmp_path / "many"
    root.mkdir()
    for i in range(3000):
        (root / (f"{i:05}-" + "n" * 80)).write_bytes(b"")
    entries, end = guest.channel.list_dir(ListDir(bytes(root), max_entries=5000, window=65536), T)
    assert isinstance(end, ListEnd) and end.count == 3000 and not end.truncated
    assert len({e.name for e in entries}) == 3000


# ------------------------------------------------------------- flow control


def test_a_host_that_stops_granting_stops_the_read(agent: Agent, tmp_path: Path) -> None:
    f = tmp_path / "big"
    data = os.urandom(1 << 20)
    f.write_bytes(data)
    agent.send(1, ReadFile(bytes(f), window=100_000))
    got = b""
    while len(got) < 100_000:
        rid, msg = agent.next_frame()
        assert rid == 1 and isinstance(msg, ReadData)
        got += msg.data
    assert len(got) == 100_000  # exactly the window, not a byte more
    agent.send(2, Ping())
    assert agent.next_frame() == (2, Pong())  # the agent still answers
    with pytest.raises(AssertionError, match="timed out"):
        agent.next_frame(0.5)  # and sends nothing more for the read
    agent.send(1, Grant(len(data)))
    while True:
        rid, msg = agent.next_frame()
        if isinstance(msg, ReadEnd):
            break
        assert isinstance(msg, ReadData)
        got += msg.data
    assert got == data and msg.bytes_sent == len(data)


def test_a_host_that_stops_granting_stops_the_listing(agent: Agent, tmp_path: Path) -> None:
    for i in range(2000):
        (tmp_path / f"{i:04}-{'n' * 60}").write_bytes(b"")
    agent.send(1, ListDir(bytes(tmp_path), max_entries=5000, window=70_000))
    time.sleep(0.3)  # let the agent use up its credit
    agent.send(2, Ping())
    got, size = 0, 0
    while True:
        rid, msg = agent.next_frame()
        if (rid, msg) == (2, Pong()):
            break  # the agent still answers
        assert rid == 1 and isinstance(msg, Entries)
        got += len(msg.entries)
        size += len(encode(1, msg)) - 12
    assert 0 < got < 2001 and size <= 70_000  # within the window, not a byte more
    with pytest.raises(AssertionError, match="timed out"):
        agent.next_frame(0.5)  # the next frame would pass the credit: nothing comes
    agent.send(1, Grant(1 << 24))
    while True:
        rid, msg = agent.next_frame()
        if isinstance(msg, ListEnd):
            break
        assert isinstance(msg, Entries)
        got += len(msg.entries)
    assert got == msg.count == 2001  # and agent.stderr


def test_cancelled_read_ends_with_ecanceled(agent: Agent, tmp_path: Path) -> None:
    f = tmp_path / "big"
    f.write_bytes(b"x" * 300_000)
    agent.send(1, ReadFile(bytes(f), window=1000))
    rid, msg = agent.next_frame()
    assert rid == 1 and isinstance(msg, ReadData) and len(msg.data) == 1000
    agent.send(1, Cancel())
    assert agent.next_frame() == (1, Error(errno.ECANCELED, "cancelled"))
    agent.send(1, Grant(1 << 20))  # for a request that is over: dropped
    agent.send(2, Ping())
    assert agent.next_frame() == (2, Pong())


def test_concurrent_reads_and_an_exec_share_the_loop(guest: Guest, tmp_path: Path) -> None:
    files = []
    for i in range(4):
        f = tmp_path / f"f{i}"
        f.write_bytes(os.urandom(3 << 20))
        files.append(f)
    results: dict[int, bytes] = {}

    def read(i: int) -> None:
        results[i] = guest.read(files[i])[0]

    threads = [threading.Thread(target=read, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    reply = guest.channel.call(Stat(bytes(tmp_path)), T)  # answered while reads stream
    for t in threads:
        t.join(30)
    assert not isinstance(reply, Error)
    assert all(results[i] == files[i].read_bytes() for i in range(4))


def test_request_ids_are_shared_with_execs(agent: Agent, tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 10)
    agent.send(5, ReadFile(bytes(f), window=1))
    agent.send(5, ReadFile(bytes(f)))
    frames = [agent.next_frame(), agent.next_frame()]
    assert (5, Error(errno.EEXIST, "request id 5 is already running")) in frames
