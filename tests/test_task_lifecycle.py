"""Task names, id prefixes, multi-delete, prune, console logs and the MCP not-found hint.

Most tests work on records alone (written by the record store the managers use,
no guest started); the name tests run real host_compat tasks (marked ``vm``).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import wait_until
from pyro_mcp import limits
from pyro_mcp.api import Pyro
from pyro_mcp.contract.tools import get_tool
from pyro_mcp.errors import InvalidInputError, NotFoundError
from pyro_mcp.records import TaskConfig, TaskRecord, TaskRuntime, VMConfig, VMRecord, VMRuntime
from pyro_mcp.state import ProcessId


def cli(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pyro {args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def fake_task(
    pyro: Pyro,
    task_id: str,
    *,
    name: str | None = None,
    ttl: float = 3600,
    backend: str = "host_compat",
    status: str = "ready",
    workspace: bool = True,
    vm_id: str | None = None,
    creator: ProcessId | None = None,
) -> str:
    """A task's record (and workspace folder) as a create leaves it; no guest."""
    folder = pyro.tasks.records.root / task_id
    folder.mkdir(parents=True)
    if workspace:
        (folder / "workspace").mkdir()
    now = time.time()
    config = TaskConfig(
        task_id=task_id,
        environment="debian:12",
        vcpu_count=1,
        mem_mib=512,
        network=False,
        ttl_seconds=int(ttl),
        created_at=now,
        expires_at=now + ttl,
        backend=backend,
        execution_mode="host_compat",
        name=name,
    )
    runtime = TaskRuntime(status=status, vm_id=vm_id, creator=creator)  # type: ignore[arg-type]
    pyro.tasks.records.save(TaskRecord(config, runtime))
    return task_id


@pytest.fixture
def client(state_dir: Path) -> Pyro:
    return Pyro(state_dir=state_dir, reap=False)


# ------------------------------------------------------------------ names, records


def test_task_names_are_checked() -> None:
    for good in ("api-tests", "build.2", "x", "a_b", "deploy"):
        assert limits.check_task_name(good) == good
    for bad in ("", "Upper", "-x", "has space", "a" * 64, "task-x", "vm-1", "3fa", "42", 7):
        with pytest.raises(InvalidInputError):
            limits.check_task_name(bad)


def test_records_without_a_name_still_load(client: Pyro) -> None:
    fake_task(client, "task-0123456789ab")
    path = client.tasks.records.root / "task-0123456789ab" / "task.json"
    data = json.loads(path.read_text())
    del data["config"]["name"]  # as written before names existed
    path.write_text(json.dumps(data))
    info = client.status_task("task-0123456789ab")
    assert info.name is None


def test_names_and_prefixes_resolve(client: Pyro) -> None:
    fake_task(client, "task-3fa000000001", name="api-tests")
    fake_task(client, "task-3fb000000002")
    fake_task(client, "task-777000000003")
    resolve = client.resolve_task
    assert resolve("api-tests") == "task-3fa000000001"
    assert resolve("task-3fa") == "task-3fa000000001"
    assert resolve("3fa") == "task-3fa000000001"
    assert resolve("7") == "task-777000000003"
    assert client.status_task("api-tests").name == "api-tests"
    assert client.status_task("3fb").task_id == "task-3fb000000002"

    with pytest.raises(InvalidInputError) as ambiguous:
        resolve("task-3f")
    assert "task-3fa000000001" in ambiguous.value.message
    assert "task-3fb000000002" in ambiguous.value.message
    assert ambiguous.value.details["candidates"] == ["task-3fa000000001", "task-3fb000000002"]

    for unknown in ("abc", "task-abc", "no-such-name"):
        with pytest.raises(NotFoundError) as missing:
            resolve(unknown)
        assert "pyro task list" in (missing.value.hint_for("cli") or "")
        assert "list_tasks()" in (missing.value.hint_for("sdk") or "")
        assert "task_list" in (missing.value.hint_for("mcp") or "")
    with pytest.raises(InvalidInputError):
        resolve("../../etc")

    ambiguous_cli = cli("task", "status", "3f", check=False)
    assert ambiguous_cli.returncode == 125
    assert "task-3fa000000001" in ambiguous_cli.stderr
    assert "task-3fb000000002" in ambiguous_cli.stderr
    shown = cli("task", "status", "api-tests").stdout
    assert "task-3fa000000001" in shown and "name:         api-tests" in shown
    listed = cli("task", "list").stdout
    assert "api-tests" in listed


