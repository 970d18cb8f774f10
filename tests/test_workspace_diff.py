"""diff_workspace against the real agent in --stdio mode (no VM), checked with git apply.

Each test makes a seed folder, copies it (mtimes and modes kept) to a "workspace"
the agent lists and reads as the guest, changes the workspace, diffs, then applies
the patch with ``git apply`` to another copy of the seed and compares that tree
with the workspace, byte for byte and mode for mode (git's modes: 644/755/symlink).
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest

from agent_driver import (  # noqa: F401 (fixtures)
    ChannelAgent,
    agent_binary_fixture,
    channel_agent_fixture,
    spawn_agent,
)
from pyro_mcp.errors import InvalidInputError, NotFoundError
from pyro_mcp.guest.channel import AgentChannel
from pyro_mcp.workspace.archive import Excluder
from pyro_mcp.workspace.diff import DiffResult, _literal, _quote, _safe_name, diff_workspace

T = 10.0

pytestmark = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


@pytest.fixture
def ch(channel_agent: ChannelAgent) -> AgentChannel:
    return channel_agent.channel


# ------------------------------------------------------------------ helpers


def write(root: Path | bytes, rel: str | bytes, data: bytes | str, mode: int = 0o644) -> None:
    path = os.path.join(os.fsencode(root), os.fsencode(rel))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(path, mode)


def link(root: Path, rel: str, target: str) -> None:
    path = root / rel
    if path.is_symlink() or path.exists():
        path.unlink()
    path.symlink_to(target)


def copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)  # copy2: modes and mtimes kept
    return dest


def age(root: Path) -> None:
    """Date every seed entry 100 s back, so an edit in the workspace is never in the
    seed's second (an edit of the same size in the same second is not noticed)."""
    for folder, dirs, names in os.walk(root):
        for name in dirs + names:
            full = os.path.join(folder, name)
            st = os.lstat(full)
            ns = st.st_mtime_ns - 100 * 10**9
            os.utime(full, ns=(st.st_atime_ns, ns), follow_symlinks=False)


def later(path: Path | bytes) -> None:
    """Move a file's mtime on by 2 s, as an edit in the guest would."""
    st = os.lstat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 2 * 10**9), follow_symlinks=False)


def tree(root: Path, excluder: Excluder | None = None) -> dict[bytes, tuple[str, bytes]]:
    """Every non-folder entry: (git mode, content or link target)."""
    out: dict[bytes, tuple[str, bytes]] = {}
    base = os.fsencode(root)
    for folder, dirs, names in os.walk(base):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(folder, d))]:
            full = os.path.join(folder, name)
            rel = os.path.relpath(full, base)
            if excluder and excluder.excludes(os.fsdecode(rel)):
                continue
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("120000", os.readlink(full))
            else:
                mode = "100755" if st.st_mode & stat.S_IXUSR else "100644"
                out[rel] = (mode, Path(os.fsdecode(full)).read_bytes())
    return out


def apply(result: DiffResult, seed: Path | None, dest: Path) -> Path:
    """``git apply`` the patch on a copy of the seed (or an empty folder)."""
    if seed is None:
        dest.mkdir()
    else:
        copy(seed, dest)
    patch = dest.parent / (dest.name + ".patch")
    patch.write_text(result.patch, encoding="utf-8")
    if not result.patch:
        return dest  # git apply refuses an empty patch: nothing to apply
    for args in (["--check"], []):
        run = subprocess.run(
            ["git", "apply", *args, str(patch)],
            check=False,
            cwd=dest,
            capture_output=True,
            text=True,
        )
        assert run.returncode == 0, f"git apply {args}: {run.stderr}\n{result.patch}"
    return dest


def check(
    ch: AgentChannel,
    seed: Path | None,
    ws: Path,
    tmp_path: Path,
    *,
    exclude: tuple[str, ...] = (),
    **kw: object,
) -> DiffResult:
    """Diff, apply, and compare the patched seed with the workspace."""
    result = diff_workspace(ch, str(ws), seed, exclude=exclude, timeout=T, **kw)  # type: ignore[arg-type]
    applied = apply(result, seed, tmp_path / "applied")
    excluder = Excluder(exclude)
    assert tree(applied, excluder) == tree(ws, excluder)
    assert result.patch_bytes == len(result.patch.encode())
    return result


