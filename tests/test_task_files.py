"""A task's files through the SDK, CLI and MCP, with real guests on every backend:
read, write, edit, list, diff (checked with the real ``git apply``), export from a
hostile guest, reset, and the bad input around them.

The operations themselves (shapes, caps, errno mapping, patch format, export rules)
are tested in depth against the agent in ``--stdio`` mode (test_workspace_files.py,
test_workspace_diff.py, test_workspace_export.py); here they run end to end: qemu
through the supervisor's tunnel, gvisor likewise, host_compat through the agent in
the task's bubblewrap sandbox. Guest work stays tiny (TCG).
"""

from __future__ import annotations

import asyncio
import filecmp
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import available_backends
from mcp_helpers import mcp_session, serve_params, structured
from pyro_mcp.api import Pyro
from pyro_mcp.errors import InvalidInputError, NotFoundError, PyroError
from pyro_mcp.vmm import host_compat

pytestmark = pytest.mark.vm

ALL_BACKENDS = ("qemu", "gvisor", "host_compat")


@pytest.fixture(params=ALL_BACKENDS)
def any_backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if name == "host_compat":
        probe = host_compat.probe()
        if not probe.available:
            pytest.skip(f"host_compat cannot run here: {probe.reason}")
    elif name not in available_backends():
        pytest.skip(f"the {name} backend is not available on this machine")
    return name


@pytest.fixture
def fp(vm_environment: str, state_dir: Path, any_backend: str) -> Iterator[Pyro]:
    """A Pyro on ``any_backend`` that deletes its tasks afterwards."""
    client = Pyro(state_dir=state_dir, backend=any_backend)
    yield client
    for info in client.list_tasks():
        client.delete_task(info.task_id)


@pytest.fixture
def qp(vm_environment: str, state_dir: Path) -> Iterator[Pyro]:
    """A Pyro on qemu (the default microVM) for the tests that need only one backend."""
    if "qemu" not in available_backends():
        pytest.skip("qemu is not available on this machine")
    client = Pyro(state_dir=state_dir, backend="qemu")
    yield client
    for info in client.list_tasks():
        client.delete_task(info.task_id)


