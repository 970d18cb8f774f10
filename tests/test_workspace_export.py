"""Exporting a tree out of a guest (pyro_mcp.workspace.export) through the REAL agent.

The agent runs in ``--stdio`` mode on this host (no VM, no mocks): its "guest
filesystem" is a folder under tmp_path that each test crafts to be hostile. Every
hostile test keeps a canary folder beside ``dest`` and checks that it is untouched
and that nothing but ``dest`` appeared next to it.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import stat
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_driver import (  # noqa: F401 (fixtures)
    ChannelAgent,
    agent_binary_fixture,
    channel_agent_fixture,
    spawn_agent,
)
from pyro_mcp.errors import GuestProtocolError, InvalidInputError, NotFoundError
from pyro_mcp.guest.protocol import FileKind, FileStat
from pyro_mcp.progress import ProgressEvent
from pyro_mcp.workspace.archive import SeedLimits
from pyro_mcp.workspace.export import (
    ExportError,
    ExportResult,
    _plan,
    _Report,
    export_format,
    export_tree,
    show_name,
)

IS_ROOT = os.geteuid() == 0
MTIME = 1_600_000_000


@pytest.fixture
def guest(channel_agent: ChannelAgent) -> ChannelAgent:
    """The agent whose "guest" is a folder of this host (agent_driver.ChannelAgent)."""
    return channel_agent


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Path]:
    """The host folder dest goes into, with a canary beside it; checked after the test."""
    out = tmp_path / "host"
    canary = out / "canary"
    canary.mkdir(parents=True)
    (canary / "secret").write_bytes(b"canary data\n")
    (canary / "inner").mkdir()
    (canary / "inner" / "f").write_bytes(b"inner\n")
    before = _snapshot(canary)
    yield out
    assert _snapshot(canary) == before, "the canary folder changed"
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".pyro-export-")]
    assert leftovers == [], f"temporaries left beside dest: {leftovers}"


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            data = p.read_bytes() if stat.S_ISREG(st.st_mode) else b""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, data)
    return out


def _outside(host: Path, dest: Path) -> list[str]:
    """Names beside dest other than dest and the canary."""
    return sorted(p.name for p in host.iterdir() if p.name not in ("canary", dest.name))


def _reasons(result: ExportResult) -> dict[str, str]:
    return {s.path: s.reason for s in result.skipped}


def _hostile_tree(root: Path) -> None:
    """Folders, files with odd modes and names, and every kind of link and special file."""
    root.mkdir()
    (root / "a.txt").write_bytes(b"alpha\n")
    os.chmod(root / "a.txt", 0o4755)  # setuid: dropped
    (root / "sticky.txt").write_bytes(b"s")
    os.chmod(root / "sticky.txt", 0o1640)  # sticky on a file: dropped
    (root / "sub").mkdir()
    os.chmod(root / "sub", 0o2775)  # setgid: dropped
    (root / "sub" / "b.txt").write_bytes(b"beta\n")
    (root / "empty").mkdir()
    (root / "tmpdir").mkdir()
    os.chmod(root / "tmpdir", 0o1777)  # sticky on a folder: kept
    os.symlink("/", root / "to_root")
    os.symlink("/etc/passwd", root / "to_passwd")
    os.symlink(str(root / "a.txt"), root / "absolute")  # absolute, even if "inside"
    os.symlink("../../canary/secret", root / "up")
    os.symlink("../..", root / "sub" / "up2")
    os.symlink("../" * 20 + "etc/shadow", root / "sub" / "deep_up")
    os.symlink("sub/b.txt", root / "ok_link")  # kept
    os.symlink("../a.txt", root / "sub" / "ok_up")  # kept: stays inside
    os.symlink(".", root / "sub" / "dot")  # kept: sub itself
    os.symlink("dot/../..", root / "sub" / "via_dot")  # sub/dot/../.. is ../ of the tree
    os.symlink("missing", root / "dangling")  # kept: dangling but inside
    os.mkfifo(root / "fifo")
    os.mknod(root / "sock", 0o600 | stat.S_IFSOCK)
    if IS_ROOT:
        os.mknod(root / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    (root / "new\nline").write_bytes(b"newline\n")
    Path(os.fsdecode(bytes(root) + b"/bad\xff\xfe")).write_bytes(b"not utf-8\n")
    if IS_ROOT:
        os.chown(root / "a.txt", 1234, 4321)  # a guest uid: never carried over
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(Path(dirpath, name), (MTIME, MTIME), follow_symlinks=False)


EXPECTED_SKIPS = {
    "to_root": "symlink_escape",
    "to_passwd": "symlink_escape",
    "absolute": "symlink_escape",
    "up": "symlink_escape",
    "sub/up2": "symlink_escape",
    "sub/deep_up": "symlink_escape",
    "sub/via_dot": "symlink_escape",
    "fifo": "special_file",
    "sock": "special_file",
}
if IS_ROOT:
    EXPECTED_SKIPS["null"] = "special_file"


# --------------------------------------------------------------------------- directories


def test_hostile_tree_to_a_folder(guest: ChannelAgent, tmp_path: Path, host: Path) -> None:
    src = tmp_path / "guest" / "src"
    src.parent.mkdir()
    _hostile_tree(src)
    dest = host / "out"
    result = export_tree(guest.channel, str(src), dest)

    assert result.format == "directory" and result.dest == str(dest)
    assert _reasons(result) == EXPECTED_SKIPS
    assert result.skipped_count == len(EXPECTED_SKIPS)
    assert not result.truncated
    assert result.files == 5  # a.txt sticky.txt sub/b.txt new\nline bad\xff\xfe
    assert result.directories == 3  # sub empty tmpdir
    assert result.symlinks == 4  # ok_link sub/ok_up sub/dot dangling
    assert result.bytes == len(b"alpha\nsbeta\nnewline\nnot utf-8\n")
    assert _outside(host, dest) == []

    assert (dest / "a.txt").read_bytes() == b"alpha\n"
    assert (dest / "sub" / "b.txt").read_bytes() == b"beta\n"
    assert (dest / "new\nline").read_bytes() == b"newline\n"
    assert Path(os.fsdecode(bytes(dest) + b"/bad\xff\xfe")).read_bytes() == b"not utf-8\n"
    # modes: setuid/setgid and a file's sticky bit dropped, a folder's sticky kept
    assert stat.S_IMODE((dest / "a.txt").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "sticky.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((dest / "sub").stat().st_mode) == 0o775
    assert stat.S_IMODE((dest / "tmpdir").stat().st_mode) == 0o1777
    # owned by the caller, whatever the guest's uid
    for p in dest.rglob("*"):
        st = p.lstat()
        assert (st.st_uid, st.st_gid) == (os.getuid(), os.getgid()), p
    # links kept only when they stay inside, exactly as written
    assert os.readlink(dest / "ok_link") == "sub/b.txt"
    assert os.readlink(dest / "sub" / "ok_up") == "../a.txt"
    assert os.readlink(dest / "dangling") == "missing"
    for name in EXPECTED_SKIPS:
        assert not os.path.lexists(dest / name)
    for p in dest.rglob("*"):
        if p.is_symlink():
            real = os.path.realpath(p)
            assert real == str(dest) or real.startswith(str(dest) + os.sep), p
    assert (dest / "a.txt").stat().st_mtime == MTIME
    assert (dest / "sub").stat().st_mtime == MTIME


def test_device_nodes_are_skipped(guest: ChannelAgent, tmp_path: Path, host: Path) -> None:
    if not IS_ROOT:
        pytest.skip("mknod of a character or block device needs root (CAP_MKNOD)")
    src = tmp_path / "guest"
    src.mkdir()
    os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod(src / "loop", 0o600 | stat.S_IFBLK, os.makedev(7, 0))
    (src / "f").write_bytes(b"f")
    for name in ("out", "out.tar"):
        result = export_tree(guest.channel, str(src), host / name)
        assert _reasons(result) == {"null": "special_file", "loop": "special_file"}
        assert {s.detail for s in result.skipped} == {"is a char device", "is a block device"}
        assert result.files == 1
    assert sorted(os.listdir(host / "out")) == ["f"]
    with tarfile.open(host / "out.tar") as tf:
        assert tf.getnames() == ["f"]


def test_show_name_escapes_what_is_not_plain_text() -> None:
    assert show_name(b"new\nline") == "new\\nline"
    assert show_name(b"bad\xff\xfe") == "bad\\xff\\xfe"
    assert show_name(b"back\\slash\ttab\x7f") == "back\\\\slash\\ttab\\x7f"
    assert show_name("héllo/ü".encode()) == "héllo/ü"
    assert [export_format(Path(n)) for n in ("a", "a.tar", "a.tar.gz", "a.tgz", "a.zip")] == [
        "directory",
        "tar",
        "tar.gz",
        "tar.gz",
        "directory",
    ]


def test_hostile_tree_to_tar_and_tar_gz(guest: ChannelAgent, tmp_path: Path, host: Path) -> None:
    src = tmp_path / "guest" / "src"
    src.parent.mkdir()
    _hostile_tree(src)
    for name in ("out.tar", "out.tar.gz", "out.tgz"):
        dest = host / name
        result = export_tree(guest.channel, str(src), dest)
        assert result.format == ("tar" if name == "out.tar" else "tar.gz")
        assert _reasons(result) == EXPECTED_SKIPS
        with dest.open("rb") as fh:
            assert (fh.read(2) == b"\x1f\x8b") == (name != "out.tar")
        with tarfile.open(dest, errors="surrogateescape") as tf:
            members = {m.name.encode("utf-8", "surrogateescape"): m for m in tf.getmembers()}
            for raw, m in members.items():
                assert not raw.startswith(b"/") and b".." not in raw.split(b"/"), raw
                assert (m.uid, m.gid, m.uname, m.gname) == (0, 0, "", "")
                assert not m.mode & (stat.S_ISUID | stat.S_ISGID), raw
                assert m.type in (tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE), raw
            assert set(members) == {
                b"a.txt",
                b"sticky.txt",
                b"sub",
                b"sub/b.txt",
                b"sub/ok_up",
                b"sub/dot",
                b"empty",
                b"tmpdir",
                b"ok_link",
                b"dangling",
                b"new\nline",
                b"bad\xff\xfe",
            }
            assert members[b"a.txt"].mode == 0o755
            assert members[b"sticky.txt"].mode == 0o640
            assert members[b"tmpdir"].mode == 0o1777
            assert members[b"ok_link"].linkname == "sub/b.txt"
            assert members[b"a.txt"].mtime == MTIME
            got = tf.extractfile(members[b"bad\xff\xfe"])
            assert got is not None and got.read() == b"not utf-8\n"
            got = tf.extractfile(members[b"sub/b.txt"])
            assert got is not None and got.read() == b"beta\n"
        assert _outside(host, dest) == []
        dest.unlink()


def test_single_file_source(guest: ChannelAgent, tmp_path: Path, host: Path) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    (src / "report.bin").write_bytes(b"r" * 1000)
    os.chmod(src / "report.bin", 0o6750)
    result = export_tree(guest.channel, str(src / "report.bin"), host / "one")
    assert (result.files, result.bytes, result.directories) == (1, 1000, 0)
    assert (host / "one" / "report.bin").read_bytes() == b"r" * 1000
    assert stat.S_IMODE((host / "one" / "report.bin").stat().st_mode) == 0o750
    result = export_tree(guest.channel, str(src / "report.bin"), host / "one.tar")
    with tarfile.open(host / "one.tar") as tf:
        assert tf.getnames() == ["report.bin"]
        assert tf.getmembers()[0].mode == 0o750


def test_bad_sources_are_clear_errors(guest: ChannelAgent, tmp_path: Path, host: Path) -> None:
    (tmp_path / "g").mkdir()
    os.symlink("/etc", tmp_path / "g" / "link")
    os.mkfifo(tmp_path / "g" / "fifo")
    with pytest.raises(NotFoundError):
        export_tree(guest.channel, str(tmp_path / "g" / "nope"), host / "x")
    with pytest.raises(InvalidInputError, match="symlink"):
        export_tree(guest.channel, str(tmp_path / "g" / "link"), host / "x")
    with pytest.raises(InvalidInputError, match="fifo"):
        export_tree(guest.channel, str(tmp_path / "g" / "fifo"), host / "x")
    with pytest.raises(InvalidInputError, match="absolute"):
        export_tree(guest.channel, "relative/path", host / "x")
    with pytest.raises(InvalidInputError, match="does not exist"):
        export_tree(guest.channel, str(tmp_path / "g"), host / "no" / "such" / "x")
    assert _outside(host, host / "x") == []


# --------------------------------------------------------------------------- caps


def _rchar(pid: int) -> int:
    """Bytes the process has read through read(2) and friends (/proc/PID/io)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