@pytest.fixture
def seed(tmp_path: Path) -> Path:
    root = tmp_path / "seed"
    write(root, "README.md", "# demo\n\nsome text\n")
    write(root, "src/app.py", "".join(f"line {i}\n" for i in range(40)))
    write(root, "src/util.py", "def f():\n    return 1\n")
    write(root, "src/gone.py", "bye\n")
    write(root, "noeol.txt", "no newline at the end")
    write(root, "eol.txt", "ends with a newline\n")
    write(root, "empty.txt", "")
    write(root, "to-empty.txt", "something\n")
    write(root, "crlf.txt", "one\r\ntwo\r\nthree\r\n")
    write(root, "run.sh", "#!/bin/sh\necho hi\n")
    write(root, "tool.sh", "#!/bin/sh\necho tool\n", 0o755)
    write(root, "both.sh", "#!/bin/sh\necho both\n")
    write(root, "image.bin", bytes(range(256)) * 4)
    write(root, "bin/gone.bin", b"\0\1\2\3" * 100)
    link(root, "link-to-readme", "README.md")
    link(root, "link-becomes-file", "README.md")
    write(root, "file-becomes-link", "plain\n")
    write(root, "dir-becomes-file/inner.txt", "inner\n")
    write(root, "file-becomes-dir", "was a file\n")
    age(root)
    return root


def test_every_kind_of_change_applies_with_git(
    ch: AgentChannel, seed: Path, tmp_path: Path
) -> None:
    ws = copy(seed, tmp_path / "ws")
    write(ws, "src/app.py", "".join(f"line {i}\n" for i in range(40) if i != 20) + "added\n")
    write(ws, "src/new.py", "print('new')\n")
    write(ws, "deep/new/folder/x.txt", "x\n")
    (ws / "src/gone.py").unlink()
    (ws / "bin/gone.bin").unlink()
    write(ws, "noeol.txt", "no newline at the end\n")  # gains one
    write(ws, "eol.txt", "ends with a newline")  # loses it
    write(ws, "empty.txt", "now has text")
    write(ws, "to-empty.txt", "")
    write(ws, "new-empty.txt", "")
    write(ws, "crlf.txt", "one\r\nTWO\r\nthree\r\n")
    os.chmod(ws / "run.sh", 0o755)
    os.chmod(ws / "tool.sh", 0o644)
    write(ws, "both.sh", "#!/bin/sh\necho both, changed\n", 0o755)
    link(ws, "link-to-readme", "src/app.py")
    link(ws, "new-link", "src/util.py")
    (ws / "link-becomes-file").unlink()
    write(ws, "link-becomes-file", "now a file\n")
    link(ws, "file-becomes-link", "eol.txt")
    shutil.rmtree(ws / "dir-becomes-file")
    write(ws, "dir-becomes-file", "now a file\n")
    (ws / "file-becomes-dir").unlink()
    write(ws, "file-becomes-dir/inside.txt", "now inside a folder\n")
    for name in ["with space.txt", 'quote"d.txt', "back\\slash.txt", "new\nline.txt", "tab\there"]:
        write(ws, name, f"{name}\n")
    write(ws, "ünïcödé/名前.txt", "utf-8 names\n")
    write(ws, b"bad-\xff\xfe.txt", "invalid utf-8 name\n")

    result = check(ch, seed, ws, tmp_path)

    assert "src/gone.py" in result.deleted and "bin/gone.bin" in result.deleted
    assert {"src/new.py", "new-empty.txt", "new-link", "ünïcödé/名前.txt"} <= set(result.added)
    assert "bad-\\xff\\xfe.txt" in result.added
    assert {"src/app.py", "noeol.txt", "crlf.txt", "link-to-readme", "both.sh"} <= set(
        result.modified
    )
    assert set(result.mode_changed) == {"run.sh", "tool.sh", "both.sh"}
    assert set(result.type_changed) == {
        "link-becomes-file",
        "file-becomes-link",
        "dir-becomes-file",
        "file-becomes-dir",
    }
    assert result.skipped == [] and not result.truncated
    assert all(e.in_patch for e in result.entries if e.kind != "dir")
    folders = {e.path for e in result.entries if e.kind == "dir"}
    assert {"deep", "deep/new", "deep/new/folder", "ünïcödé"} <= folders
    by_path = {e.path: e for e in result.entries}
    assert by_path["run.sh"].status == "mode_changed"
    assert (by_path["run.sh"].old_mode, by_path["run.sh"].new_mode) == ("100644", "100755")
    assert by_path["new-link"].new_mode == "120000"
    assert by_path["bin/gone.bin"].binary
    # git's own quoting, and a tab after ---/+++ names with a space
    assert '"b/new\\nline.txt"' in result.patch
    assert '"b/quote\\"d.txt"' in result.patch
    assert '"b/bad-\\377\\376.txt"' in result.patch
    assert '"b/\\303\\274n' in result.patch
    assert "+++ b/with space.txt\t\n" in result.patch
    assert "\\ No newline at end of file" in result.patch
    assert result.summary.startswith(f"{len(result.added)} added, ")