# ------------------------------------------------------------------ MCP


def test_mcp_not_found_hint_names_task_list(client: Pyro) -> None:
    outcome = get_tool("task_status").call(client, {"task_id": "task-000000000000"})
    assert not outcome.ok
    error = outcome.structured["error"]
    assert error["code"] == "not_found"
    assert "task_list" in error["hint"]
    assert "pyro task list" not in outcome.to_json()
    assert "task_list" in outcome.text

    fake_task(client, "task-5ab000000001", name="named")
    for ref in ("named", "5ab", "task-5ab"):
        found = get_tool("task_status").call(client, {"task_id": ref})
        assert found.ok, found.text
        assert found.structured["task_id"] == "task-5ab000000001"
    schema = get_tool("task_exec").input_schema()
    assert "name" in schema["properties"]["task_id"]["description"]
    assert "name" in get_tool("task_create").input_schema()["properties"]


# ------------------------------------------------------------------ delete, prune


def test_delete_several_and_force(client: Pyro, state_dir: Path) -> None:
    fake_task(client, "task-aaa000000001", name="one")
    fake_task(client, "task-bbb000000002")
    fake_task(client, "task-ccc000000003")
    out = cli("task", "delete", "one", "bbb", "task-000000000000", check=False)
    assert out.returncode == 125
    assert out.stdout.split() == ["deleted", "task-aaa000000001", "deleted", "task-bbb000000002"]
    assert "task-000000000000 does not exist" in out.stderr
    forced = cli("task", "delete", "--force", "ccc", "gone-name", "task-000000000000", "--json")
    assert json.loads(forced.stdout) == {"deleted": ["task-ccc000000003"], "errors": []}
    assert cli("task", "delete", "-f", "task-000000000000").returncode == 0
    assert not any((state_dir / "tasks").glob("task-*"))
    # the SDK still deletes one id, and a second delete is not_found
    fake_task(client, "task-ddd000000004")
    assert client.delete_task("ddd").task_id == "task-ddd000000004"
    with pytest.raises(NotFoundError):
        client.delete_task("task-ddd000000004")


def test_prune_removes_what_cannot_run_again(client: Pyro, state_dir: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    fake_task(client, "task-000000000001", ttl=-1)  # past its TTL
    fake_task(client, "task-000000000002", workspace=False)
    fake_task(client, "task-000000000003", backend="no-such-backend")
    fake_task(
        client,
        "task-000000000004",
        status="creating",
        creator=ProcessId(dead.pid, 1),  # not a live process
    )
    kept = fake_task(client, "task-000000000005", name="keep-me")
    # a VM task whose VM is gone: stopped, but its next exec starts a new VM
    stopped = fake_task(
        client, "task-000000000006", backend="qemu", status="running", vm_id="vm-000000000009"
    )
    (state_dir / "tasks" / stopped / "workspace").rmdir()
    (state_dir / "tasks" / stopped / "workspace.img").write_bytes(b"")
    expected = {
        "task-000000000001": "ttl_expired",
        "task-000000000002": "workspace_missing",
        "task-000000000003": "backend_unknown",
        "task-000000000004": "create_interrupted",
    }

    dry = json.loads(cli("task", "prune", "--dry-run", "--json").stdout)
    assert dry == {"pruned": sorted(expected), "reasons": expected, "dry_run": True}
    assert len(list((state_dir / "tasks").glob("task-*"))) == 6

    text = cli("task", "prune").stdout
    assert "removed task-000000000002 (workspace_missing)" in text
    left = sorted(p.name for p in (state_dir / "tasks").glob("task-*"))
    assert left == [kept, stopped]
    assert client.prune_tasks().pruned == []


# ------------------------------------------------------------------ logs


def fake_vm(client: Pyro, vm_id: str, supervisor: ProcessId | None, console: str) -> Path:
    folder = client.manager.records.root / vm_id
    folder.mkdir(parents=True)
    now = time.time()
    config = VMConfig(
        vm_id=vm_id,
        environment="debian:12",
        vcpu_count=1,
        mem_mib=512,
        network=False,
        ttl_seconds=3600,
        created_at=now,
        expires_at=now + 3600,
        backend="qemu",
        acceleration="tcg",
    )
    client.manager.records.save(
        VMRecord(config, VMRuntime(status="running", supervisor=supervisor))
    )
    (folder / "console.log").write_text(console)
    return folder / "console.log"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "120"])
    yield proc
    proc.kill()
    proc.wait()