def test_sparse_10gb_file_past_the_cap_is_never_read(
    guest: ChannelAgent, tmp_path: Path, host: Path
) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    with (src / "huge.img").open("wb") as fh:
        fh.truncate(10 << 30)  # sparse: 10 GiB that take no space
    (src / "small").write_bytes(b"ok")
    caps = SeedLimits(max_file_bytes=1 << 20)
    read_before = _rchar(guest.proc.pid)
    result = export_tree(guest.channel, str(src), host / "out.tar.gz", caps=caps)
    read_by_agent = _rchar(guest.proc.pid) - read_before
    assert _reasons(result) == {"huge.img": "file_size"}
    assert result.truncated and result.files == 1 and result.bytes == 2
    assert "10737418240 bytes" in result.skipped[0].detail
    assert read_by_agent < 1 << 20  # the agent read its requests and 2 bytes, not 10 GiB
    with tarfile.open(host / "out.tar.gz") as tf:
        assert tf.getnames() == ["small"]


def test_entry_total_and_depth_caps(guest: ChannelAgent, tmp_path: Path, host: Path) -> None:
    src = tmp_path / "guest"
    deep = src / "d1" / "d2" / "d3"
    deep.mkdir(parents=True)
    (deep / "f").write_bytes(b"x")
    for i in range(6):
        (src / f"f{i}").write_bytes(b"y" * 100)
    # depth: d1/d2 is level 2; d1/d2/d3 is past it, and its file is dropped with it
    result = export_tree(guest.channel, str(src), host / "depth", max_depth=2)
    assert _reasons(result) == {"d1/d2/d3": "too_deep"}
    assert result.truncated and (host / "depth" / "d1" / "d2").is_dir()
    assert not (host / "depth" / "d1" / "d2" / "d3").exists()
    # total bytes: d1/d2/d3/f (1 byte) and 3 files of 100 fit in 350
    result = export_tree(
        guest.channel, str(src), host / "total", caps=SeedLimits(max_total_bytes=350)
    )
    assert result.bytes == 301 and result.truncated
    assert sorted(_reasons(result).items()) == [(f"f{i}", "total_size") for i in (3, 4, 5)]
    # entries: the listing stops after 5 (in the guest's order), 4 of them are kept
    result = export_tree(guest.channel, str(src), host / "count", caps=SeedLimits(max_entries=4))
    assert result.truncated
    assert result.directories + result.files == 4
    assert set(_reasons(result).values()) == {"too_many_entries"}
    assert _reasons(result)["."] == "too_many_entries"
    assert sum(1 for _ in (host / "count").rglob("*")) == 4


