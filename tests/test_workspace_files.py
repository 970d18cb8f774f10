"""pyro_mcp.workspace.files against the real guest agent in --stdio mode (no VM, no mocks).

The agent runs as the test's user on this host, so every guest path is under tmp_path.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_driver import (  # noqa: F401 (fixtures)
    ChannelAgent,
    agent_binary_fixture,
    channel_agent_fixture,
    spawn_agent,
    vm_rss_kib,
)
from pyro_mcp import limits
from pyro_mcp.errors import (
    GuestProtocolError,
    InvalidInputError,
    LimitError,
    NotFoundError,
    PyroError,
)
from pyro_mcp.guest.channel import AgentChannel
from pyro_mcp.guest.protocol import Error, ReadEnd, ReadFile
from pyro_mcp.workspace import files
from pyro_mcp.workspace.files import (
    decode_content,
    edit_file,
    guest_path,
    list_files,
    read_file,
    stream_file,
    write_file,
)

T = 10.0


@pytest.fixture
def ch(channel_agent: ChannelAgent) -> AgentChannel:
    return channel_agent.channel


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A folder for the test's files (tmp_path also holds the agent's stderr)."""
    d = tmp_path / "ws"
    d.mkdir()
    return d


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def collect(ch: AgentChannel, path: Path) -> bytes:
    out = bytearray()
    stream_file(ch, str(path), out.extend, timeout=T)
    return bytes(out)


# ------------------------------------------------------------------ paths


def test_guest_path_joins_normalises_and_refuses() -> None:
    assert guest_path("src/main.py") == "/workspace/src/main.py"
    assert guest_path("./a//b/") == "/workspace/a/b"
    assert guest_path("../etc/hosts") == "/etc/hosts"  # form only, not a confinement
    assert guest_path("x", base="/srv") == "/srv/x"
    assert guest_path("//etc///hosts") == "/etc/hosts"
    assert guest_path("/") == "/"
    assert guest_path(".") == "/workspace"
    assert guest_path("/" + "é" * 2047 + "a") == "/" + "é" * 2047 + "a"  # 4096 bytes
    for bad, word in [
        ("", "non-empty"),
        (None, "non-empty"),
        (b"/etc", "non-empty"),
        ("a\x00b", "NUL"),
        ("a" * 4097, "4097 bytes"),
        ("é" * 2049, "4098 bytes"),
        ("\udcff", "surrogate"),
    ]:
        with pytest.raises(InvalidInputError, match=word) as info:
            guest_path(bad)  # type: ignore[arg-type]
        assert info.value.hint
    with pytest.raises(InvalidInputError, match="once joined"):
        guest_path("a" * 4090)
    with pytest.raises(InvalidInputError, match="not absolute"):
        guest_path("x", base="rel")


def test_operations_refuse_relative_and_nul_paths_before_the_guest(
    ch: AgentChannel, root: Path
) -> None:
    with pytest.raises(InvalidInputError, match="not absolute") as info:
        read_file(ch, "src/main.py")
    assert "guest_path" in (info.value.hint or "")
    with pytest.raises(InvalidInputError, match="NUL"):
        write_file(ch, f"{root}/a\x00b", b"x")
    with pytest.raises(InvalidInputError, match="NUL"):
        edit_file(ch, f"{root}/a\x00b", "a", "b")
    with pytest.raises(InvalidInputError, match="NUL"):
        list_files(ch, f"{root}\x00")
    assert names(root) == []


# ----------------------------------------------------------- write and read