def test_logs_print_and_follow_until_the_vm_stops(
    client: Pyro, sleeper: subprocess.Popen[bytes]
) -> None:
    supervisor = ProcessId.of(sleeper.pid)
    console = fake_vm(client, "vm-0000000000aa", supervisor, "boot 1\nboot 2\nboot 3\n")
    fake_task(client, "task-0000000000bb", name="logged", vm_id="vm-0000000000aa")
    fake_task(client, "task-0000000000cc", name="no-vm")

    assert cli("logs", "vm-0000000000aa").stdout == "boot 1\nboot 2\nboot 3\n"
    assert json.loads(cli("logs", "vm-00", "--json").stdout)["log"].startswith("boot 1")
    assert cli("logs", "logged", "--lines", "2").stdout == "boot 2\nboot 3\n"
    assert cli("logs", "vm-00").stdout.startswith("boot 1")
    assert json.loads(cli("vm", "status", "vm-0000", "--json").stdout)["vm_id"] == "vm-0000000000aa"
    assert client.console_log("task-0000000000bb", lines=1) == "boot 3\n"
    no_vm = cli("logs", "no-vm", check=False)
    assert no_vm.returncode == 125 and "no VM" in no_vm.stderr
    fake_task(client, "task-0000000000dd", name="removed-vm", vm_id="vm-0000000000dd")
    gone = cli("logs", "task-0000000000dd", check=False)
    assert gone.returncode == 125 and "is gone" in gone.stderr
    missing = cli("logs", "vm-0000000000ff", check=False)
    assert missing.returncode == 125 and "pyro vm list" in missing.stderr

    follower = subprocess.Popen(
        [sys.executable, "-m", "pyro_mcp.cli", "logs", "logged", "--follow", "-n", "1"],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ},
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "boot 3\n"
        with console.open("a") as fh:
            fh.write("later line\n")
        assert follower.stdout.readline() == "later line\n"
        with console.open("a") as fh:
            fh.write("last words\n")
        sleeper.kill()  # the VM's supervisor is gone: the VM has ended
        sleeper.wait()
        assert follower.stdout.readline() == "last words\n"
        wait_until(lambda: follower.poll() is not None, 30, "logs --follow to end")
        assert follower.returncode == 0
    finally:
        follower.kill()
        follower.wait()


# ------------------------------------------------------------------ real host_compat tasks


