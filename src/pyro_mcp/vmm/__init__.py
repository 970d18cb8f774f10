"""VM backends behind one interface (:mod:`pyro_mcp.vmm.base`), one module each."""

from __future__ import annotations

from dataclasses import dataclass

from pyro_mcp.errors import BackendUnavailableError, InvalidInputError
from pyro_mcp.vmm.base import Backend

BACKEND_NAMES = ("qemu", "gvisor")

#: What a result's ``execution_mode`` says about the isolation a command got.
EXECUTION_MODES = {
    "qemu": "microvm",  # its own guest kernel behind a VMM (KVM or TCG emulation)
    "gvisor": "gvisor_sandbox",  # gVisor's user-space kernel on the host kernel, no VM
    "host_compat": "host_compat",  # the host kernel, namespaces only
}


def get_backend(name: str) -> Backend:
    if name == "qemu":
        from pyro_mcp.vmm.qemu import QemuBackend

        return QemuBackend()
    if name == "gvisor":
        from pyro_mcp.vmm.gvisor import GvisorBackend

        return GvisorBackend()
    raise InvalidInputError(
        f"unknown backend {name!r}", hint=f"choose one of: {', '.join(BACKEND_NAMES)}"
    )


def execution_mode(backend: str) -> str:
    return EXECUTION_MODES.get(backend, "microvm")


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