@pytest.mark.parametrize("size", [0, 1, 1 << 20])
def test_round_trip_is_byte_exact(ch: AgentChannel, root: Path, size: int) -> None:
    data = os.urandom(size)
    target = root / "f.bin"
    res = write_file(ch, str(target), data, timeout=T)
    assert (res.path, res.bytes_written, res.size, res.mode) == (str(target), size, size, "0644")
    assert res.mtime.endswith("+00:00") and res.mtime[:4].isdigit()
    assert target.read_bytes() == data
    assert collect(ch, target) == data
    got = read_file(ch, str(target), max_bytes=2 << 20)
    assert (got.size, got.bytes_read, got.offset, got.truncated) == (size, size, 0, False)
    if size == 0:
        assert (got.encoding, got.content) == ("utf-8", "")
    else:
        raw = base64.b64decode(got.content) if got.encoding == "base64" else got.content.encode()
        assert raw == data
    if size == 1 << 20:
        assert got.encoding == "base64"


def test_50_mib_from_a_generator_with_bounded_host_memory(
    channel_agent: ChannelAgent, root: Path
) -> None:
    block = os.urandom(1 << 20)
    total = 50
    want = hashlib.sha256()
    for _ in range(total):
        want.update(block)
    me = os.getpid()
    baseline = vm_rss_kib(me)
    peak = [baseline]

    def chunks() -> Iterator[bytes]:
        for _ in range(total):
            peak[0] = max(peak[0], vm_rss_kib(me))
            yield block

    target = root / "big.bin"
    res = write_file(channel_agent.channel, str(target), chunks(), mode=0o600, timeout=T)
    assert res.bytes_written == res.size == total << 20 and res.mode == "0600"

    got = hashlib.sha256()
    calls = [0]

    def sink(data: bytes) -> None:
        got.update(data)
        calls[0] += 1
        if calls[0] % 32 == 0:
            peak[0] = max(peak[0], vm_rss_kib(me))

    s = stream_file(channel_agent.channel, str(target), sink, timeout=T)
    assert (s.bytes_read, s.size, s.truncated, s.mode) == (total << 20, total << 20, False, "0600")
    assert got.hexdigest() == want.hexdigest()
    assert peak[0] - baseline < 16 << 10, (baseline, peak[0])  # KiB: nowhere near 50 MiB
    with target.open("rb") as f:
        on_disk = hashlib.file_digest(f, "sha256").hexdigest()
    assert on_disk == want.hexdigest()


def test_stream_file_offset_and_max_bytes(ch: AgentChannel, root: Path) -> None:
    f = root / "digits"
    f.write_bytes(b"0123456789")
    out = bytearray()
    s = stream_file(ch, str(f), out.extend, offset=2, max_bytes=5, timeout=T)
    assert out == b"23456" and s.truncated and s.bytes_read == 5 and s.offset == 2


def test_modes_kept_set_and_validated(ch: AgentChannel, root: Path) -> None:
    f = root / "run.sh"
    f.write_bytes(b"old")
    f.chmod(0o755)
    assert write_file(ch, str(f), b"new").mode == "0755"  # None keeps the mode
    assert f.read_bytes() == b"new" and stat.S_IMODE(f.stat().st_mode) == 0o755
    assert write_file(ch, str(f), b"newer", mode=0o640).mode == "0640"
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert write_file(ch, str(root / "s"), b"", mode=0o4711).mode == "4711"  # exactly, no umask
    for bad in (-1, 0o10000, True, "0644"):
        with pytest.raises(InvalidInputError, match="mode"):
            write_file(ch, str(root / "bad"), b"x", mode=bad)  # type: ignore[arg-type]
    assert not (root / "bad").exists()


def test_parents_are_created(ch: AgentChannel, root: Path) -> None:
    deep = root / "a" / "b" / "c" / "d.txt"
    write_file(ch, str(deep), [b"he", bytearray(b"ll"), memoryview(b"o")])  # type: ignore[list-item]
    assert deep.read_bytes() == b"hello"
    assert stat.S_IMODE((root / "a" / "b").stat().st_mode) == 0o755


