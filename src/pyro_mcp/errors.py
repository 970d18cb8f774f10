"""The one exception hierarchy of pyro-mcp.

Every error a user can meet is a :class:`PyroError` with a stable ``code``, a
message that names the problem and, where there is one, a ``hint`` that names
the fix. OS and subprocess errors are translated into these once per layer;
nothing above that layer branches on message text.

    PyroError
    ├── InvalidInputError        bad argument (id, size, path, timeout, command)
    │   └── UnsafeSeedError      a workspace seed broke an extraction rule
    │                            (pyro_mcp.workspace.archive)
    ├── NotFoundError            unknown VM, task or environment
    ├── EnvironmentBuildError    building or verifying a guest environment failed
    ├── BackendUnavailableError  no usable VM backend / missing binary
    ├── BootError                the guest did not come up (carries console tail)
    ├── GuestProtocolError       the guest agent broke the wire protocol
    ├── VMStateError             operation not allowed in the VM's current state
    ├── StateError               on-disk state is unreadable or from another version
    └── LimitError               a host-wide limit was reached
"""

from __future__ import annotations

from typing import Any


class PyroError(Exception):
    """Root of every error pyro-mcp raises on purpose."""

    code = "pyro_error"
    #: Exit status of every ``pyro`` command for pyro's own errors (and usage errors);
    #: 124 is a guest command's timeout, the rest the guest command's own status.
    exit_code = 125

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = dict(details or {})

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message

    def to_dict(self) -> dict[str, Any]:
        """Stable, JSON-ready shape shared by the CLI's --json output and MCP."""
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.hint:
            data["hint"] = self.hint
        if self.details:
            data["details"] = self.details
        return data


class InvalidInputError(PyroError, ValueError):
    code = "invalid_input"


class NotFoundError(PyroError, LookupError):
    code = "not_found"


class EnvironmentBuildError(PyroError):
    code = "environment_build_failed"


class BackendUnavailableError(PyroError):
    code = "backend_unavailable"


class BootError(PyroError):
    code = "boot_failed"


class GuestProtocolError(PyroError):
    code = "guest_protocol_error"


class VMStateError(PyroError):
    code = "invalid_state"


class StateError(PyroError):
    code = "state_error"


class LimitError(PyroError):
    code = "limit_reached"
