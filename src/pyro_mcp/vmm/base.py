"""The interface every backend implements.

A backend prepares what a launch needs (:meth:`Backend.prepare`: boot artifacts,
its per-VM disk, its warm-start snapshot) and turns the resulting
:class:`LaunchSpec` into a running guest whose agent channel is a byte stream
(:class:`VMHandle`). It says what isolation it gives (``execution_mode``) and
how a task's workspace reaches its guest (``workspace_kind``). Callers (the
manager, the per-VM supervisor, tasks) never look at backend specifics or
names, so another backend (Firecracker with vsock) is one new module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from pyro_mcp.limits import TASK_WORKSPACE
from pyro_mcp.progress import ProgressFn, no_progress

if TYPE_CHECKING:
    from pyro_mcp.guest.channel import AgentChannel


@dataclass(frozen=True)
class BackendProbe:
    """What ``pyro doctor`` and automatic selection learn about a backend."""

    name: str
    available: bool
    acceleration: str | None  # "kvm" | "tcg" | None when unavailable
    reason: str  # one line: why (un)available / why this acceleration
    binary: str | None = None
    version: str | None = None
    advice: tuple[str, ...] = ()


@dataclass(frozen=True)
class LaunchSpec:
    """Everything a backend needs to start one guest (and all a snapshot must match)."""

    rootfs: Path  # the environment's root: an image (qemu) or an unpacked tree (gvisor)
    vcpu_count: int
    mem_mib: int
    network: bool = False
    acceleration: str = "tcg"
    # The guest kernel and the initramfs holding the agent: VM backends only.
    kernel: Path | None = None
    initramfs: Path | None = None
    # The guest agent binary, for backends that run it directly (gvisor); VM backends
    # boot it from the initramfs. None: the backend finds it itself.
    agent: Path | None = None


@dataclass(frozen=True)
class SnapshotRef:
    """A saved guest state a backend can restore from."""

    directory: Path
    key: str


@dataclass(frozen=True)
class LaunchPlan:
    """What :meth:`Backend.prepare` computed for one start: the spec, the mounts the
    guest agent makes at INIT, and the snapshot to restore (None: cold boot). The
    manager writes it to ``launch.json`` as a :class:`pyro_mcp.control.Launch`."""

    spec: LaunchSpec
    mounts: tuple[Mapping[str, Any], ...] = ()
    restore: SnapshotRef | None = None


def snapshots_enabled() -> bool:
    """Warm-start snapshots are on unless ``PYRO_SNAPSHOTS`` is 0/false/no/off."""
    return os.environ.get("PYRO_SNAPSHOTS", "1").strip().lower() not in ("0", "false", "no", "off")


WORKSPACE_DISK_MIB = 4096
"""Every guest has a second disk, /dev/vdb, of this fixed (sparse) size: empty for
one-shot VMs, a task's seeded /workspace filesystem otherwise. A fixed size keeps
one snapshot valid for both (the guest probes the device before the snapshot)."""

WORKSPACE_DISK_MOUNT: Mapping[str, Any] = {
    "source": "/dev/vdb",
    "target": TASK_WORKSPACE,
    "fstype": "ext4",
    "readonly": False,
}
"""The guest mount of a "disk" workspace: the second virtio disk, made at INIT."""

WorkspaceKind = Literal["disk", "directory"]


@dataclass
class VMPaths:
    """Per-VM files; all inside the VM's private state folder."""

    vm_dir: Path
    disk: Path = field(init=False)
    workspace: Path = field(init=False)
    channel: Path = field(init=False)
    console: Path = field(init=False)
    qmp: Path = field(init=False)

    def __post_init__(self) -> None:
        self.disk = self.vm_dir / "disk.qcow2"
        self.workspace = self.vm_dir / "workspace.img"
        self.channel = self.vm_dir / "agent.sock"
        self.console = self.vm_dir / "console.log"
        self.qmp = self.vm_dir / "qmp.sock"