def test_write_refuses_text_and_non_bytes_chunks(ch: AgentChannel, root: Path) -> None:
    with pytest.raises(InvalidInputError, match="str"):
        write_file(ch, str(root / "t"), "text")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="yielded a str"):
        write_file(ch, str(root / "t"), [b"ok", "text"])  # type: ignore[list-item]
    with pytest.raises(InvalidInputError, match="iterable"):
        write_file(ch, str(root / "t"), 5)  # type: ignore[arg-type]
    assert names(root) == []


def test_a_failing_source_leaves_the_old_file_and_frees_the_agent(
    ch: AgentChannel, root: Path
) -> None:
    f = root / "keep.txt"
    f.write_bytes(b"precious")

    def broken() -> Iterator[bytes]:
        yield b"x" * 100_000
        raise RuntimeError("source failed")

    for _ in range(20):  # more than the agent's 16 file operations: each was cancelled
        with pytest.raises(RuntimeError, match="source failed"):
            write_file(ch, str(f), broken(), timeout=T)
    assert f.read_bytes() == b"precious"
    assert names(root) == ["keep.txt"]  # no .pyro-write-*.tmp left
    assert write_file(ch, str(f), b"after").bytes_written == 5


def test_a_failing_sink_cancels_the_read(ch: AgentChannel, root: Path) -> None:
    f = root / "big"
    f.write_bytes(os.urandom(3 << 20))

    def sink(data: bytes) -> None:
        raise BrokenPipeError("stdout closed")

    for _ in range(20):
        with pytest.raises(BrokenPipeError):
            stream_file(ch, str(f), sink, timeout=T)
    assert collect(ch, f) == f.read_bytes()


def test_decode_content() -> None:
    assert decode_content("héllo", "utf-8") == "héllo".encode()
    assert decode_content(base64.b64encode(b"\x00\xff").decode(), "base64") == b"\x00\xff"
    assert decode_content("", "base64") == b""
    for bad in ("AAA", "AA==\n", "A?==", "é"):
        with pytest.raises(InvalidInputError, match="not valid base64") as info:
            decode_content(bad, "base64")
        assert "standard base64" in (info.value.hint or "")
    with pytest.raises(InvalidInputError, match="surrogate"):
        decode_content("\udcff", "utf-8")
    with pytest.raises(InvalidInputError, match="'utf-8' or 'base64'"):
        decode_content("x", "latin-1")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="string"):
        decode_content(b"x", "utf-8")  # type: ignore[arg-type]


# -------------------------------------------------------------------- read


def test_read_text_base64_truncated_and_past_the_end(ch: AgentChannel, root: Path) -> None:
    t = root / "t.txt"
    t.write_text("hello\nworld\n")
    r = read_file(ch, str(t))
    assert (r.encoding, r.content, r.truncated, r.size, r.bytes_read) == (
        "utf-8",
        "hello\nworld\n",
        False,
        12,
        12,
    )
    assert r.start_line is None and r.total_lines is None and not r.line_numbers
    r = read_file(ch, str(t), offset=6, max_bytes=3)
    assert (r.content, r.offset, r.bytes_read, r.truncated) == ("wor", 6, 3, True)
    r = read_file(ch, str(t), offset=100)
    assert (r.content, r.bytes_read, r.truncated, r.size, r.encoding) == ("", 0, False, 12, "utf-8")
    b = root / "b.bin"
    b.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    r = read_file(ch, str(b))
    assert r.encoding == "base64" and base64.b64decode(r.content) == b.read_bytes()
    big = root / "big.txt"
    big.write_bytes(b"a" * (300 << 10))
    r = read_file(ch, str(big))  # the default cap
    assert r.bytes_read == limits.DEFAULT_READ_BYTES and r.truncated and r.size == 300 << 10


def test_read_caps_max_bytes_and_points_to_streaming(ch: AgentChannel, root: Path) -> None:
    with pytest.raises(InvalidInputError, match="at most 16777216") as info:
        read_file(ch, str(root / "x"), max_bytes=(16 << 20) + 1)
    assert "stream_file" in (info.value.hint or "")
    for kw in ({"max_bytes": 0}, {"offset": -1}, {"timeout": 0}, {"line_numbers": 1}):
        with pytest.raises(InvalidInputError):
            read_file(ch, str(root / "x"), **kw)  # type: ignore[arg-type]