def test_nothing_changed_reads_nothing(ch: AgentChannel, seed: Path, tmp_path: Path) -> None:
    ws = copy(seed, tmp_path / "ws")
    result = check(ch, seed, ws, tmp_path)
    assert result.patch == "" and result.entries == [] and result.files_compared == 0
    assert result.summary == "0 added, 0 modified, 0 deleted"


def test_a_touched_file_is_read_and_found_unchanged(
    ch: AgentChannel, seed: Path, tmp_path: Path
) -> None:
    ws = copy(seed, tmp_path / "ws")
    later(ws / "src/app.py")
    result = check(ch, seed, ws, tmp_path)
    assert result.files_compared == 1 and result.entries == [] and result.patch == ""


def test_subsecond_mtimes_count_as_equal(ch: AgentChannel, seed: Path, tmp_path: Path) -> None:
    """The qemu workspace disk keeps whole seconds: a seed at .7 s and a guest at .0 s agree."""
    ws = copy(seed, tmp_path / "ws")
    st = os.stat(seed / "README.md")
    whole = st.st_mtime_ns // 10**9 * 10**9
    os.utime(seed / "README.md", ns=(st.st_atime_ns, whole + 700_000_000))
    os.utime(ws / "README.md", ns=(st.st_atime_ns, whole))
    result = check(ch, seed, ws, tmp_path)
    assert result.files_compared == 0


