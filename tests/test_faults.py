"""Faults: processes killed mid-way, broken artifacts, a full disk, a missing QEMU.

Each test breaks one thing for real (SIGKILL, truncation, a tiny tmpfs as the
state folder, a bad ``PYRO_QEMU``) and checks the promise: a clear error, no
VMM outliving its VM, no half-written state file, and a documented way back
(docs/security.md, "Recovery").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import qemu_pids, supervisor_pids, vm_record_fields, wait_until
from pyro_mcp.api import Pyro
from pyro_mcp.commands import ExecOptions
from pyro_mcp.environments.store import EnvironmentStore
from pyro_mcp.errors import (
    BackendUnavailableError,
    GuestProtocolError,
    PyroError,
    StateError,
    VMStateError,
)
from pyro_mcp.manager import VMManager
from pyro_mcp.progress import ProgressEvent
from pyro_mcp.records import TaskRecord
from pyro_mcp.state import ProcessId, read_json

pytestmark = pytest.mark.vm

PYRO = Path(sys.executable).parent / "pyro"


@pytest.fixture(autouse=True)
def _qemu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Faults of the microVM backend: pin QEMU (CLI subprocesses inherit it)."""
    monkeypatch.setenv("PYRO_BACKEND", "qemu")


@pytest.fixture
def qpyro(vm_environment: str, state_dir: Path) -> Iterator[Pyro]:
    client = Pyro(state_dir=state_dir, backend="qemu")
    yield client
    for info in client.list_vms():
        with contextlib.suppress(PyroError):
            client.delete_vm(info.vm_id)
    for task in client.list_tasks():
        with contextlib.suppress(PyroError):
            client.delete_task(task.task_id)


# --------------------------------------------------------------------- helpers


def records(state_dir: Path) -> dict[str, dict[str, Any]]:
    """Every VM record; each must parse (records are written atomically)."""
    out = {}
    for vm_json in (state_dir / "vms").glob("vm-*/vm.json"):
        with contextlib.suppress(FileNotFoundError):  # removed while we looked
            out[vm_json.parent.name] = vm_record_fields(vm_json)
    return out


def assert_clean(state_dir: Path) -> None:
    """No VMM, no supervisor, no VM folder, no temporary file left in the state dir."""
    wait_until(
        lambda: not qemu_pids(state_dir) and not supervisor_pids(state_dir),
        20,
        "every QEMU and supervisor of the test to exit",
    )
    assert list(state_dir.glob("vms/vm-*")) == []
    assert list(state_dir.rglob("*.tmp")) == []


def record_of(state_dir: Path, vm_id: str) -> dict[str, Any]:
    return vm_record_fields(state_dir / "vms" / vm_id / "vm.json")


def pid_alive(data: dict[str, Any] | None) -> bool:
    pid = ProcessId.from_dict(data)
    return pid is not None and pid.alive()


def sparse_copy(src: Path, dst: Path) -> None:
    """Copy keeping holes (the root image is mostly empty space)."""
    subprocess.run(["cp", "-a", "--sparse=always", str(src), str(dst)], check=True)


def started_vm(pyro: Pyro, environment: str) -> str:
    info = pyro.create_vm(environment)
    pyro.start_vm(info.vm_id)
    return info.vm_id


# ------------------------------------------------------ SIGKILL of `pyro run`