def test_a_character_cut_by_max_bytes_stays_text(ch: AgentChannel, root: Path) -> None:
    f = root / "u.txt"
    f.write_text("aé€😀" * 100)  # 1 + 2 + 3 + 4 bytes a round
    for n in range(1, 12):
        r = read_file(ch, str(f), max_bytes=n)
        assert r.encoding == "utf-8" and r.truncated, n
        assert f.read_bytes().startswith(r.content.encode()) and r.bytes_read <= n
        assert n - r.bytes_read <= 3
    r = read_file(ch, str(f), offset=2, max_bytes=8)  # starts inside 'é'
    assert r.encoding == "utf-8" and r.offset == 3 and r.content.startswith("€")
    bad = root / "bad.txt"
    bad.write_bytes(b"ok\xe2\x82")  # the file itself ends mid-character: not text
    assert read_file(ch, str(bad)).encoding == "base64"


def test_line_ranges_and_numbered_view(ch: AgentChannel, root: Path) -> None:
    f = root / "lines.txt"
    f.write_text("".join(f"line {i}\n" for i in range(1, 11)))
    r = read_file(ch, str(f), start_line=3, end_line=5)
    assert r.content == "line 3\nline 4\nline 5\n"
    assert (r.start_line, r.end_line, r.offset, r.truncated) == (3, 5, 14, False)
    assert r.bytes_read == 21
    r = read_file(ch, str(f), start_line=9)
    assert (r.content, r.end_line, r.total_lines) == ("line 9\nline 10\n", 10, 10)
    r = read_file(ch, str(f), start_line=12)
    assert (r.content, r.end_line, r.total_lines) == ("", None, 10)
    r = read_file(ch, str(f), end_line=2, line_numbers=True)
    assert r.content == "     1\tline 1\n     2\tline 2\n" and r.line_numbers and r.start_line == 1
    r = read_file(ch, str(f), start_line=10, line_numbers=True)
    assert r.content == "    10\tline 10\n"
    r = read_file(ch, str(f), start_line=2, max_bytes=20)  # whole lines while they fit
    assert (r.content, r.end_line, r.truncated) == ("line 2\nline 3\n", 3, True)
    r = read_file(ch, str(f), start_line=2, max_bytes=4)  # a first line longer than the cap
    assert (r.content, r.end_line, r.truncated) == ("line", 2, True)
    odd = root / "odd.txt"
    odd.write_bytes(b"a\rb\x0cc\n\xe2\x80\xa8d")  # only '\n' ends a line; no final newline
    r = read_file(ch, str(odd), line_numbers=True)
    assert r.content == "     1\ta\rb\x0cc\n     2\t\u2028d" and r.total_lines == 2
    b = root / "b.bin"
    b.write_bytes(b"\xff\n\xfe\n")
    r = read_file(ch, str(b), start_line=2, line_numbers=True)
    assert (r.encoding, r.content, r.line_numbers) == ("base64", "/go=", False)
    with pytest.raises(InvalidInputError, match="offset cannot"):
        read_file(ch, str(f), offset=3, start_line=1)
    with pytest.raises(InvalidInputError, match="before start_line"):
        read_file(ch, str(f), start_line=5, end_line=4)
    with pytest.raises(InvalidInputError, match="start_line"):
        read_file(ch, str(f), start_line=0)


def test_lines_beyond_the_first_scan_chunk(ch: AgentChannel, root: Path) -> None:
    f = root / "long.txt"
    f.write_text("".join(f"{i:07d}\n" for i in range(1, 300_001)))  # 2.4 MB, 3 chunks
    r = read_file(ch, str(f), start_line=200_000, end_line=200_001)
    assert r.content == "0200000\n0200001\n" and r.offset == 199_999 * 8
    r = read_file(ch, str(f), start_line=299_999)
    assert r.total_lines == 300_000 and r.end_line == 300_000