def test_same_size_same_second_edit_is_missed_by_design(
    ch: AgentChannel, seed: Path, tmp_path: Path
) -> None:
    """The documented limit of the cheap test: equal size and second means unchanged."""
    ws = copy(seed, tmp_path / "ws")
    st = os.stat(ws / "eol.txt")
    write(ws, "eol.txt", "ENDS with a newline\n")
    os.utime(ws / "eol.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert diff_workspace(ch, str(ws), seed, timeout=T).entries == []


def test_a_racy_seed_file_is_read(ch: AgentChannel, seed: Path, tmp_path: Path) -> None:
    """A seed file as recent as the task (``racy_since``) is compared by content, so a
    same-size edit in the same second is found (git's "racily clean" rule)."""
    ws = copy(seed, tmp_path / "ws")
    st = os.stat(ws / "eol.txt")
    write(ws, "eol.txt", "ENDS with a newline\n")
    os.utime(ws / "eol.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    result = diff_workspace(ch, str(ws), seed, timeout=T, racy_since=st.st_mtime_ns / 1e9)
    assert result.modified == ["eol.txt"]  # the other racy files were read, unchanged


def test_binary_files_under_and_over_the_cap(ch: AgentChannel, seed: Path, tmp_path: Path) -> None:
    ws = copy(seed, tmp_path / "ws")
    write(ws, "image.bin", bytes(range(255, -1, -1)) * 4)
    write(ws, "small.bin", os.urandom(3000))
    write(ws, "latin1.txt", "caf\xe9\n".encode("latin-1"))  # not UTF-8: binary
    write(ws, "huge.bin", os.urandom(50_000))
    write(ws, "src/after.py", "still applied\n")
    result = diff_workspace(ch, str(ws), seed, max_binary_bytes=10_000, timeout=T)
    assert [(s.path, s.reason.split(":")[0]) for s in result.skipped] == [
        ("huge.bin", "binary, 50000 bytes")
    ]
    assert result.truncated
    assert "GIT binary patch" in result.patch and "huge.bin" not in result.patch
    by_path = {e.path: e for e in result.entries}
    assert by_path["huge.bin"].binary and not by_path["huge.bin"].in_patch
    assert by_path["latin1.txt"].binary and by_path["latin1.txt"].in_patch
    applied = apply(result, seed, tmp_path / "applied")
    expected = tree(ws)
    del expected[b"huge.bin"]
    assert tree(applied) == expected


def test_git_binary_literal_of_nothing_is_gits() -> None:
    assert _literal(b"") == b"literal 0\nHcmV?d00001\n\n"  # as git writes it


def test_quoting_is_gits() -> None:
    assert _quote(b"a/plain name.txt") == b"a/plain name.txt"
    assert _quote(b'a/q"\\\t\n\x7f\xc3\xa9') == b'"a/q\\"\\\\\\t\\n\\177\\303\\251"'


def test_a_special_file_is_listed_not_patched(ch: AgentChannel, seed: Path, tmp_path: Path) -> None:
    ws = copy(seed, tmp_path / "ws")
    os.mkfifo(ws / "pipe")
    write(ws, "z.txt", "z\n")
    result = diff_workspace(ch, str(ws), seed, timeout=T)
    assert [s.path for s in result.skipped] == ["pipe"]
    assert {e.path: e.kind for e in result.entries}["pipe"] == "other"
    (ws / "pipe").unlink()
    applied = apply(result, seed, tmp_path / "applied")
    assert tree(applied) == tree(ws)


def test_excluded_paths_are_ignored_on_both_sides(
    ch: AgentChannel, seed: Path, tmp_path: Path
) -> None:
    write(seed, "src/__pycache__/app.cpython-312.pyc", b"\0seed cache")
    write(seed, "old.pyc", b"\0old")
    age(seed)
    ws = copy(seed, tmp_path / "ws")
    write(ws, "src/__pycache__/app.cpython-312.pyc", b"\0new cache")
    write(ws, "src/__pycache__/util.cpython-312.pyc", b"\0more")
    (ws / "old.pyc").unlink()
    write(ws, "lib/x.pyc", b"\0x")
    write(ws, "src/util.py", "def f():\n    return 2\n")
    exclude = ("__pycache__", "*.pyc")
    result = check(ch, seed, ws, tmp_path, exclude=exclude)
    assert result.modified == ["src/util.py"] and result.added == [] and result.deleted == []
    assert [(e.path, e.kind) for e in result.entries] == [("lib", "dir"), ("src/util.py", "file")]


def test_path_limits_the_diff(ch: AgentChannel, seed: Path, tmp_path: Path) -> None:
    ws = copy(seed, tmp_path / "ws")
    write(ws, "src/util.py", "def f():\n    return 3\n")
    write(ws, "src/pkg/new.py", "new\n")
    write(ws, "README.md", "changed outside the path\n")
    (ws / "src/gone.py").unlink()
    result = diff_workspace(ch, str(ws), seed, path="src", timeout=T)
    assert result.path == "src"
    assert result.modified == ["src/util.py"]
    assert set(result.added) == {"src/pkg/new.py"} and result.deleted == ["src/gone.py"]
    applied = apply(result, seed, tmp_path / "applied")
    assert (applied / "README.md").read_text() == "# demo\n\nsome text\n"
    assert (applied / "src/util.py").read_text() == "def f():\n    return 3\n"
    one = diff_workspace(ch, str(ws), seed, path="./src/util.py", timeout=T)
    assert [e.path for e in one.entries] == ["src/util.py"]
    assert diff_workspace(ch, str(ws), seed, path="nothing/here", timeout=T).entries == []
    gone = diff_workspace(ch, str(ws), seed, path="src/gone.py", timeout=T)
    assert gone.deleted == ["src/gone.py"]
    for bad in ("../etc", "/etc", "src/../.."):
        with pytest.raises(InvalidInputError):
            diff_workspace(ch, str(ws), seed, path=bad, timeout=T)


def test_the_patch_cap_cuts_at_file_boundaries(
    ch: AgentChannel, seed: Path, tmp_path: Path
) -> None:
    ws = copy(seed, tmp_path / "ws")
    for i in range(10):
        write(ws, f"many/f{i}.txt", "".join(f"file {i} line {j}\n" for j in range(20)))
    full = diff_workspace(ch, str(ws), seed, timeout=T)
    sections = full.patch.split("diff --git ")
    cap = len("diff --git ".join(sections[:5]).encode()) + 10  # 4 whole sections and a bit
    cut = diff_workspace(ch, str(ws), seed, max_patch_bytes=cap, timeout=T)
    assert cut.truncated and cut.patch_bytes <= cap
    assert cut.patch == "diff --git ".join(sections[:5])
    assert len(cut.skipped) == 6 and all("max_patch_bytes" in s.reason for s in cut.skipped)
    assert [e.in_patch for e in cut.entries if e.kind != "dir"] == [True] * 4 + [False] * 6
    applied = apply(cut, seed, tmp_path / "applied")
    assert tree(applied)[b"many/f3.txt"] == tree(ws)[b"many/f3.txt"]
    assert b"many/f4.txt" not in tree(applied)


def test_max_files_and_max_entries(ch: AgentChannel, seed: Path, tmp_path: Path) -> None:
    ws = copy(seed, tmp_path / "ws")
    for i in range(5):
        write(ws, f"n{i}.txt", f"{i}\n")
    few = diff_workspace(ch, str(ws), seed, max_files=2, timeout=T)
    assert few.files_compared == 2 and few.truncated
    assert len([s for s in few.skipped if "max_files" in s.reason]) == 3
    apply(few, seed, tmp_path / "applied")
    cut = diff_workspace(ch, str(ws), seed, max_entries=3, timeout=T)
    assert cut.listing_truncated and cut.truncated and cut.deleted == []
    assert "listing stopped" in cut.summary


def test_large_files_are_compared_streaming_or_left_out(
    ch: AgentChannel, seed: Path, tmp_path: Path
) -> None:
    big = os.urandom(100_000)
    write(seed, "big.dat", big)
    write(seed, "big2.dat", big)
    age(seed)
    ws = copy(seed, tmp_path / "ws")
    later(ws / "big.dat")  # same bytes, other mtime: streamed, found equal
    write(ws, "big2.dat", big[:-1] + b"!")  # same size, other bytes
    result = diff_workspace(ch, str(ws), seed, max_file_bytes=50_000, timeout=T)
    assert [(s.path, s.reason) for s in result.skipped] == [
        ("big2.dat", "larger than max_file_bytes (50000)")
    ]
    assert result.modified == ["big2.dat"] and result.files_compared == 2


def test_an_empty_seed_diffs_against_nothing(ch: AgentChannel, tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    write(ws, "a.txt", "a\n")
    write(ws, "bin/tool", "#!/bin/sh\n", 0o755)
    write(ws, "blob", b"\0\1\2")
    link(ws, "l", "a.txt")
    result = check(ch, None, ws, tmp_path)
    assert set(result.added) == {"a.txt", "bin/tool", "blob", "l"}


def test_two_thousand_files_ten_changed(ch: AgentChannel, tmp_path: Path) -> None:
    seed = tmp_path / "seed"
    for i in range(2000):
        write(seed, f"pkg{i // 100:02}/mod{i:04}.py", f"# module {i}\n" + "x = 1\n" * 20)
    age(seed)
    ws = copy(seed, tmp_path / "ws")
    for i in range(0, 2000, 200):
        write(ws, f"pkg{i // 100:02}/mod{i:04}.py", f"# module {i}, edited\n" + "x = 1\n" * 20)
    start = time.perf_counter()
    result = diff_workspace(ch, str(ws), seed, timeout=T)
    took = time.perf_counter() - start
    print(f"\n2000-file seed, 10 changed: {took * 1000:.0f} ms, {result.files_compared} read")
    assert len(result.modified) == 10 and result.files_compared == 10
    applied = apply(result, seed, tmp_path / "applied")
    assert tree(applied) == tree(ws)


def test_missing_roots_and_unsafe_names(ch: AgentChannel, seed: Path, tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        diff_workspace(ch, str(tmp_path / "no-such-workspace"), seed, timeout=T)
    with pytest.raises(NotFoundError):
        diff_workspace(ch, str(seed), tmp_path / "no-such-seed", timeout=T)
    assert _safe_name(b"a/b c/d") and _safe_name(b"\xff")
    for bad in (b"", b"../x", b"a/../b", b"/abs", b"a//b", b"./a", b"a\0b"):
        assert not _safe_name(bad)


def test_a_seed_inside_a_git_repository_applies_with_directory(
    ch: AgentChannel, seed: Path, tmp_path: Path
) -> None:
    """docs/parts/diff.md's catch: in a repository's subfolder, --directory from the top."""
    ws = copy(seed, tmp_path / "ws")
    write(ws, "src/util.py", "def f():\n    return 4\n")
    result = diff_workspace(ch, str(ws) + "/", seed, timeout=T)
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    copy(seed, repo / "backend")
    (tmp_path / "fix.patch").write_text(result.patch, encoding="utf-8")
    subprocess.run(
        ["git", "apply", "--directory=backend", str(tmp_path / "fix.patch")], cwd=repo, check=True
    )
    assert tree(repo / "backend") == tree(ws)