@pytest.mark.vm
def test_names_work_everywhere(hc_environment: str, state_dir: Path) -> None:
    pyro = Pyro(state_dir=state_dir, backend="host_compat")
    info = pyro.create_task(hc_environment, name="web-app")
    try:
        assert info.name == "web-app"
        with pytest.raises(InvalidInputError) as dup:
            pyro.create_task(hc_environment, name="web-app")
        assert info.task_id in dup.value.message
        with pytest.raises(InvalidInputError):
            pyro.create_task(hc_environment, name="Bad Name")
        assert [t.task_id for t in pyro.list_tasks()] == [info.task_id]  # nothing left over

        # SDK
        assert pyro.exec_task("web-app", "echo hi > f.txt").exit_code == 0
        assert pyro.read_task_file("web-app", "f.txt").content == "hi\n"
        assert pyro.status_task("web-app").task_id == info.task_id
        # CLI
        base = ("--backend", "host_compat")
        assert cli(*base, "task", "exec", "web-app", "--", "cat", "f.txt").stdout == "hi\n"
        assert cli(*base, "task", "read", "web-app", "f.txt").stdout.startswith("hi")
        status = json.loads(cli(*base, "task", "status", "web-app", "--json").stdout)
        assert status["name"] == "web-app"
        dup_cli = cli(*base, "task", "create", hc_environment, "--name", "web-app", check=False)
        assert dup_cli.returncode == 125 and info.task_id in dup_cli.stderr
        # MCP
        ran = get_tool("task_exec").call(pyro, {"task_id": "web-app", "command": "cat f.txt"})
        assert ran.ok and ran.structured["stdout"] == "hi\n"
        assert ran.structured["task_id"] == info.task_id
        read = get_tool("task_read_file").call(pyro, {"task_id": "web-app", "path": "f.txt"})
        assert read.ok, read.text
        deleted = get_tool("task_delete").call(pyro, {"task_id": "web-app"})
        assert deleted.ok and deleted.structured["task_id"] == info.task_id
        # the name is free again
        again = pyro.create_task(hc_environment, name="web-app")
        assert cli(*base, "task", "delete", "web-app").stdout == f"deleted {again.task_id}\n"
    finally:
        for t in pyro.list_tasks():
            pyro.delete_task(t.task_id)


@pytest.mark.vm
def test_logs_of_a_real_task_vm(pyro: Pyro) -> None:
    """One boot: --follow sees a line the guest writes to its console, `pyro logs`
    then prints it, and --follow ends when the VM stops."""
    from conftest import TEST_ENV

    info = pyro.create_task(TEST_ENV, name="console-test")
    try:
        if info.vm_id is None or info.backend != "qemu":
            pytest.skip(f"the task runs on {info.backend}, not a qemu VM")
        cli("logs", "console-test")  # may be empty: a VM restored from a snapshot is quiet
        follower = subprocess.Popen(
            [sys.executable, "-m", "pyro_mcp.cli", "logs", "console-test", "-f", "-n", "20"],
            stdout=subprocess.PIPE,
        )
        try:
            assert follower.stdout is not None
            out_fd = follower.stdout.fileno()
            seen = bytearray()

            def read_until(marker: str) -> None:
                """Read the follower's output until ``marker`` (never block past 120 s)."""
                deadline = time.monotonic() + 120
                while marker.encode() not in seen:
                    left = deadline - time.monotonic()
                    assert left > 0, f"logs --follow did not show {marker}: {bytes(seen)!r}"
                    ready, _, _ = select.select([out_fd], [], [], left)
                    if ready:
                        chunk = os.read(out_fd, 65536)
                        assert chunk, "logs --follow ended before the marker"
                        seen.extend(chunk)

            # The first line may land before the follower starts (then its last 20
            # lines show it); the second is written once it is surely following.
            for marker in ("pyro-logs-marker-1", "pyro-logs-marker-2"):
                ran = pyro.exec_task("console-test", f"echo {marker} > /dev/console")
                assert ran.exit_code == 0, ran.stderr
                read_until(marker)
            assert "pyro-logs-marker-2" in cli("logs", "console-test", "--lines", "20").stdout
            pyro.stop_vm(info.vm_id)
            wait_until(lambda: follower.poll() is not None, 60, "logs --follow to end")
            assert follower.returncode == 0
        finally:
            follower.kill()
            follower.wait()
    finally:
        pyro.delete_task(info.task_id)