# -------------------------------------------------------------------- edit


def test_edit_unique_keeps_mode_and_diffs(ch: AgentChannel, root: Path) -> None:
    f = root / "app.py"
    f.write_text("".join(f"x{i} = {i}\n" for i in range(20)))
    f.chmod(0o751)
    r = edit_file(ch, str(f), "x10 = 10\n", "x10 = 'ten'\n", timeout=T)
    assert r.replacements == 1 and not r.diff_truncated
    assert "x10 = 'ten'" in f.read_text() and r.size == f.stat().st_size
    assert r.mode == "0751" and stat.S_IMODE(f.stat().st_mode) == 0o751
    assert r.diff.splitlines()[:3] == [f"--- a{f}", f"+++ b{f}", "@@ -8,7 +8,7 @@"]
    assert "-x10 = 10\n+x10 = 'ten'\n" in r.diff
    assert names(root) == ["app.py"]


def test_edit_not_found_ambiguous_and_replace_all(ch: AgentChannel, root: Path) -> None:
    f = root / "a.txt"
    f.write_text("foo bar\nfoo baz\nfoo\n")
    with pytest.raises(InvalidInputError, match="not found") as info:
        edit_file(ch, str(f), "qux", "x")
    assert info.value.details["matches"] == 0
    with pytest.raises(InvalidInputError, match="found 3 times") as info:
        edit_file(ch, str(f), "foo", "FOO")
    assert "replace_all" in (info.value.hint or "")
    assert f.read_text() == "foo bar\nfoo baz\nfoo\n"
    r = edit_file(ch, str(f), "foo", "FOO", replace_all=True)
    assert r.replacements == 3 and f.read_text() == "FOO bar\nFOO baz\nFOO\n"
    with pytest.raises(InvalidInputError, match="empty"):
        edit_file(ch, str(f), "", "x")
    r = edit_file(ch, str(f), "FOO bar", "FOO bar")  # no change: no write, no diff
    assert (r.replacements, r.diff) == (1, "")


def test_edit_hints_at_near_misses(ch: AgentChannel, root: Path) -> None:
    crlf = root / "crlf.txt"
    crlf.write_bytes(b"one\r\ntwo\r\n")
    with pytest.raises(InvalidInputError, match="not found") as info:
        edit_file(ch, str(crlf), "one\ntwo", "x")
    assert "CRLF" in (info.value.hint or "")
    ws = root / "ws.py"
    ws.write_text("def f():\n\treturn 1\n")
    with pytest.raises(InvalidInputError) as info:
        edit_file(ch, str(ws), "def f():\n    return 1", "x")
    assert "whitespace" in (info.value.hint or "")
    with pytest.raises(InvalidInputError) as info:
        edit_file(ch, str(ws), "     1\tdef f():\n     2\t\treturn 1", "x")
    assert "line-number" in (info.value.hint or "")
    with pytest.raises(InvalidInputError) as info:
        edit_file(ch, str(ws), "nothing like it", "x")
    assert "exactly" in (info.value.hint or "")


