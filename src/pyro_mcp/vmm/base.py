"""The interface every VM backend implements.

A backend turns a :class:`LaunchSpec` into a running guest whose agent channel
is a byte stream (:class:`VMHandle`). Callers (the per-VM supervisor) never
look at backend specifics, so another backend (Firecracker with vsock, gVisor)
slots in without touching them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


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
    """Everything a backend needs to start one guest."""

    kernel: Path
    initramfs: Path
    rootfs: Path  # read-only base image; the backend puts a copy-on-write layer over it
    vcpu_count: int
    mem_mib: int
    network: bool = False
    acceleration: str = "tcg"
    extra_cmdline: tuple[str, ...] = ()
    # The guest agent binary, for backends that run it directly (gvisor); VM backends
    # boot it from the initramfs. None: the backend finds it itself.
    agent: Path | None = None

    @classmethod
    def from_launch(cls, launch: Mapping[str, Any]) -> LaunchSpec:
        """From the manager's ``launch.json`` record."""
        return cls(
            kernel=Path(launch["kernel"]),
            initramfs=Path(launch["initramfs"]),
            rootfs=Path(launch["rootfs"]),
            vcpu_count=int(launch["vcpu_count"]),
            mem_mib=int(launch["mem_mib"]),
            network=bool(launch["network"]),
            acceleration=str(launch["acceleration"]),
            agent=Path(launch["agent"]) if launch.get("agent") else None,
        )


@dataclass(frozen=True)
class SnapshotRef:
    """A saved guest state a backend can restore from."""

    directory: Path
    key: str


WORKSPACE_DISK_MIB = 4096
"""Every guest has a second disk, /dev/vdb, of this fixed (sparse) size: empty for
one-shot VMs, a task's seeded /workspace filesystem otherwise. A fixed size keeps
one snapshot valid for both (the guest probes the device before the snapshot)."""


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


class Backend(Protocol):
    name: str

    def probe(self, *, detailed: bool = False) -> BackendProbe: ...

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
