"""The backend seam: every backend says what it is, the layers above never name one,
and the snapshot cache is reached through the backends (no VM is started here)."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest

import pyro_mcp
from pyro_mcp import control, manager, vmm
from pyro_mcp.errors import InvalidInputError
from pyro_mcp.tasks import manager as task_manager
from pyro_mcp.tasks import runtime_for
from pyro_mcp.tasks.dir_runtime import DirectorySandboxRuntime, DirectoryVMRuntime
from pyro_mcp.tasks.vm_runtime import DiskRuntime
from pyro_mcp.vmm.base import LaunchPlan, LaunchSpec, SnapshotRef

SRC = Path(pyro_mcp.__file__).parent
EXPECTED_MODES = {"qemu": "microvm", "gvisor": "gvisor_sandbox", "host_compat": "host_compat"}


@pytest.mark.parametrize("name", vmm.BACKEND_NAMES)
def test_every_backend_declares_what_it_is(name: str) -> None:
    info = vmm.backend_info(name)
    assert info.name == name
    assert info.execution_mode == EXPECTED_MODES[name]
    assert vmm.execution_mode(name) == info.execution_mode
    assert info.workspace_kind in ("disk", "directory")
    assert info.runs_vms == (name in vmm.VM_BACKEND_NAMES)
    assert info.probe().name == name


def test_execution_modes_are_defined_once_per_backend() -> None:
    """Each mode string is written in its backend's module and nowhere else in vmm/."""
    for mode in EXPECTED_MODES.values():
        found = [
            p.name
            for p in (SRC / "vmm").glob("*.py")
            if f'execution_mode: ClassVar[str] = "{mode}"' in p.read_text()
        ]
        assert len(found) == 1, (mode, found)


def test_sandbox_backends_are_not_vm_backends() -> None:
    for name in vmm.SANDBOX_BACKEND_NAMES:
        with pytest.raises(InvalidInputError, match="not VMs"):
            vmm.get_backend(name)
    with pytest.raises(InvalidInputError) as unknown:
        vmm.get_backend("firecracker")
    assert "host_compat" in (unknown.value.hint or "")


@pytest.mark.parametrize("module", [manager, task_manager], ids=["manager", "tasks"])
def test_the_layers_above_vmm_never_name_a_backend(module: object) -> None:
    """No string constant in the VM manager or the task manager is a backend name or a
    backend's file (the backend interface answers instead)."""
    tree = ast.parse(inspect.getsource(module))  # type: ignore[arg-type]
    constants = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }
    named = {c for c in constants if c in vmm.BACKEND_NAMES or re.search(r"\.qcow2\b", c)}
    assert named == set()


def test_tasks_pick_their_runtime_from_the_backend(tmp_path: Path) -> None:
    from pyro_mcp.manager import VMManager
    from pyro_mcp.tasks import TaskManager

    vms = VMManager(state_root=tmp_path)
    records = TaskManager(vms).records
    kinds = {name: type(runtime_for(name, vms, records)) for name in vmm.BACKEND_NAMES}
    assert kinds == {
        "qemu": DiskRuntime,
        "gvisor": DirectoryVMRuntime,
        "host_compat": DirectorySandboxRuntime,
    }


def test_launch_plan_round_trips_through_launch_json(tmp_path: Path) -> None:
    spec = LaunchSpec(
        rootfs=tmp_path / "rootfs.ext4",
        vcpu_count=2,
        mem_mib=512,
        acceleration="tcg",
        kernel=tmp_path / "vmlinux",
        initramfs=tmp_path / "initrd",
    )
    mount = {"source": "/dev/vdb", "target": "/workspace", "fstype": "ext4", "readonly": False}
    plan = LaunchPlan(spec, (mount,), SnapshotRef(tmp_path, "k"))

    def through_launch_json(plan: LaunchPlan) -> control.Launch:
        control.Launch.from_plan("qemu", plan, expires_at=1e9, owner=None, boot_timeout=90.0).write(
            tmp_path / "launch.json"
        )
        return control.Launch.read(tmp_path / "launch.json")

    launch = through_launch_json(plan)
    assert launch.spec() == spec
    assert launch.snapshot() == SnapshotRef(tmp_path, "k")
    assert [m.to_dict() for m in launch.mounts] == [mount]
    bare = LaunchSpec(rootfs=tmp_path, vcpu_count=1, mem_mib=256, agent=tmp_path / "agent")
    assert through_launch_json(LaunchPlan(bare)).spec() == bare


def test_snapshot_maintenance_goes_through_the_backends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pyro_mcp.vmm import qemu_snapshot

    monkeypatch.setattr(qemu_snapshot, "snapshots_root", lambda: tmp_path)
    (tmp_path / ".tmp-interrupted").mkdir()
    kept = tmp_path / "abc"
    kept.mkdir()
    (kept / "meta.json").write_text('{"mem_mib": 256, "inputs": {}}')
    assert [(s["backend"], s["id"], s["mem_mib"]) for s in vmm.list_snapshots()] == [
        ("qemu", "abc", 256)
    ]
    assert vmm.prune_snapshots() == [str(tmp_path / ".tmp-interrupted")]
    assert [p.name for p in tmp_path.iterdir()] == ["abc"]


def test_nothing_above_vmm_imports_a_backend_module() -> None:
    """The VM and task managers reach backends through pyro_mcp.vmm only (``pyro
    doctor`` reports on each backend, so it may look inside them)."""
    backend_modules = re.compile(r"pyro_mcp\.vmm\.(qemu|gvisor|host_compat|qemu_snapshot|qmp)\b")
    for path in [SRC / "manager.py", *(SRC / "tasks").glob("*.py")]:
        assert not backend_modules.search(path.read_text()), path