def test_planning_refuses_names_that_could_reach_a_host_path() -> None:
    """What a lying guest could list (the frame decoder already refuses most of it)."""

    def st(kind: FileKind, target: bytes = b"") -> FileStat:
        return FileStat(kind, 0o644, 0, 0, 1, 0, target)

    listing = [
        ((b"..",), st(FileKind.FILE)),
        ((b"a", b"..", b"b"), st(FileKind.FILE)),
        ((b"",), st(FileKind.FILE)),
        ((b".",), st(FileKind.DIR)),
        ((b"nul\x00",), st(FileKind.FILE)),
        ((b"x" * 256,), st(FileKind.FILE)),
        ((b"ok",), st(FileKind.FILE)),
        ((b"ok",), st(FileKind.FILE)),
        ((b"ok", b"under_file"), st(FileKind.FILE)),
        ((b"lnk",), st(FileKind.SYMLINK, b".")),
        ((b"lnk", b"through_link"), st(FileKind.FILE)),
        ((b"ghost", b"orphan"), st(FileKind.FILE)),
    ]
    report = _Report(items=[])
    plan = _plan(listing, SeedLimits(), 64, report)
    assert [item.parts for item in plan.items] == [(b"lnk",), (b"ok",)]
    got = sorted((s.path, s.reason) for s in report.items)
    assert got == sorted(
        [
            ("..", "invalid_name"),
            ("a/../b", "no_parent"),
            ("", "invalid_name"),
            (".", "invalid_name"),
            ("nul\\x00", "invalid_name"),
            ("x" * 256, "name_too_long"),
            ("ok", "duplicate"),
            ("ok/under_file", "no_parent"),
            ("lnk/through_link", "no_parent"),
            ("ghost/orphan", "no_parent"),
        ]
    )


