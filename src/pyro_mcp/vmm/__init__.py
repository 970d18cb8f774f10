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
    """The automatic choice: a KVM microVM where KVM really works; else gVisor
    (near-native speed, user-space kernel) when runsc runs here; else QEMU with
    TCG (a full VM, ~20x slower CPU). See docs/backends.md for the numbers."""
    from pyro_mcp.vmm.detect import kvm_status

    kvm = kvm_status()
    qemu = get_backend("qemu").probe()
    if kvm.usable and qemu.available:
        return BackendChoice(
            "qemu", "kvm", f"KVM is usable: hardware-isolated microVMs ({kvm.reason})"
        )
    gvisor = get_backend("gvisor").probe()
    if gvisor.available:
        return BackendChoice(
            "gvisor",
            gvisor.acceleration or "ptrace",
            f"KVM is not usable ({kvm.reason}); gVisor runs guest code at native speed "
            "where QEMU would emulate every instruction (TCG, ~20x slower). "
            "--backend qemu gives a full VM instead",
        )
    if qemu.available:
        return BackendChoice(
            "qemu",
            "kvm" if kvm.usable else "tcg",
            f"KVM is not usable ({kvm.reason}) and gVisor is not ({gvisor.reason}): "
            "QEMU emulates the CPU (TCG)",
        )
    raise BackendUnavailableError(
        f"no VM backend is usable here: qemu: {qemu.reason}; gvisor: {gvisor.reason}",
        hint="; ".join([*qemu.advice, *gvisor.advice]) or "run `pyro doctor`",
    )
