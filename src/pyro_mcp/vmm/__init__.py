"""VM backends behind one interface (:mod:`pyro_mcp.vmm.base`), one module each."""

from __future__ import annotations

from pyro_mcp.errors import InvalidInputError
from pyro_mcp.vmm.base import Backend

BACKEND_NAMES = ("qemu",)


def get_backend(name: str) -> Backend:
    if name == "qemu":
        from pyro_mcp.vmm.qemu import QemuBackend

        return QemuBackend()
    raise InvalidInputError(
        f"unknown backend {name!r}", hint=f"choose one of: {', '.join(BACKEND_NAMES)}"
    )