def project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "README").write_text("hello\nworld\n")
    (root / "app.py").write_text("def add(a, b):\n    return a - b\n")
    (root / "run.sh").write_text("#!/bin/sh\necho run\n")
    (root / "run.sh").chmod(0o755)
    (root / "old.txt").write_text("to be removed\n")
    (root / "data.bin").write_bytes(bytes(range(256)) * 4)
    (root / "src").mkdir()
    (root / "src" / "util.py").write_text("X = 1\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "app.cpython.pyc").write_bytes(b"\0junk")
    return root


def cli(
    *args: str, stdin: bytes | None = None, check: bool = True
) -> subprocess.CompletedProcess[bytes]:
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli", *args],
        input=stdin if stdin is not None else b"",
        capture_output=True,
        timeout=300,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pyro {args} -> {proc.returncode}\n{proc.stdout!r}\n{proc.stderr!r}")
    return proc


# ------------------------------------------------------------- read and write


def test_round_trips_are_byte_exact(fp: Pyro) -> None:
    task = fp.create_task("debian:12-base").task_id
    blobs = {"empty": b"", "one": b"\xff", "random.bin": os.urandom(1 << 20)}
    for name, data in blobs.items():
        fp.write_task_file(task, f"sub/dir/{name}", data)
    fp.write_task_file(task, "tool.sh", "#!/bin/sh\necho tool\n", mode=0o755)
    for name, data in blobs.items():
        assert fp.read_task_bytes(task, f"/workspace/sub/dir/{name}") == data
    got = fp.exec_task(task, "sha256sum sub/dir/random.bin && ./tool.sh && stat -c %a tool.sh")
    digest = hashlib.sha256(blobs["random.bin"]).hexdigest()
    assert got.stdout.split() == [digest, "sub/dir/random.bin", "tool", "755"]
    # an existing file keeps its mode when written again without one
    fp.write_task_file(task, "tool.sh", "#!/bin/sh\necho tool 2\n")
    assert fp.exec_task(task, "./tool.sh").stdout == "tool 2\n"
    # text and base64 through the model-facing read
    text = fp.read_task_file(task, "tool.sh")
    assert (text.encoding, text.content, text.truncated) == (
        "utf-8",
        "#!/bin/sh\necho tool 2\n",
        False,
    )
    binary = fp.read_task_file(task, "sub/dir/one")
    assert (binary.encoding, binary.content, binary.size) == ("base64", "/w==", 1)
    listing = fp.list_task_files(task, "sub", recursive=True)
    assert {(e.path, e.type) for e in listing.entries} == {
        ("dir", "directory"),
        ("dir/empty", "file"),
        ("dir/one", "file"),
        ("dir/random.bin", "file"),
    }


def test_edit_and_line_ranges(fp: Pyro, tmp_path: Path) -> None:
    task = fp.create_task("debian:12-base", source_path=project(tmp_path / "p")).task_id
    edited = fp.edit_task_file(task, "app.py", "return a - b", "return a + b")
    assert edited.replacements == 1 and "+    return a + b" in edited.diff
    assert fp.exec_task(task, "cat app.py").stdout == "def add(a, b):\n    return a + b\n"
    with pytest.raises(InvalidInputError, match="2 times"):
        fp.edit_task_file(task, "README", "o", "0")
    assert fp.edit_task_file(task, "README", "o", "0", replace_all=True).replacements == 2
    lines = fp.read_task_file(task, "README", start_line=2, end_line=2)
    assert lines.content == "w0rld\n"
    numbered = fp.read_task_file(task, "README", line_numbers=True)
    assert numbered.content.splitlines()[1].split("\t") == ["     2", "w0rld"]


def test_bad_paths_are_clear_errors_and_write_nothing(fp: Pyro, tmp_path: Path) -> None:
    task = fp.create_task("debian:12-base", source_path=project(tmp_path / "p")).task_id
    with pytest.raises(NotFoundError):
        fp.read_task_file(task, "missing.txt")
    with pytest.raises(PyroError, match="directory"):
        fp.read_task_file(task, "src")
    with pytest.raises(PyroError, match="directory"):
        fp.write_task_file(task, "src", "x")
    with pytest.raises(PyroError):
        fp.write_task_file(task, "README/child", "x")  # a parent that is a file
    with pytest.raises(InvalidInputError):
        fp.read_task_file(task, "bad\x00name")
    with pytest.raises(InvalidInputError, match="not found"):
        fp.edit_task_file(task, "README", "nowhere", "x")
    past = fp.read_task_file(task, "README", offset=10_000)
    assert past.content == "" and past.size == len("hello\nworld\n")
    with pytest.raises(NotFoundError):
        fp.read_task_file("task-000000000000", "README")
    # nothing half-written: the workspace lists exactly the seed
    names = fp.exec_task(task, "find . -mindepth 1 | sort").stdout.split()
    assert names == sorted(
        [
            "./README",
            "./app.py",
            "./run.sh",
            "./old.txt",
            "./data.bin",
            "./src",
            "./src/util.py",
            "./__pycache__",
            "./__pycache__/app.cpython.pyc",
        ]
    )


# ------------------------------------------------------------------- diff


def test_diff_applies_to_the_original_folder(fp: Pyro, tmp_path: Path) -> None:
    seed = project(tmp_path / "seed")
    task = fp.create_task("debian:12-base", source_path=seed, exclude=["__pycache__"]).task_id
    fp.edit_task_file(task, "app.py", "a - b", "a + b")
    fp.exec_task(
        task,
        "rm old.txt && chmod +x src/util.py && printf 'new\\n' > 'new file.txt' && "
        "mkdir -p __pycache__ && echo x > __pycache__/more.pyc && "
        "printf '\\000\\001\\002' >> data.bin && ln -s README readme.link",
    )
    result = fp.diff_task(task)
    assert sorted(result.added) == ["new file.txt", "readme.link"]
    assert result.deleted == ["old.txt"]
    assert sorted(result.modified) == ["app.py", "data.bin"]
    assert "src/util.py" in result.mode_changed
    assert "__pycache__" not in result.patch
    target = tmp_path / "apply"
    shutil.copytree(seed, target, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    (target / "fix.patch").write_text(result.patch)
    subprocess.run(["git", "apply", "fix.patch"], cwd=target, check=True)
    (target / "fix.patch").unlink()
    fp.export_task(task, tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / "__pycache__")
    compare = filecmp.dircmp(target, tmp_path / "out")
    assert (compare.left_only, compare.right_only, compare.diff_files) == ([], [], [])
    assert os.readlink(target / "readme.link") == "README"
    assert os.access(target / "src" / "util.py", os.X_OK)
    # the CLI prints the same patch on stdout
    assert cli("task", "diff", task).stdout.decode() == result.patch


def test_a_task_created_empty_diffs_against_empty(fp: Pyro) -> None:
    task = fp.create_task("debian:12-base").task_id
    assert fp.diff_task(task).patch == ""
    fp.write_task_file(task, "hello.txt", "hi\n")
    result = fp.diff_task(task)
    assert result.added == ["hello.txt"] and "+hi" in result.patch


# ------------------------------------------------------------------ export


HOSTILE = r"""
set -e
mkdir -p tree/sub
echo ok > tree/sub/file.txt
ln -s sub/file.txt tree/inside.link
ln -s / tree/root.link
ln -s /etc/passwd tree/passwd.link
ln -s ../../../../etc tree/sub/up.link
mkfifo tree/fifo
mknod tree/null c 1 3
truncate -s 10G tree/sparse.big
printf 'x' > "tree/$(printf 'new\nline')"
printf 'y' > "tree/$(printf 'bad\377name')"
mkdir tree/many && cd tree/many && seq 1 2000 | xargs touch
"""


def test_export_from_a_hostile_guest_stays_in_dest(qp: Pyro, tmp_path: Path) -> None:
    task = qp.create_task("debian:12-base").task_id
    assert qp.exec_task(task, HOSTILE, timeout_seconds=120).exit_code == 0
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "keep").write_text("keep")
    out = tmp_path / "out"
    result = qp.export_task(task, out, path="tree")
    reasons = {s.path: s.reason for s in result.skipped}
    for name in ("root.link", "passwd.link", "sub/up.link"):
        assert reasons[name] == "symlink_escape", reasons
    assert reasons["fifo"] == reasons["null"] == "special_file"
    assert reasons["sparse.big"] == "file_size"
    assert os.readlink(out / "inside.link") == "sub/file.txt"
    assert (out / "sub" / "file.txt").read_text() == "ok\n"
    assert (out / "new\nline").read_bytes() == b"x"
    assert (os.fsencode(out) + b"/bad\xffname") and os.path.exists(
        os.fsencode(out) + b"/bad\xffname"
    )
    assert len(os.listdir(out / "many")) == 2000
    assert sorted(os.listdir(tmp_path)) == ["canary", "out"]
    assert os.listdir(canary) == ["keep"]
    for dirpath, _, files in os.walk(out):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            assert st.st_uid == os.getuid() and not st.st_mode & 0o6000
    # an existing non-empty dest is refused unless overwrite
    with pytest.raises(PyroError, match="overwrite"):
        qp.export_task(task, out, path="tree")
    archive = tmp_path / "tree.tar.gz"
    qp.export_task(task, archive, path="tree/sub")
    with tarfile.open(archive) as tf:
        assert sorted(m.name.lstrip("./") for m in tf.getmembers() if m.isfile()) == ["file.txt"]


def test_export_and_read_at_the_same_time_as_exec(qp: Pyro, tmp_path: Path) -> None:
    task = qp.create_task("debian:12-base").task_id
    qp.write_task_file(task, "f.txt", "content\n")
    done: list[str] = []
    runner = threading.Thread(
        target=lambda: done.append(qp.exec_task(task, "sleep 3; echo slept").stdout)
    )
    runner.start()
    for _ in range(5):
        assert qp.read_task_file(task, "f.txt").content == "content\n"
    runner.join(120)
    assert done == ["slept\n"]


def test_fifty_mib_streams_both_ways_in_bounded_memory(qp: Pyro) -> None:
    task = qp.create_task("debian:12-base").task_id
    chunk = os.urandom(1 << 20)
    digest = hashlib.sha256(chunk * 50).hexdigest()
    before = _rss_kib()
    qp.write_task_file(task, "big.bin", (chunk for _ in range(50)))
    seen = hashlib.sha256()
    qp.read_task_bytes(task, "big.bin", seen.update)
    assert seen.hexdigest() == digest
    assert qp.exec_task(task, "sha256sum big.bin").stdout.split()[0] == digest
    assert _rss_kib() - before < 40_000, "50 MiB went through host memory"


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


# ------------------------------------------------------------------- reset


def test_reset_returns_to_the_seed(fp: Pyro, tmp_path: Path, any_backend: str) -> None:
    seed = project(tmp_path / "seed")
    info = fp.create_task("debian:12-base", source_path=seed)
    task = info.task_id
    fp.exec_task(task, "rm README; echo new > extra.txt; echo changed > app.py; touch /root/mark")
    (seed / "README").write_text("the host copy changed later\n")
    result = fp.reset_task(task)
    assert result.task_id == task and result.workspace_seed_mode == "directory"
    assert result.guest_reverted == (any_backend != "host_compat")
    out = fp.exec_task(task, "cat README; ls; ls /root").stdout.split()
    assert out[:2] == ["hello", "world"]  # the seed, not the host folder now
    assert "extra.txt" not in out and "mark" not in out
    assert fp.read_task_file(task, "app.py").content.startswith("def add")
    assert fp.diff_task(task).patch == ""
    assert fp.status_task(task).detail and "reset" in (fp.status_task(task).detail or "")


# --------------------------------------------------------------------- CLI


def test_cli_read_write_files_export(qp: Pyro, tmp_path: Path, state_dir: Path) -> None:
    del state_dir  # PYRO_STATE_DIR is set for the child processes
    task = cli("task", "create", "debian:12-base").stdout.decode().strip()
    data = os.urandom(100_000) + b"\xff\xfe\x00"
    cli("task", "write", task, "bin/blob", stdin=data)
    assert cli("task", "read", task, "bin/blob").stdout == data
    (tmp_path / "script.sh").write_text("#!/bin/sh\necho from file\n")
    cli("task", "write", task, "script.sh", "--from", str(tmp_path / "script.sh"), "--mode", "755")
    listing = cli("task", "files", task).stdout.decode()
    assert "script.sh" in listing and "0755" in listing
    cli("task", "edit", task, "script.sh", "--old", "from file", "--new", "edited")
    assert cli("task", "exec", task, "--", "./script.sh").stdout == b"edited\n"
    cli("task", "export", task, str(tmp_path / "out"))
    assert (tmp_path / "out" / "bin" / "blob").read_bytes() == data
    missing = cli("task", "read", task, "nope", check=False)
    assert missing.returncode == 125 and b"hint" in missing.stderr
    cli("task", "reset", task)
    assert cli("task", "files", task).stdout == b""


# --------------------------------------------------------------------- MCP


def test_mcp_export_writes_only_where_allowed(qp: Pyro, tmp_path: Path, state_dir: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    async def scenario() -> None:
        params = serve_params(state_dir, "--allow-write", str(allowed), cwd=elsewhere)
        async with mcp_session(params) as s:
            created = structured(
                await s.call_tool("task_create", {"environment": "debian:12-base"})
            )
            task = created["task_id"]
            wrote = await s.call_tool(
                "task_write_file", {"task_id": task, "path": "a.txt", "content": "hi\n"}
            )
            assert not wrote.is_error
            read = structured(
                await s.call_tool("task_read_file", {"task_id": task, "path": "a.txt"})
            )
            assert read["content"] == "hi\n"
            refused = await s.call_tool("task_export", {"task_id": task, "dest": "out"})
            # relative to the first writable root, not the working directory
            assert not refused.is_error
            outside = await s.call_tool(
                "task_export", {"task_id": task, "dest": str(elsewhere / "out")}
            )
            assert outside.is_error
            diff = structured(await s.call_tool("task_diff", {"task_id": task}))
            assert diff["added"] == ["a.txt"]
            await s.call_tool("task_delete", {"task_id": task})

    asyncio.run(scenario())
    assert (allowed / "out" / "a.txt").read_text() == "hi\n"
    assert os.listdir(elsewhere) == []