class VMHandle(Protocol):
    """A started guest: its VMM process and the agent byte channel."""

    @property
    def pid(self) -> int: ...

    def read(self, size: int) -> bytes:
        """Block until channel data arrives; b"" once the channel is closed."""
        ...

    def write(self, data: bytes) -> None: ...

    def poll(self) -> int | None:
        """The VMM's exit status, or None while it runs."""
        ...

    def kill(self) -> None:
        """Stop the VMM at once and release its resources (idempotent)."""
        ...

    def console_tail(self, max_lines: int = 40) -> str: ...


class BackendInfo(Protocol):
    """What every backend says about itself, VM or not (``host_compat`` is only this:
    it has no long-lived guest, see :mod:`pyro_mcp.vmm.host_compat`)."""

    #: The ``--backend`` name, also stored in VM and task records.
    name: ClassVar[str]
    #: What results' ``execution_mode`` says about the isolation a command got.
    execution_mode: ClassVar[str]
    #: How a task's /workspace reaches the guest: an ext4 image attached as the
    #: second disk and mounted by the agent ("disk"), or a host folder ("directory").
    workspace_kind: ClassVar[WorkspaceKind]
    #: Whether the backend starts guests (``start``); False for per-command sandboxes.
    runs_vms: ClassVar[bool]

    def probe(self, *, detailed: bool = False) -> BackendProbe:
        """Is the backend usable here, with what acceleration, and why (not)."""
        ...


class Backend(BackendInfo, Protocol):
    """A backend that starts guests. One module per backend; the manager and the
    supervisor only ever talk to this interface (docs/backends.md, "How to add a
    backend")."""

    def prepare(
        self,
        env: Any,
        *,
        vcpu_count: int,
        mem_mib: int,
        network: bool,
        acceleration: str,
        mounts: Sequence[Mapping[str, Any]] = (),
        paths: VMPaths | None = None,
        progress: ProgressFn = no_progress,
    ) -> LaunchPlan:
        """Build or find everything a start of ``env`` (an InstalledEnvironment) needs,
        in the host process, before the supervisor starts: boot artifacts, unpacked
        trees, and the snapshot to restore (taking it first if missing). ``paths`` is
        the VM's folder (None when only preparing ahead): a backend that keeps a
        per-VM disk there must not restore over it (a restart of a stopped VM)."""
        ...

    def start(
        self,
        spec: LaunchSpec,
        paths: VMPaths,
        *,
        restore: SnapshotRef | None = None,
        timeout: float = 30.0,
    ) -> VMHandle:
        """Start a guest (cold, or from ``restore``); return once its channel is connected."""
        ...

    def list_snapshots(self) -> list[dict[str, Any]]:
        """The backend's saved warm-start snapshots (``pyro env inspect``, ``pyro doctor``)."""
        ...

    def prune_snapshots(self) -> list[str]:
        """Remove stale or damaged snapshots; returns the removed paths (``pyro env prune``)."""
        ...


class SandboxBackend(BackendInfo, Protocol):
    """A backend without a long-lived guest: every command is its own sandbox over a
    root tree and the task's workspace folder (``host_compat``). It serves tasks and
    one-shot runs, never ``pyro vm``."""

    def require(self) -> None:
        """Raise BackendUnavailableError (with the fix) when it cannot run here."""
        ...

    def prepare_root(self, env: Any, progress: ProgressFn = no_progress) -> Path:
        """The read-only root the sandboxes of ``env`` (an InstalledEnvironment) use."""
        ...

    def run(
        self,
        root: Path,
        workspace: Path,
        argv: Sequence[str],
        *,
        cwd: str,
        env: Mapping[str, str],
        timeout_seconds: float,
        stdout_cap: int,
        stderr_cap: int,
        stdin: Iterable[bytes] | None = None,
        on_output: Callable[[int, bytes], None] | None = None,
    ) -> dict[str, Any]:
        """Run one command confined; the fields of an exec outcome. ``stdin`` is
        streamed to the command (None: /dev/null); ``on_output(stream, data)`` gets
        the output as it comes (stream 1 stdout, 2 stderr)."""
        ...

    def files(self, root: Path, workspace: Path) -> AbstractContextManager[AgentChannel]:
        """The guest agent in the same confinement, for file operations on ``workspace``."""
        ...
