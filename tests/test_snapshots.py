"""Warm start on real VMs: damaged snapshots are re-taken (never restored), and VMs
restored from one snapshot are independent machines (disk, randomness, clock)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyro_mcp.api import Pyro
from pyro_mcp.progress import ProgressEvent
from pyro_mcp.vmm import get_backend
from pyro_mcp.vmm import qemu_snapshot as snapshots
from pyro_mcp.vmm.base import VMPaths

pytestmark = pytest.mark.vm


@pytest.fixture(autouse=True)
def _qemu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """These are microVM tests: pin the QEMU backend whatever `auto` would choose here
    (CLI subprocesses inherit it)."""
    monkeypatch.setenv("PYRO_BACKEND", "qemu")


@pytest.fixture
def private_snapshots(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A snapshot folder of this test's own, so damaging it never touches the shared
    cache other runs restore from. (Kept short: it holds the snapshot VM's sockets.)"""
    root = Path(tempfile.mkdtemp(prefix="pyro-snap-"))
    monkeypatch.setattr(snapshots, "snapshots_root", lambda: root)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def only_snapshot(root: Path) -> Path:
    found = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
    assert len(found) == 1, found
    return found[0]


def flip_byte(path: Path, keep_mtime: bool) -> None:
    st = path.stat()
    path.chmod(0o600)
    with path.open("r+b") as fh:
        fh.seek(st.st_size // 2)
        byte = fh.read(1)
        fh.seek(st.st_size // 2)
        fh.write(bytes([byte[0] ^ 0xFF]))
    path.chmod(0o400)
    if keep_mtime:  # defeat the cheap size/mtime/inode check: only the digest can tell
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_damaged_snapshot_is_retaken_not_restored(
    vm_environment: str, state_dir: Path, private_snapshots: Path
) -> None:
    events: list[ProgressEvent] = []
    pyro = Pyro(state_dir=state_dir, progress=events.append)

    def run_and_count_snapshots() -> int:
        events.clear()
        result = pyro.run_in_vm(vm_environment, "echo ok")
        assert (result.exit_code, result.stdout, result.boot) == (0, "ok\n", "restored")
        return sum(e.stage == "snapshot" and e.message == "snapshot saved" for e in events)

    assert run_and_count_snapshots() == 1  # first use takes the snapshot
    directory = only_snapshot(private_snapshots)
    key = json.loads((directory / "meta.json").read_text())["key"]
    assert snapshots.check_snapshot(directory, key) is None
    assert run_and_count_snapshots() == 0  # an intact snapshot is reused

    def damage_state_keeping_mtime() -> None:
        flip_byte(directory / "state", keep_mtime=True)

    def damage_state() -> None:
        flip_byte(directory / "state", keep_mtime=False)

    def damage_meta_key() -> None:
        meta = json.loads((directory / "meta.json").read_text())
        meta["key"] = "0" * 64
        (directory / "meta.json").write_text(json.dumps(meta))

    def remove_meta() -> None:
        (directory / "meta.json").unlink()

    damages = [
        (damage_state_keeping_mtime, "digest"),
        (damage_state, "state changed"),
        (damage_meta_key, "key mismatch"),
        (remove_meta, "meta.json"),
    ]
    for damage, problem in damages:
        created = json.loads((directory / "meta.json").read_text())["created_at"]
        damage()
        found = snapshots.check_snapshot(directory, key)
        assert found is not None and problem in found, (damage.__name__, found)
        assert run_and_count_snapshots() == 1, damage.__name__  # re-taken before the boot
        assert only_snapshot(private_snapshots) == directory
        assert snapshots.check_snapshot(directory, key) is None
        assert json.loads((directory / "meta.json").read_text())["created_at"] > created
    # No half-taken snapshot was left behind.
    assert [p.name for p in private_snapshots.iterdir() if p.name.startswith(".tmp-")] == []


def test_restored_vms_are_independent(pyro: Pyro, vm_environment: str) -> None:
    ids = [pyro.create_vm(vm_environment).vm_id for _ in "ab"]
    threads = [threading.Thread(target=pyro.start_vm, args=(vm,)) for vm in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [pyro.status_vm(vm).boot for vm in ids] == ["restored", "restored"]
    m = pyro.manager

    probe = "cat /proc/sys/kernel/random/uuid; head -c 16 /dev/urandom | od -An -tx1; date +%s"
    seen = []
    for vm in ids:
        before = time.time()
        result = m.exec(vm, probe)
        after = time.time()
        assert result.exit_code == 0, result.stderr
        uuid, random_hex, clock = result.stdout.decode().strip().split("\n")
        # The guest clock was set from the host's at restore, not left at snapshot time.
        assert before - 5 <= int(clock) <= after + 5
        seen.append((uuid, random_hex.split()))
    (uuid_a, rand_a), (uuid_b, rand_b) = seen
    assert uuid_a != uuid_b
    assert len(rand_a) == len(rand_b) == 16
    assert rand_a != rand_b

    # Separate disks: a file written in one is not in the other.
    assert m.exec(ids[0], "echo mine > /root/only-a && sync").exit_code == 0
    assert m.exec(ids[0], "cat /root/only-a").stdout == b"mine\n"
    other = m.exec(ids[1], "test -e /root/only-a; echo $?")
    assert other.stdout == b"1\n"
    assert m.exec(ids[1], "echo theirs > /tmp/b-file").exit_code == 0
    assert m.exec(ids[0], "test -e /tmp/b-file; echo $?").stdout == b"1\n"


def test_env_pull_takes_the_warm_start_snapshot(vm_environment: str, state_dir: Path) -> None:
    data = Pyro(state_dir=state_dir, backend="qemu").pull_environment(vm_environment)
    snapshot = data.get("snapshot")
    assert snapshot, data
    assert (Path(snapshot) / "meta.json").is_file()
    result = Pyro(state_dir=state_dir, backend="qemu").run_in_vm(vm_environment, ["true"])
    assert result.boot == "restored"


def test_a_stopped_vm_restarts_cold_on_its_own_disk(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    """A restore would put the snapshot's disk under the VM: a VM that already has its
    disk (it ran, then stopped) must boot cold on it. The backend answers that, from the
    VM's folder, not the manager."""
    info = pyro.create_vm(vm_environment)
    vm = info.vm_id
    assert pyro.start_vm(vm).boot == "restored"
    m = pyro.manager
    assert m.exec(vm, "echo kept > /root/marker && sync").exit_code == 0
    assert pyro.stop_vm(vm).status == "stopped"

    qemu = get_backend("qemu")
    env = m.store.ensure(vm_environment)

    def restore_for(paths: VMPaths | None) -> object:
        plan = qemu.prepare(
            env,
            vcpu_count=info.vcpu_count,
            mem_mib=info.mem_mib,
            network=False,
            acceleration=info.acceleration,
            paths=paths,
        )
        return plan.restore

    assert restore_for(VMPaths(state_dir / "vms" / vm)) is None
    assert restore_for(None) is not None  # a fresh VM restores

    restarted = pyro.start_vm(vm)
    assert restarted.boot == "cold"
    assert m.exec(vm, "cat /root/marker").stdout == b"kept\n"
