"""Tasks with real VMs: seeding, persistence, the CLI as a new user runs it,
reuse from a second process, timeouts, reaping and failure cleanup.

Tests whose subject depends on how /workspace reaches the guest run once per VM
backend usable here (qemu: an ext4 disk the agent mounts; gvisor: a bind-mounted
folder); the rest use the default backend. Each test boots one or two VMs and
keeps guest work tiny. host_compat has its own file (test_host_compat.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pyro_mcp.api import Pyro
from pyro_mcp.errors import InvalidInputError, NotFoundError
from pyro_mcp.records import TaskRecord
from pyro_mcp.state import read_json
from pyro_mcp.workspace.archive import UnsafeSeedError

pytestmark = pytest.mark.vm

NOTE = "remember the milk\n"
SCRIPT = '#!/bin/sh\necho "script ran in $(pwd)"\n'


@pytest.fixture
def tasks(pyro: Pyro, state_dir: Path) -> Iterator[Pyro]:
    """A Pyro on the default backend that deletes every task it left (``pyro``
    deletes the VMs)."""
    yield pyro
    for info in pyro.list_tasks():
        pyro.delete_task(info.task_id)


@pytest.fixture
def btasks(tasks: Pyro, backend: str) -> Pyro:
    """``tasks`` on each VM backend in turn (conftest parametrises ``backend`` and
    puts ``pyro`` on it)."""
    return tasks


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`pyro ...` in its own process, as a user would run it (state dir from env)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pyro {args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def status_mode(state_dir: Path, task_id: str) -> str:
    record = TaskRecord.from_dict(read_json(state_dir / "tasks" / task_id / "task.json"))
    return record.config.execution_mode


def make_project(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "note.txt").write_text(NOTE)
    (root / "script.sh").write_text(SCRIPT)
    (root / "script.sh").chmod(0o755)
    (root / "src" / "empty").mkdir(parents=True)
    (root / "src" / "data.txt").write_text("data\n")
    (root / "link.txt").symlink_to("src/data.txt")
    (root / "srclink").symlink_to("src")
    os.link(root / "src" / "data.txt", root / "hard.txt")
    (root / "suid").write_text("s")
    (root / "suid").chmod(0o4755)
    os.utime(root / "note.txt", (1_500_000_000, 1_500_000_000))
    return root


def make_tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(folder, arcname=".")
    return archive


# --------------------------------------------------------------------------- smoke runs


@pytest.mark.parametrize("kind", ["folder", "tar.gz"])
def test_cli_smoke_as_a_new_user(
    vm_environment: str, state_dir: Path, tmp_path: Path, kind: str, backend: str
) -> None:
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "note.txt").write_text(NOTE)
    source = folder if kind == "folder" else make_tar_gz(folder, tmp_path / "project.tar.gz")

    task_id = cli(
        "--backend", backend, "task", "create", vm_environment, "--source-path", str(source)
    ).stdout.strip()
    assert task_id.startswith("task-")
    try:
        out = cli("task", "exec", task_id, "--", "cat", "note.txt")
        assert out.stdout == NOTE
        status = json.loads(cli("task", "status", task_id, "--json").stdout)
        assert status["backend"] == backend
    finally:
        deleted = cli("task", "delete", task_id)
    assert deleted.stdout.strip() == f"deleted {task_id}"
    again = cli("task", "delete", task_id, "--json", check=False)
    assert again.returncode == 125
    assert json.loads(again.stdout)["error"]["code"] == "not_found"
    assert not any((state_dir / "vms").glob("vm-*"))
    assert not any((state_dir / "tasks").glob("task-*"))


def test_cli_argv_boundaries_exit_codes_and_json(vm_environment: str, state_dir: Path) -> None:
    created = json.loads(cli("task", "create", vm_environment, "--json").stdout)
    task_id = created["task_id"]
    assert created["workspace_seed"]["mode"] == "empty"
    assert created["status"] == "running"
    try:
        ab = cli("task", "exec", task_id, "--", "sh", "-lc", "echo a && echo b")
        assert ab.stdout == "a\nb\n"
        words = cli("task", "exec", task_id, "--", "printf", "%s|", "x y", "", "$HOME")
        assert words.stdout == "x y||$HOME|"
        assert cli("task", "exec", task_id, "--", "sh", "-c", "exit 7", check=False).returncode == 7
        env = cli("task", "exec", task_id, "--env", "A=1 2", "--cwd", "/tmp", "--", "sh", "-c",
                  'echo "$A" "$(pwd)"')  # fmt: skip
        assert env.stdout == "1 2 /tmp\n"
        result = json.loads(cli("task", "exec", task_id, "--json", "--", "pwd").stdout)
        assert result["stdout"] == "/workspace\n"
        assert result["task_id"] == task_id
        assert result["command"] == ["pwd"]
        assert result["execution_mode"] == status_mode(state_dir, task_id)
        assert "cleanup" not in result
        status = json.loads(cli("task", "status", task_id, "--json").stdout)
        assert status["task_id"] == task_id and status["status"] == "running"
        listed = json.loads(cli("task", "list", "--json").stdout)
        assert [t["task_id"] for t in listed["tasks"]] == [task_id]
    finally:
        cli("task", "delete", task_id)


# --------------------------------------------------------------------------- seeded content


def test_seeded_workspace_in_the_guest(btasks: Pyro, vm_environment: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project")
    info = btasks.create_task(vm_environment, source_path=project)
    seed = info.workspace_seed
    assert (seed.mode, seed.source_path, seed.destination) == (
        "directory",
        str(project),
        "/workspace",
    )
    assert seed.entry_count == 9
    assert seed.bytes_written == len(NOTE) + len(SCRIPT) + len("data\n") + len("s")
    assert seed.sha256 is not None and len(seed.sha256) == 64
    tid = info.task_id

    def run(cmd: str) -> str:
        r = btasks.exec_task(tid, cmd)
        assert r.exit_code == 0, r
        return r.stdout

    assert run("./script.sh") == "script ran in /workspace\n"
    assert run("cat link.txt srclink/data.txt") == "data\ndata\n"
    inodes = run("stat -c %i hard.txt src/data.txt").split()
    assert inodes[0] == inodes[1]
    assert run("test -d src/empty && ls -A src/empty | wc -l") == "0\n"
    assert run("stat -c %Y note.txt") == "1500000000\n"
    assert run("stat -c %a suid script.sh") == "755\n755\n"  # setuid dropped, exec bit kept
    assert run("ls -A") == "hard.txt\nlink.txt\nnote.txt\nscript.sh\nsrc\nsrclink\nsuid\n"
    # Files persist across execs, in /workspace and elsewhere in the VM.
    run("echo one > made.txt && mkdir -p deep/er && echo two > deep/er/f && echo x > /root/r")
    assert run("cat made.txt deep/er/f /root/r") == "one\ntwo\nx\n"
    assert btasks.status_task(tid).status == "running"
    assert [t.task_id for t in btasks.list_tasks()] == [tid]


def test_task_reused_from_a_second_process(
    tasks: Pyro, vm_environment: str, tmp_path: Path
) -> None:
    folder = tmp_path / "p"
    folder.mkdir()
    (folder / "note.txt").write_text(NOTE)
    archive = make_tar_gz(folder, tmp_path / "p.tar.gz")
    info = tasks.create_task(vm_environment, source_path=archive)
    assert info.workspace_seed.mode == "tar_archive"
    assert info.workspace_seed.sha256 == hashlib.sha256(archive.read_bytes()).hexdigest()
    out = cli("task", "exec", info.task_id, "--", "sh", "-c", "cat note.txt; echo from-cli > b")
    assert out.stdout == NOTE
    assert tasks.exec_task(info.task_id, ["cat", "b"]).stdout == "from-cli\n"
    # A brand-new SDK object (as a restarted server would make) sees the same task.
    fresh = Pyro(state_dir=os.environ["PYRO_STATE_DIR"])
    assert fresh.status_task(info.task_id).workspace_seed == info.workspace_seed
    assert fresh.exec_task(info.task_id, ["cat", "b"]).stdout == "from-cli\n"


def test_timeout_kills_the_command_and_keeps_the_task(btasks: Pyro, vm_environment: str) -> None:
    info = btasks.create_task(vm_environment)
    r = btasks.exec_task(info.task_id, "echo started > s; sleep 300", timeout_seconds=1)
    assert r.timed_out
    after = btasks.exec_task(info.task_id, "cat s; cat /proc/[0-9]*/comm | grep -c '^sleep$'")
    assert after.stdout == "started\n0\n"
    assert btasks.status_task(info.task_id).status == "running"


def wait_for(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_cancelled_exec_kills_the_command_and_keeps_the_task(
    tasks: Pyro, vm_environment: str
) -> None:
    """Ctrl-C on `pyro task exec` kills the guest command; the task stays usable. Its
    stdin is an endless pipe the command never reads (so the agent's stdin window is
    full and nothing moves): the Ctrl-C is noticed all the same."""
    tid = tasks.create_task(vm_environment).task_id
    endless = subprocess.Popen(["yes"], stdout=subprocess.PIPE)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_mcp.cli", "task", "exec", tid, "--timeout-seconds",
         "600", "--", "sh", "-c", "touch started; exec sleep 300"],
        stdin=endless.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: tasks.exec_task(tid, ["ls", "started"]).exit_code == 0, "the command")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
        endless.kill()
        endless.wait()
    assert proc.returncode == 130
    assert "task is kept" in err

    def sleepers() -> str:
        return tasks.exec_task(tid, "cat /proc/[0-9]*/comm | grep -c '^sleep$'").stdout

    wait_for(lambda: sleepers() == "0\n", "the guest command to be killed", timeout=30)
    assert tasks.status_task(tid).status == "running"


def test_a_lost_vm_is_replaced_and_workspace_kept(btasks: Pyro, vm_environment: str) -> None:
    info = btasks.create_task(vm_environment)
    btasks.exec_task(info.task_id, "echo kept > k && sync")
    assert info.vm_id is not None
    btasks.delete_vm(info.vm_id)
    status = btasks.status_task(info.task_id)
    assert status.status == "stopped" and "next exec" in (status.detail or "")
    r = btasks.exec_task(info.task_id, ["cat", "k"])
    assert r.stdout == "kept\n"
    assert r.vm_id is not None and r.vm_id != info.vm_id
    assert "restarted" in (btasks.status_task(info.task_id).detail or "")


def test_task_vm_runs_the_packaged_agent(
    btasks: Pyro, vm_environment: str, state_dir: Path, backend: str
) -> None:
    """The agent comes from this package (the initramfs for qemu, a read-only bind
    mount for gvisor), never from the environment image, so environments built by
    older versions still run tasks."""
    from pyro_mcp.guest.build import ensure_agent_binary, ensure_initramfs

    info = btasks.create_task(vm_environment)
    vm_dir = state_dir / "vms" / str(info.vm_id)
    launch = json.loads((vm_dir / "launch.json").read_text())
    env = btasks.manager.store.ensure(info.environment)
    if backend == "qemu":
        assert launch["initramfs"] == str(ensure_initramfs(env.kernel.modules))
        assert launch["mounts"] == [
            {"source": "/dev/vdb", "target": "/workspace", "fstype": "ext4", "readonly": False}
        ]
    else:
        config = json.loads((vm_dir / "bundle" / "config.json").read_text())
        sources = {m["destination"]: m.get("source") for m in config["mounts"]}
        assert str(ensure_agent_binary()) in sources.values()
        assert sources["/workspace"] == str(state_dir / "tasks" / info.task_id / "workspace")
    assert btasks.exec_task(info.task_id, ["pwd"]).stdout == "/workspace\n"


# --------------------------------------------------------------------------- failures and reaping


def test_failed_seed_leaves_nothing(
    tasks: Pyro, vm_environment: str, state_dir: Path, tmp_path: Path
) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        ok = tarfile.TarInfo("fine.txt")
        tf.addfile(ok)
        bad = tarfile.TarInfo("../escaped.txt")
        tf.addfile(bad)
    with pytest.raises(UnsafeSeedError, match=r"escaped\.txt.*parent_escape"):
        tasks.create_task(vm_environment, source_path=evil)
    with pytest.raises(InvalidInputError, match="does not exist"):
        tasks.create_task(vm_environment, source_path=tmp_path / "missing")
    assert not (tmp_path / "escaped.txt").exists()
    assert not (state_dir / "escaped.txt").exists()
    assert not any((state_dir / "tasks").glob("task-*"))
    assert not any((state_dir / "vms").glob("vm-*"))
    assert tasks.list_tasks() == []


def test_tasks_are_reaped_at_their_ttl(tasks: Pyro, vm_environment: str, state_dir: Path) -> None:
    info = tasks.create_task(vm_environment, ttl_seconds=10)
    vmm = tasks.manager.records.load(str(info.vm_id)).runtime.vmm
    assert vmm is not None and vmm.alive()
    time.sleep(max(0.0, info.expires_at.timestamp() - time.time()) + 1.0)
    reaped = tasks.reap_expired()
    assert reaped.reasons.get(info.task_id) == "ttl_expired"
    assert not vmm.alive()
    assert not (state_dir / "tasks" / info.task_id).exists()
    assert not (state_dir / "vms" / str(info.vm_id)).exists()
    with pytest.raises(NotFoundError):
        tasks.status_task(info.task_id)


# --------------------------------------------------------------------------- a big seed


@pytest.mark.slow
def test_200mb_seed_reaches_the_guest_intact(
    btasks: Pyro, vm_environment: str, tmp_path: Path
) -> None:
    from test_workspace_seed import make_mixed_tree

    tree = tmp_path / "tree"
    count = make_mixed_tree(tree)
    started = time.monotonic()
    info = btasks.create_task(vm_environment, source_path=tree)
    elapsed = time.monotonic() - started
    seed = info.workspace_seed
    print(f"200 MB task create: {elapsed:.2f} s, seed {seed.seed_ms} ms, {seed.bytes_written} B")
    assert seed.bytes_written >= 200 << 20
    sample = min(tree.rglob("*.bin"), key=lambda p: p.stat().st_size)
    rel = sample.relative_to(tree)
    r = btasks.exec_task(info.task_id, f"md5sum {rel}; find . -type f | wc -l")
    digest = hashlib.md5(sample.read_bytes()).hexdigest()
    assert r.stdout == f"{digest}  {rel}\n{count}\n"


def test_task_exec_stdin(btasks: Pyro, vm_environment: str, tmp_path: Path) -> None:
    """Each VM backend: the SDK streams a file object, the task_exec tool takes text."""
    from pyro_mcp.contract import get_tool

    task = btasks.create_task(vm_environment)
    data = tmp_path / "data.bin"
    data.write_bytes(bytes(range(256)) * 1024)
    with data.open("rb") as f:
        saved = btasks.exec_task(task.task_id, "cat > data.bin && wc -c < data.bin", stdin=f)
    assert saved.stdout.strip() == str(256 * 1024)
    ran = get_tool("task_exec").call(
        btasks, {"task_id": task.task_id, "command": "cmp - data.bin", "stdin": None}
    )
    assert ran.ok and ran.structured["exit_code"] == 1  # an empty stdin differs
    ran = get_tool("task_exec").call(
        btasks, {"task_id": task.task_id, "command": "sort", "stdin": "b\na\n"}
    )
    assert ran.ok and ran.structured["stdout"] == "a\nb\n"
