"""VM backends behind one interface (:mod:`pyro_mcp.vmm.base`), one module each."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pyro_mcp.errors import BackendUnavailableError, InvalidInputError
from pyro_mcp.vmm.base import Backend, BackendInfo, SandboxBackend, snapshots_enabled

__all__ = [
    "BACKEND_NAMES",
    "SANDBOX_BACKEND_NAMES",
    "VM_BACKEND_NAMES",
    "Backend",
    "BackendChoice",
    "BackendInfo",
    "SandboxBackend",
    "backend_info",
    "check_backend_name",
    "choose_auto",
    "execution_mode",
    "fallback_backend",
    "get_backend",
    "get_sandbox_backend",
    "list_snapshots",
    "prune_snapshots",
    "snapshots_enabled",
]

#: Backends that start guests (``pyro vm``, tasks, one-shot runs).
VM_BACKEND_NAMES = ("qemu", "gvisor")
#: Per-command sandboxes: tasks and one-shot runs only, and only when asked for.
SANDBOX_BACKEND_NAMES = ("host_compat",)
#: Every ``--backend`` name besides ``auto``.
BACKEND_NAMES = (*VM_BACKEND_NAMES, *SANDBOX_BACKEND_NAMES)


def get_backend(name: str) -> Backend:
    """The VM backend called ``name``."""
    if name == "qemu":
        from pyro_mcp.vmm.qemu import QemuBackend

        return QemuBackend()
    if name == "gvisor":
        from pyro_mcp.vmm.gvisor import GvisorBackend

        return GvisorBackend()
    if name in BACKEND_NAMES:
        raise InvalidInputError(
            f"the {name} backend runs tasks and one-shot runs only, not VMs",
            hint=f"use `pyro task ...` or `pyro run`, or pick a VM backend "
            f"(auto, {', '.join(VM_BACKEND_NAMES)})",
        )
    raise _unknown(name)


def get_sandbox_backend(name: str) -> SandboxBackend:
    """The per-command sandbox backend called ``name``."""
    if name == "host_compat":
        from pyro_mcp.vmm.host_compat import HostCompatBackend

        return HostCompatBackend()
    if name in BACKEND_NAMES:
        raise InvalidInputError(f"the {name} backend starts VMs; it is not a per-command sandbox")
    raise _unknown(name)


def backend_info(name: str) -> BackendInfo:
    """Any backend, VM or sandbox: its name, execution mode, workspace kind, probe."""
    if name in VM_BACKEND_NAMES:
        return get_backend(name)
    return get_sandbox_backend(name)


def fallback_backend() -> SandboxBackend:
    """The opt-in fallback when no VM backend works (``allow_host_compat``)."""
    from pyro_mcp.vmm.host_compat import HostCompatBackend

    return HostCompatBackend()


def _unknown(name: str, where: str = "") -> InvalidInputError:
    return InvalidInputError(
        f"unknown backend {name!r}{where}",
        hint=f"choose one of: auto, {', '.join(BACKEND_NAMES)}",
        details={"backend": name, "available": ["auto", *BACKEND_NAMES]},
    )


def check_backend_name(name: str, where: str = "") -> str:
    """``name`` if it is ``auto`` or a backend's name; else the one "unknown backend"
    error, naming every choice (``where`` says where the name came from)."""
    if name != "auto" and name not in BACKEND_NAMES:
        raise _unknown(name, where)
    return name


def execution_mode(backend: str) -> str:
    """What a result's ``execution_mode`` says for ``backend`` (each backend's own
    ``execution_mode`` attribute)."""
    return backend_info(backend).execution_mode


def list_snapshots() -> list[dict[str, Any]]:
    """Every VM backend's warm-start snapshots, each marked with its backend."""
    return [
        {"backend": name, **snap}
        for name in VM_BACKEND_NAMES
        for snap in get_backend(name).list_snapshots()
    ]


def prune_snapshots() -> list[str]:
    """Remove every VM backend's stale or damaged snapshots; the removed paths."""
    return [path for name in VM_BACKEND_NAMES for path in get_backend(name).prune_snapshots()]


@dataclass(frozen=True)
class BackendChoice:
    name: str
    acceleration: str
    reason: str


def choose_auto() -> BackendChoice:
    """The automatic choice: always a microVM when QEMU is here (KVM where it really
    works, else TCG); gVisor only when QEMU is missing. gVisor is one flag away
    (``--backend gvisor``) for CPU- or syscall-heavy work on hosts without KVM.
    See docs/backends.md for the numbers and the reasoning."""
    from pyro_mcp.vmm.detect import kvm_status

    kvm = kvm_status()
    qemu = get_backend("qemu").probe()
    if qemu.available and kvm.usable:
        return BackendChoice(
            "qemu", "kvm", f"KVM is usable: hardware-isolated microVMs ({kvm.reason})"
        )
    if qemu.available:
        return BackendChoice(
            "qemu",
            "tcg",
            f"KVM is not usable ({kvm.reason}): microVMs with QEMU emulating the CPU (TCG; "
            "CPU-heavy guest work is ~15-20x slower, start-up stays ~0.3 s through snapshot "
            "restore). For heavy work, --backend gvisor runs at near-native speed with a "
            "user-space-kernel boundary instead of a VM",
        )
    gvisor = get_backend("gvisor").probe()
    if gvisor.available:
        return BackendChoice(
            "gvisor",
            gvisor.acceleration or "ptrace",
            f"QEMU is not usable ({qemu.reason}); gVisor sandboxes (user-space kernel, "
            "no VM) are used instead",
        )
    raise BackendUnavailableError(
        f"no VM backend is usable here: qemu: {qemu.reason}; gvisor: {gvisor.reason}",
        hint="; ".join([*qemu.advice, *gvisor.advice]) or "run `pyro doctor`",
    )