# --------------------------------------------------------------------------- dest


def test_overwrite_refused_then_allowed(guest: ChannelAgent, tmp_path: Path, host: Path) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    (src / "new").write_bytes(b"new")
    dest = host / "out"
    dest.mkdir()
    (dest / "old").write_bytes(b"old")
    os.symlink("../canary", dest / "old_link")  # rmtree of the old tree must not follow it
    with pytest.raises(InvalidInputError, match="not empty") as info:
        export_tree(guest.channel, str(src), dest)
    assert info.value.hint and "overwrite" in info.value.hint
    assert sorted(os.listdir(dest)) == ["old", "old_link"]
    result = export_tree(guest.channel, str(src), dest, overwrite=True)
    assert result.files == 1 and sorted(os.listdir(dest)) == ["new"]
    assert _outside(host, dest) == []
    # an empty folder is fine without overwrite
    empty = host / "empty"
    empty.mkdir()
    export_tree(guest.channel, str(src), empty)
    assert os.listdir(empty) == ["new"]
    # archives: refused, then replaced
    tar = host / "out.tar"
    tar.write_bytes(b"not a tar")
    with pytest.raises(InvalidInputError, match=r"already exists"):
        export_tree(guest.channel, str(src), tar)
    assert tar.read_bytes() == b"not a tar"
    export_tree(guest.channel, str(src), tar, overwrite=True)
    with tarfile.open(tar) as tf:
        assert tf.getnames() == ["new"]
    # one kind never replaces another, even with overwrite
    (host / "dir.tar").mkdir()
    with pytest.raises(InvalidInputError, match="not an archive"):
        export_tree(guest.channel, str(src), host / "dir.tar", overwrite=True)
    (host / "file").write_bytes(b"f")
    with pytest.raises(InvalidInputError, match="not a folder"):
        export_tree(guest.channel, str(src), host / "file", overwrite=True)
    assert (host / "file").read_bytes() == b"f" and os.listdir(host / "dir.tar") == []