def test_edit_refuses_binary_big_links_and_folders(ch: AgentChannel, root: Path) -> None:
    b = root / "b.bin"
    b.write_bytes(b"abc\xff\xfeabc")
    with pytest.raises(InvalidInputError, match="not UTF-8 text"):
        edit_file(ch, str(b), "abc", "x")
    big = root / "big.txt"
    with big.open("wb") as out:
        out.truncate(files.MAX_EDIT_BYTES + 1)
    with pytest.raises(LimitError, match="up to 8388608 bytes"):
        edit_file(ch, str(big), "a", "b")
    many = root / "many.txt"
    many.write_text("a" * 1000)
    with pytest.raises(LimitError, match="would make"):
        edit_file(ch, str(many), "a", "b" * 20_000, replace_all=True)
    assert many.read_text() == "a" * 1000
    many.unlink()
    link = root / "link"
    link.symlink_to("b.bin")
    with pytest.raises(InvalidInputError, match="symbolic link") as info:
        edit_file(ch, str(link), "abc", "x")
    assert str(b) in (info.value.hint or "")
    with pytest.raises(InvalidInputError, match="is a directory"):
        edit_file(ch, str(root), "a", "b")
    os.mkfifo(root / "fifo")
    with pytest.raises(InvalidInputError, match="not a regular file"):
        edit_file(ch, str(root / "fifo"), "a", "b")
    with pytest.raises(NotFoundError, match="no such file"):
        edit_file(ch, str(root / "missing"), "a", "b")
    assert b.read_bytes() == b"abc\xff\xfeabc" and link.is_symlink()
    assert names(root) == ["b.bin", "big.txt", "fifo", "link"]


class RacingChannel(AgentChannel):
    """The real channel, plus another writer that changes the file right after a read."""

    change: tuple[Path, bytes, int | None] | None = None

    def read_file(self, request: ReadFile, sink, timeout):  # type: ignore[no-untyped-def]
        end = super().read_file(request, sink, timeout)
        if self.change is not None:
            path, data, mtime_ns = self.change
            path.write_bytes(data)
            if mtime_ns is not None:
                os.utime(path, ns=(mtime_ns, mtime_ns))
        return end


@pytest.mark.parametrize("same_size", [False, True])
def test_edit_refuses_a_concurrent_change(
    agent_binary: Path, tmp_path: Path, root: Path, same_size: bool
) -> None:
    g = ChannelAgent(agent_binary, tmp_path / "agent.stderr", RacingChannel)
    try:
        f = root / "shared.txt"
        f.write_text("alpha\n")
        os.utime(f, ns=(1_000_000_000, 1_000_000_000))
        theirs = b"ALPHA\n" if same_size else b"alpha\nbeta\n"
        g.channel.change = (f, theirs, 2_000_000_000 if same_size else None)  # type: ignore[attr-defined]
        with pytest.raises(InvalidInputError, match="changed while") as info:
            edit_file(g.channel, str(f), "alpha", "gamma", timeout=T)
        assert "read it again" in (info.value.hint or "")
        assert f.read_bytes() == theirs  # their change is not lost
    finally:
        g.close()


def test_edit_diff_is_capped(ch: AgentChannel, root: Path) -> None:
    f = root / "many.txt"
    f.write_text("x\n" * 200)
    r = edit_file(ch, str(f), "x", "y", replace_all=True)
    assert r.replacements == 200 and r.diff_truncated
    assert len(r.diff.splitlines()) <= files.DIFF_MAX_LINES
    assert len(r.diff.encode()) <= files.DIFF_MAX_BYTES
    assert f.read_text() == "y\n" * 200
    g = root / "nonl.txt"
    g.write_text("a\nb")
    r = edit_file(ch, str(g), "b", "c")
    assert "\\ No newline at end of file" in r.diff and g.read_text() == "a\nc"


# -------------------------------------------------------------------- list