@pytest.mark.parametrize("stage", ["boot", "exec"])
def test_sigkill_of_pyro_run(
    vm_environment: str, state_dir: Path, stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``pyro run`` killed while the guest boots (cold, so the window is seconds wide) or
    while the command runs: the VM's supervisor notices its owner is gone, kills the
    VMM and removes the VM; every record seen on the way parsed; nothing is left."""
    env = {**os.environ, "PYRO_STATE_DIR": str(state_dir)}
    if stage == "boot":
        env["PYRO_SNAPSHOTS"] = "0"
    proc = subprocess.Popen(
        [str(PYRO), "run", vm_environment, "--", "sleep", "60"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wanted = "starting" if stage == "boot" else "running"

        def at_stage() -> bool:
            assert proc.poll() is None, "pyro run ended before it was killed"
            return any(r["status"] == wanted for r in records(state_dir).values())

        wait_until(at_stage, 120, f"a VM {wanted}")
        if stage == "exec":
            time.sleep(0.5)  # the command is running in the guest
        proc.send_signal(signal.SIGKILL)
        proc.wait()

        def gone() -> bool:
            records(state_dir)  # parses every record still there
            return not qemu_pids(state_dir) and not supervisor_pids(state_dir)

        wait_until(gone, 120, "the orphaned VM's supervisor and VMM to exit")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    Pyro(state_dir=state_dir)  # reaps whatever a dead process left
    assert_clean(state_dir)


def test_sigkill_of_task_exec_keeps_the_task(qpyro: Pyro, vm_environment: str) -> None:
    """Killing ``pyro task exec`` mid-command cancels that command; the task (and its
    files) are still there and usable."""
    task = qpyro.create_task(vm_environment)
    assert qpyro.exec_task(task.task_id, "echo kept > /workspace/f && sync").exit_code == 0
    proc = subprocess.Popen(
        [str(PYRO), "task", "exec", task.task_id, "--", "sleep", "300"],
        env={**os.environ, "PYRO_STATE_DIR": str(qpyro.manager.state_root)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    find_sleep = "grep -lx sleep /proc/[0-9]*/comm 2>/dev/null | wc -l"
    try:
        wait_until(
            lambda: qpyro.exec_task(task.task_id, find_sleep).stdout.strip() == "1",
            60,
            "the sleep to run in the task",
        )
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    wait_until(
        lambda: qpyro.exec_task(task.task_id, find_sleep).stdout.strip() == "0",
        30,
        "the cancelled command to be killed in the guest",
    )
    assert qpyro.status_task(task.task_id).status == "running"
    assert qpyro.exec_task(task.task_id, "cat /workspace/f").stdout == "kept\n"


# -------------------------------------------------- SIGKILL of the supervisor


def test_sigkill_of_the_supervisor_takes_the_vmm_with_it(
    qpyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    vm_id = started_vm(qpyro, vm_environment)
    rec = record_of(state_dir, vm_id)
    assert pid_alive(rec["supervisor"]) and pid_alive(rec["vmm"])
    os.kill(int(rec["supervisor"]["pid"]), signal.SIGKILL)
    # PR_SET_PDEATHSIG: the kernel kills QEMU when its parent dies.
    wait_until(lambda: not pid_alive(rec["vmm"]), 15, "QEMU to die with its supervisor")
    status = qpyro.status_vm(vm_id)
    assert status.status == "stopped"
    with pytest.raises(VMStateError, match="not running"):
        qpyro.exec_vm(vm_id, "true")
    qpyro.delete_vm(vm_id)
    assert_clean(state_dir)


# ------------------------------------------------------- SIGKILL of the VMM


def test_sigkill_of_qemu_under_a_running_vm(
    qpyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    """A command in flight gets a clear error at once, status says stopped and why,
    later execs are refused, and delete cleans up."""
    m = qpyro.manager
    vm_id = started_vm(qpyro, vm_environment)
    rec = record_of(state_dir, vm_id)
    outcome: dict[str, Any] = {}

    def in_flight() -> None:
        try:
            outcome["result"] = m.exec(vm_id, "sleep 300", ExecOptions.checked(timeout_seconds=600))
        except PyroError as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=in_flight)
    thread.start()
    time.sleep(1.0)  # the command is running
    os.kill(int(rec["vmm"]["pid"]), signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive(), "the exec did not notice its VM died"
    assert isinstance(outcome.get("error"), GuestProtocolError | VMStateError), outcome
    wait_until(lambda: qpyro.status_vm(vm_id).status == "stopped", 15, "status to say stopped")
    assert "vmm_exited" in (qpyro.status_vm(vm_id).detail or "")
    wait_until(lambda: not pid_alive(rec["supervisor"]), 15, "the supervisor to exit")
    with pytest.raises(VMStateError):
        m.exec(vm_id, "true")
    qpyro.delete_vm(vm_id)
    assert_clean(state_dir)


def test_sigkill_of_qemu_under_a_task(qpyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    """The task reports its VM stopped (and why); the next exec brings up a new VM on
    the same /workspace, so synced files survive; delete removes everything."""
    task = qpyro.create_task(vm_environment)
    assert qpyro.exec_task(task.task_id, "echo precious > /workspace/f && sync").exit_code == 0
    vm_id = qpyro.status_task(task.task_id).vm_id
    assert vm_id is not None
    rec = record_of(state_dir, vm_id)
    os.kill(int(rec["vmm"]["pid"]), signal.SIGKILL)
    wait_until(
        lambda: qpyro.status_task(task.task_id).status == "stopped", 15, "the task to say stopped"
    )
    assert "vmm_exited" in (qpyro.status_task(task.task_id).detail or "")
    again = qpyro.exec_task(task.task_id, "cat /workspace/f")
    assert (again.exit_code, again.stdout) == (0, "precious\n")
    assert again.vm_id != vm_id
    assert qpyro.status_task(task.task_id).status == "running"
    qpyro.delete_task(task.task_id)
    assert qpyro.list_tasks() == []
    assert_clean(state_dir)
    assert list((state_dir / "tasks").glob("task-*")) == []


# ---------------------------------------------------- a damaged environment


@pytest.mark.slow
def test_truncated_root_image_is_detected_and_rebuilt(
    vm_environment: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A private copy of the cache (the shared one is never touched) with its root image
    cut in half: the store reports the damage, rebuilds (here by copying the intact
    image back, standing in for the 30-60 s debootstrap) and a VM boots from it."""
    shared = EnvironmentStore()
    original = shared.ensure(vm_environment)
    before = original.rootfs.stat()
    private = Path(tempfile.mkdtemp(prefix="pyro-cache-"))
    try:
        for sub in ("kernels", "agent", "initramfs"):
            if (shared.root / sub).exists():
                shutil.copytree(shared.root / sub, private / sub, symlinks=True)
        install = private / "environments" / original.path.name
        install.parent.mkdir()
        sparse_copy(original.path, install)
        monkeypatch.setenv("PYRO_CACHE_DIR", str(private))
        monkeypatch.setenv("PYRO_SNAPSHOTS", "0")  # no 512 MiB snapshot in the copy

        damaged = install / original.rootfs.name
        damaged.chmod(0o644)
        with damaged.open("r+b") as fh:
            fh.truncate(before.st_size // 2)
        rebuilt: list[Path] = []

        def builder(spec: Any, image: Path, progress: Any) -> dict[str, Any]:
            rebuilt.append(image)
            sparse_copy(original.rootfs, image)
            return {"rebuilt_from": str(original.rootfs)}

        store = EnvironmentStore(private, builder=builder)
        assert store.inspect(vm_environment, verify=True).problems
        events: list[ProgressEvent] = []
        manager = VMManager(state_root=state_dir, store=store, backend="qemu")
        result = manager.run(vm_environment, "cat /etc/debian_version", progress=events.append)
        assert result.exit_code == 0 and result.stdout.strip()
        assert len(rebuilt) == 1
        assert any(e.stage == "verify" for e in events)
        assert not store.inspect(vm_environment, verify=True).problems
        # The shared cache other runs use was never touched.
        after = original.rootfs.stat()
        assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
            before.st_size,
            before.st_mtime_ns,
            before.st_ino,
        )
    finally:
        shutil.rmtree(private, ignore_errors=True)
    assert_clean(state_dir)


# ------------------------------------------------ a full disk in the state dir


@pytest.fixture
def small_state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A 4 MiB tmpfs as PYRO_STATE_DIR (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs as the state folder needs root")
    path = Path(tempfile.mkdtemp(prefix="pyro-full-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        path.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    monkeypatch.setenv("PYRO_STATE_DIR", str(path))
    try:
        yield path
    finally:
        for pid in qemu_pids(path) + supervisor_pids(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not qemu_pids(path), 15, "QEMU to exit before unmounting")
        subprocess.run(["umount", "-l", str(path)], check=False)
        shutil.rmtree(path, ignore_errors=True)


def fill(path: Path, leave_bytes: int) -> Path:
    """Fill the filesystem of ``path`` until about ``leave_bytes`` are free."""
    filler = path / "filler"
    free = shutil.disk_usage(path).free
    with filler.open("ab") as fh, contextlib.suppress(OSError):
        fh.write(b"\0" * max(0, free - leave_bytes))
    return filler


def test_full_state_disk(vm_environment: str, small_state_dir: Path) -> None:
    state = small_state_dir
    pyro = Pyro(state_dir=state, backend="qemu")
    filler = fill(state, 0)
    # No room at all: a clear StateError, and nothing half-written.
    for attempt in (
        lambda: pyro.create_vm(vm_environment),
        lambda: pyro.run_in_vm(vm_environment, "true"),
    ):
        with pytest.raises(StateError) as caught:
            attempt()
        assert "full" in caught.value.message and caught.value.hint
    assert list((state / "vms").glob("vm-*")) == []
    assert list(state.rglob("*.tmp")) == []

    # Room to boot but not for what the guest writes: the guest sees an I/O error
    # (QEMU reports it instead of pausing the VM) and the VM goes on answering.
    filler.unlink()
    fill(state, 2 << 20)
    vm_id = started_vm(pyro, vm_environment)
    m = pyro.manager
    out = m.exec(
        vm_id,
        "dd if=/dev/zero of=/root/big bs=1M count=32 conv=fsync",
        ExecOptions.checked(timeout_seconds=60),
    )
    assert not out.timed_out
    assert out.exit_code != 0 and b"Input/output error" in out.stderr, out.stderr
    alive = m.exec(vm_id, "echo alive", ExecOptions.checked(timeout_seconds=60))
    assert alive.stdout == b"alive\n"
    for rec in records(state).values():  # every record still parses
        assert rec["status"] in ("created", "running")
    pyro.delete_vm(vm_id)

    # Recovery: free space, and the next run works.
    (state / "filler").unlink()
    assert pyro.run_in_vm(vm_environment, "echo ok").stdout == "ok\n"
    assert_clean(state)


# ------------------------------------------------------------ QEMU goes away


def test_missing_qemu(
    qpyro: Pyro, vm_environment: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A running VM does not need the binary any more.
    running = started_vm(qpyro, vm_environment)
    parked = qpyro.create_vm(vm_environment).vm_id

    monkeypatch.setenv("PYRO_QEMU", str(state_dir / "no-such-qemu"))
    with pytest.raises(BackendUnavailableError) as caught:
        qpyro.run_in_vm(vm_environment, "true")
    assert "PYRO_QEMU" in caught.value.message and caught.value.hint
    with pytest.raises(BackendUnavailableError):
        qpyro.start_vm(parked)
    assert qpyro.status_vm(parked).status == "created"
    assert qpyro.manager.exec(running, "echo still").stdout == b"still\n"

    cli = subprocess.run(
        [str(PYRO), "run", vm_environment, "--", "true"],
        env={**os.environ, "PYRO_STATE_DIR": str(state_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 125
    assert "PYRO_QEMU" in cli.stderr and "Traceback" not in cli.stderr

    monkeypatch.delenv("PYRO_QEMU")
    path = os.environ["PATH"]
    monkeypatch.setenv("PATH", str(state_dir))  # nothing on PATH
    with pytest.raises(BackendUnavailableError) as caught:
        qpyro.create_vm(vm_environment)
    assert caught.value.hint is not None and "apt-get install qemu-system-x86" in caught.value.hint

    # Recovery: QEMU back, the parked VM starts.
    monkeypatch.setenv("PATH", path)
    assert qpyro.start_vm(parked).status == "running"
    qpyro.delete_vm(parked)
    qpyro.delete_vm(running)
    assert [v for v in qpyro.list_vms()] == []
    assert_clean(state_dir)


def task_records(state_dir: Path) -> dict[str, TaskRecord]:
    """The task records on disk, each read and checked as pyro reads it."""
    out = {}
    for task_json in (state_dir / "tasks").glob("task-*/task.json"):
        with contextlib.suppress(FileNotFoundError):
            out[task_json.parent.name] = TaskRecord.from_dict(read_json(task_json))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["seed", "boot"])
def test_sigkill_of_task_create(
    qpyro: Pyro, vm_environment: str, state_dir: Path, tmp_path: Path, stage: str
) -> None:
    """``pyro task create`` killed while it seeds /workspace or while the task's VM boots:
    the next pyro call reaps the half-made task (and its VM); a task that existed
    before is untouched and usable."""
    existing = qpyro.create_task(vm_environment)
    assert qpyro.exec_task(existing.task_id, "echo before > /workspace/f && sync").exit_code == 0
    source = tmp_path / "src"
    for i in range(40):
        sub = source / f"d{i}"
        sub.mkdir(parents=True)
        for j in range(250):
            (sub / f"f{j}").write_text(f"{i}-{j}\n")
    env = {**os.environ, "PYRO_STATE_DIR": str(state_dir)}
    if stage == "boot":
        env["PYRO_SNAPSHOTS"] = "0"  # a cold boot: seconds to hit
    proc = subprocess.Popen(
        [str(PYRO), "task", "create", vm_environment, "--source-path", str(source)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def new_tasks() -> dict[str, TaskRecord]:
        return {k: v for k, v in task_records(state_dir).items() if k != existing.task_id}

    def at_stage() -> bool:
        assert proc.poll() is None, "task create finished before it was killed"
        if stage == "seed":
            return any(r.runtime.status == "creating" for r in new_tasks().values())
        vms = records(state_dir)
        return any(r["status"] == "starting" for r in vms.values())

    try:
        wait_until(at_stage, 120, f"task create to reach {stage}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert all(r.runtime.status == "creating" for r in new_tasks().values())  # all parse

    reaped = Pyro(state_dir=state_dir, reap=False).reap_expired()  # any later pyro call does
    assert set(reaped.reasons.values()) == {"create_interrupted"}
    assert new_tasks() == {}
    tasks = qpyro.list_tasks()
    assert [t.task_id for t in tasks] == [existing.task_id]
    assert qpyro.exec_task(existing.task_id, "cat /workspace/f").stdout == "before\n"
    vm_ids = {v.vm_id for v in qpyro.list_vms()}
    assert vm_ids == {qpyro.status_task(existing.task_id).vm_id}
    qpyro.delete_task(existing.task_id)
    assert_clean(state_dir)