@pytest.mark.parametrize("name", ["out", "out.tar"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_dest_that_is_a_symlink_is_refused(
    guest: ChannelAgent, tmp_path: Path, host: Path, name: str, overwrite: bool
) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    (src / "f").write_bytes(b"f")
    target = host / "canary" / ("inner" if name == "out" else "secret")
    dest = host / name
    os.symlink(target, dest)
    with pytest.raises(InvalidInputError, match="symlink"):
        export_tree(guest.channel, str(src), dest, overwrite=overwrite)
    assert os.readlink(dest) == str(target)
    dest.unlink()


# --------------------------------------------------------------------------- a lying guest


def test_guest_changes_the_tree_during_the_export(
    guest: ChannelAgent, tmp_path: Path, host: Path
) -> None:
    """After the LIST, the "guest" grows, shrinks and deletes files and swaps a folder
    for a symlink to the canary: host writes stay under dest, and all is reported."""
    src = tmp_path / "guest"
    src.mkdir()
    (src / "a_first").write_bytes(b"1")
    (src / "b_grows").write_bytes(b"x" * 10)
    (src / "c_shrinks").write_bytes(b"y" * 10)
    (src / "d_vanishes").write_bytes(b"z")
    (src / "e_dir").mkdir()
    (src / "e_dir" / "secret").write_bytes(b"12345678901234567890")
    (src / "e_dir" / "sub").mkdir()
    (src / "e_dir" / "sub" / "f").write_bytes(b"f")
    done = False

    def tamper(event: ProgressEvent) -> None:
        nonlocal done
        if done:
            return
        done = True
        with (src / "b_grows").open("ab") as fh:
            fh.write(b"+" * 1000)
        (src / "c_shrinks").write_bytes(b"y")
        (src / "d_vanishes").unlink()
        os.rename(src / "e_dir", tmp_path / "e_moved")
        os.symlink(host / "canary", src / "e_dir")

    result = export_tree(guest.channel, str(src), host / "out", progress=tamper)
    reasons = _reasons(result)
    assert reasons["b_grows"] == "changed" and reasons["c_shrinks"] == "changed"
    assert reasons["d_vanishes"] == "unreadable"
    out = host / "out"
    assert (out / "b_grows").read_bytes() == b"x" * 10  # cut at the listed size
    assert (out / "c_shrinks").read_bytes() == b"y"
    assert not (out / "d_vanishes").exists()
    # the guest read the canary through its own symlink (a guest may read its own
    # files); the host wrote only under dest, in folders it made
    assert (out / "e_dir").is_dir() and not (out / "e_dir").is_symlink()
    assert (out / "e_dir" / "sub").is_dir() and not (out / "e_dir" / "sub").is_symlink()
    assert _outside(host, out) == []


def test_racing_thread_swaps_folders_for_links(
    guest: ChannelAgent, tmp_path: Path, host: Path
) -> None:
    src = tmp_path / "guest"
    for i in range(20):
        d = src / f"d{i:02}"
        d.mkdir(parents=True)
        for j in range(20):
            (d / f"f{j}").write_bytes(b"x" * 2000)
    stop = threading.Event()

    def swap() -> None:
        n = 0
        while not stop.is_set():
            i = n % 20
            d = src / f"d{i:02}"
            aside = tmp_path / f"aside{i:02}"
            try:
                if d.is_symlink():
                    d.unlink()
                    os.rename(aside, d)
                else:
                    os.rename(d, aside)
                    os.symlink(host / "canary", d)
            except OSError:
                pass
            n += 1

    thread = threading.Thread(target=swap)
    thread.start()
    try:
        results = [export_tree(guest.channel, str(src), host / f"out{k}") for k in range(3)] + [
            export_tree(guest.channel, str(src), host / "out.tar")
        ]
    finally:
        stop.set()
        thread.join()
    for k in range(3):
        for p in (host / f"out{k}").rglob("*"):
            assert not p.is_symlink(), p  # no guest link of this tree was exportable
    with tarfile.open(host / "out.tar") as tf:
        assert all(m.isfile() or m.isdir() for m in tf.getmembers())
    assert all(r.files + r.skipped_count >= 0 for r in results)


# --------------------------------------------------------------------------- scale


@pytest.mark.slow
def test_100k_tiny_files(guest: ChannelAgent, tmp_path: Path, host: Path) -> None:
    src = tmp_path / "guest"
    n_dirs, per_dir = 100, 1000
    for i in range(n_dirs):
        d = src / f"d{i:03}"
        d.mkdir(parents=True)
        for j in range(per_dir):
            (d / f"f{j}").write_bytes(b"%d" % j)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.monotonic()
    result = export_tree(guest.channel, str(src), host / "out")
    elapsed = time.monotonic() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert (result.files, result.directories, result.skipped_count) == (100_000, 100, 0)
    assert (host / "out" / "d099" / "f999").read_bytes() == b"999"
    print(
        f"\nexport of 100,000 tiny files: {elapsed:.1f} s "
        f"({100_000 / elapsed:.0f} files/s); peak RSS {rss0 // 1024} -> {rss1 // 1024} MiB"
    )


@pytest.mark.slow
def test_throughput_200mb(guest: ChannelAgent, tmp_path: Path, host: Path) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    block = os.urandom(1 << 20)
    for i in range(4):
        (src / f"big{i}").write_bytes(block * 50)
    digest = hashlib.sha256(block * 50).hexdigest()
    for name in ("out", "out.tar", "out.tar.gz"):
        t0 = time.monotonic()
        result = export_tree(guest.channel, str(src), host / name)
        elapsed = time.monotonic() - t0
        assert result.bytes == 200 << 20
        print(f"\nexport of 200 MiB to {name}: {elapsed:.2f} s, {200 / elapsed:.0f} MiB/s")
    assert hashlib.sha256((host / "out" / "big3").read_bytes()).hexdigest() == digest


def test_timeout_keeps_what_was_done_and_reports_the_rest(
    guest: ChannelAgent, tmp_path: Path, host: Path
) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x")

    def slow(event: ProgressEvent) -> None:
        time.sleep(0.6)

    result = export_tree(guest.channel, str(src), host / "out", timeout=1.0, progress=slow)
    assert result.truncated
    assert result.files == 2 and sorted(os.listdir(host / "out")) == ["f0", "f1"]
    assert _reasons(result) == {"f2": "timeout", "f3": "timeout", "f4": "timeout"}
    with pytest.raises(ExportError, match="longer than"):
        export_tree(guest.channel, str(src), host / "never", timeout=1e-9)
    assert not (host / "never").exists()


def test_guest_that_dies_mid_export_leaves_nothing(
    guest: ChannelAgent, tmp_path: Path, host: Path
) -> None:
    src = tmp_path / "guest"
    src.mkdir()
    for i in range(5):
        (src / f"f{i}").write_bytes(b"x" * 100_000)
    (host / "out.tar").write_bytes(b"previous")

    def kill(event: ProgressEvent) -> None:
        guest.proc.kill()
        guest.proc.wait()

    with pytest.raises(GuestProtocolError):
        export_tree(guest.channel, str(src), host / "out", progress=kill)
    assert not (host / "out").exists()
    with pytest.raises(GuestProtocolError):
        export_tree(guest.channel, str(src), host / "out.tar", overwrite=True)
    assert (host / "out.tar").read_bytes() == b"previous"
    assert _outside(host, host / "out.tar") == []
    with pytest.raises(InvalidInputError, match="cannot be a destination"):
        export_tree(guest.channel, str(src), Path("/"), overwrite=True)


@pytest.mark.parametrize("name", ["out", "out.tar"])
def test_host_write_failure_leaves_dest_as_it_was(
    guest: ChannelAgent, tmp_path: Path, host: Path, name: str
) -> None:
    """A full disk, played by RLIMIT_FSIZE (writes past it fail with EFBIG)."""
    src = tmp_path / "guest"
    src.mkdir()
    (src / "big").write_bytes(b"b" * (3 << 20))
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, limit[1]))
    try:
        with pytest.raises(ExportError, match="File too large") as info:
            export_tree(guest.channel, str(src), host / name)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    assert info.value.hint and "free space" in info.value.hint
    assert not (host / name).exists()
    assert _outside(host, host / name) == []