def test_list_plain_and_recursive(ch: AgentChannel, root: Path) -> None:
    (root / "b.txt").write_bytes(b"12345")
    (root / "b.txt").chmod(0o640)
    (root / "a").mkdir()
    (root / "a" / "inner.py").write_text("x")
    (root / "a" / "deeper").mkdir()
    (root / "a-b").write_text("")
    (root / "ln").symlink_to("a/inner.py")
    os.mkfifo(root / "pipe")
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(root / "sock"))
        flat = list_files(ch, str(root), timeout=T)
    finally:
        s.close()
    assert (flat.path, flat.recursive, flat.truncated, flat.count) == (str(root), False, False, 6)
    by = {e.path: e for e in flat.entries}
    assert [e.path for e in flat.entries] == ["a", "a-b", "b.txt", "ln", "pipe", "sock"]
    assert (by["a"].type, by["b.txt"].type, by["ln"].type) == ("directory", "file", "symlink")
    assert (by["pipe"].type, by["sock"].type) == ("fifo", "socket")
    assert (by["b.txt"].size, by["b.txt"].mode) == (5, "0640")
    assert by["ln"].link_target == "a/inner.py" and by["b.txt"].link_target is None
    assert by["b.txt"].mtime.endswith("+00:00") and by["b.txt"].path_base64 is None
    rec = list_files(ch, str(root), recursive=True)
    paths = [e.path for e in rec.entries]
    assert paths[:4] == ["a", "a/deeper", "a/inner.py", "a-b"]  # a folder's entries follow it
    assert rec.count == 8 and rec.recursive
    dev = list_files(ch, "/dev")
    assert "char_device" in {e.type for e in dev.entries}


def test_list_truncated(ch: AgentChannel, root: Path) -> None:
    for i in range(10):
        (root / f"f{i}").write_text("")
    r = list_files(ch, str(root), max_entries=3)
    assert r.truncated and r.count == 3 and len(r.entries) == 3
    r = list_files(ch, str(root), max_entries=10)
    assert not r.truncated and r.count == 10
    for bad in (0, limits.MAX_LIST_ENTRIES + 1, True):
        with pytest.raises(InvalidInputError, match="max_entries"):
            list_files(ch, str(root), max_entries=bad)


def test_list_odd_names(ch: AgentChannel, root: Path) -> None:
    raw = bytes(root) + b"/bad\xff name"
    with open(raw, "wb"):
        pass
    (root / "new\nline").write_text("")
    os.symlink(b"target\xfe", bytes(root) + b"/link")
    r = list_files(ch, str(root))
    by = {e.path: e for e in r.entries}
    assert by["new\nline"].path_base64 is None
    odd = by["bad\\xff name"]
    assert base64.b64decode(odd.path_base64 or "") == b"bad\xff name"
    assert by["link"].link_target == "target\\xfe"
    assert base64.b64decode(by["link"].link_target_base64 or "") == b"target\xfe"
    r.model_dump_json()  # every name fits in JSON


def test_list_a_file_missing_or_under_a_file(ch: AgentChannel, root: Path) -> None:
    f = root / "file.txt"
    f.write_text("x")
    with pytest.raises(InvalidInputError, match="is a file, not a directory") as info:
        list_files(ch, str(f))
    assert "task_read_file" in (info.value.hint or "")
    with pytest.raises(NotFoundError, match="no such file") as nf:
        list_files(ch, str(root / "nope"))
    assert "task_list_files" in (nf.value.hint or "")
    with pytest.raises(InvalidInputError, match="a parent of it is a file"):
        list_files(ch, str(f / "sub"))
    (root / "dirlink").symlink_to(root)
    assert list_files(ch, str(root / "dirlink")).count == 2  # a link as the path is followed
    (root / "filelink").symlink_to("file.txt")
    with pytest.raises(InvalidInputError, match=r"symbolic link to 'file\.txt', which is not"):
        list_files(ch, str(root / "filelink"))


def test_times_are_iso_utc_even_when_odd() -> None:
    assert files._iso(0) == "1970-01-01T00:00:00.000000+00:00"
    assert files._iso(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456+00:00"
    assert files._iso(-1_000) == "1969-12-31T23:59:59.999999+00:00"
    assert files._iso(2**63 - 1).startswith("2262-04-11T23:47:16")  # the wire's range
    assert files._iso(-(2**63)).startswith("1677-09-21T00:12:43")


# ------------------------------------------------------------------ errors


def test_errors_leave_nothing_half_written(ch: AgentChannel, root: Path) -> None:
    f = root / "file.txt"
    f.write_text("keep")
    (root / "dir").mkdir()
    with pytest.raises(NotFoundError, match="no such file") as nf:
        read_file(ch, str(root / "missing"))
    assert nf.value.code == "not_found" and "task_list_files" in (nf.value.hint or "")
    assert nf.value.details["errno"] == "ENOENT"
    with pytest.raises(NotFoundError):
        stream_file(ch, str(root / "missing"), lambda _: None)
    with pytest.raises(InvalidInputError, match="is a directory"):
        read_file(ch, str(root / "dir"))
    with pytest.raises(InvalidInputError, match="is a directory") as info:
        write_file(ch, str(root / "dir"), b"x" * 200_000)
    assert "dir/NAME" in (info.value.hint or "")
    with pytest.raises(InvalidInputError, match="a parent of it is a file"):
        write_file(ch, str(f / "child.txt"), b"x")
    with pytest.raises(InvalidInputError, match="a parent of it is a file"):
        read_file(ch, str(f / "child.txt"))
    os.mkfifo(root / "fifo")
    with pytest.raises(InvalidInputError, match="not a regular file"):
        read_file(ch, str(root / "fifo"))
    (root / "loop1").symlink_to("loop2")
    (root / "loop2").symlink_to("loop1")
    with pytest.raises(InvalidInputError, match="symbolic links"):
        read_file(ch, str(root / "loop1"))
    with pytest.raises(InvalidInputError, match="too long"):
        write_file(ch, str(root / ("n" * 300)), b"x")
    assert f.read_text() == "keep"
    assert names(root) == ["dir", "fifo", "file.txt", "loop1", "loop2"]
    assert names(root / "dir") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_permission_denied(ch: AgentChannel, root: Path) -> None:
    f = root / "secret"
    f.write_text("x")
    f.chmod(0)
    with pytest.raises(InvalidInputError, match="permission denied"):
        read_file(ch, str(f))


@pytest.mark.parametrize(
    ("code", "cls", "words"),
    [
        (errno.ENOENT, NotFoundError, "no such file or directory"),
        (errno.EISDIR, InvalidInputError, "is a directory"),
        (errno.ENOTDIR, InvalidInputError, "a parent of it is a file"),
        (errno.EACCES, InvalidInputError, "permission denied"),
        (errno.EPERM, InvalidInputError, "permission denied"),
        (errno.ENOSPC, LimitError, "no space left"),
        (errno.EDQUOT, LimitError, "no space left"),
        (errno.ENAMETOOLONG, InvalidInputError, "too long"),
        (errno.ELOOP, InvalidInputError, "symbolic links"),
        (errno.EINVAL, InvalidInputError, "not a regular file"),
        (errno.EROFS, InvalidInputError, "read-only"),
        (errno.EAGAIN, LimitError, "as many file operations"),
        (errno.EPROTO, GuestProtocolError, "malformed"),
        (errno.EIO, PyroError, r"Input/output error \(EIO\)"),
        (9999, PyroError, "errno 9999"),
    ],
)
def test_every_errno_is_translated_with_a_hint(code: int, cls: type[PyroError], words: str) -> None:
    with pytest.raises(cls, match=words) as info:
        files._fail(Error(code, "guest says why"), "/workspace/x", "read")
    err = info.value
    assert "/workspace/x" in err.message
    assert err.details["path"] == "/workspace/x" and err.details["operation"] == "read"
    if code != errno.EPROTO:
        assert err.hint


def test_models_are_json_ready(ch: AgentChannel, root: Path) -> None:
    f = root / "m.txt"
    w = write_file(ch, str(f), b"abc\n")
    assert set(w.model_dump()) == {"path", "bytes_written", "size", "mode", "mtime"}
    r = read_file(ch, str(f))
    assert set(r.model_dump()) >= {"path", "size", "offset", "bytes_read", "truncated"}
    end = ch.read_file(ReadFile(bytes(f)), lambda _: None, T)
    assert isinstance(end, ReadEnd)
