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

Hints per surface
-----------------
A hint names a fix, and the fix depends on who reads it: a shell user runs
``pyro task list``, a Python caller calls ``list_tasks()``, a model calls the
``task_list`` tool. An error may therefore carry ``hints`` keyed by
:data:`Surface` (``"cli"``, ``"sdk"``, ``"mcp"``), built with :func:`hints`;
:meth:`PyroError.hint_for` picks the one for a surface and falls back to the
plain ``hint``. ``hint`` itself is the SDK's (the ``"sdk"`` variant when one is
given), so ``str(exc)`` and ``exc.hint`` read right for Python callers. The CLI
asks for ``"cli"`` (``pyro.cli.common.fail``), the MCP server for ``"mcp"``
(``ToolOutcome.from_error``); ``to_dict()`` without a surface keeps every
variant so an error survives the control protocol (``control.error_from_dict``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, get_args

#: Who reads an error: the ``pyro`` command line, the Python SDK, or a model over MCP.
Surface = Literal["cli", "sdk", "mcp"]
SURFACES: tuple[Surface, ...] = get_args(Surface)


def hints(*, cli: str, sdk: str, mcp: str) -> dict[str, str]:
    """The same fix worded for each surface, e.g.
    ``hints(cli="list tasks with `pyro task list`", sdk="list tasks with list_tasks()",
    mcp="list tasks with the task_list tool")``."""
    return {"cli": cli, "sdk": sdk, "mcp": mcp}


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
        hints: Mapping[str, str] | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        #: The hint per surface (see the module docstring); may be empty.
        self.hints: dict[str, str] = {k: v for k, v in (hints or {}).items() if k in SURFACES}
        #: The SDK's hint (the plain one unless an "sdk" variant was given).
        self.hint = self.hints.get("sdk", hint)
        self._hint = hint
        self.details = dict(details or {})

    def hint_for(self, surface: Surface) -> str | None:
        """The hint worded for ``surface``, else the plain one."""
        return self.hints.get(surface, self._hint if surface != "sdk" else self.hint)

    def __str__(self) -> str:
        if self.hint:
            return f"{self.message} (hint: {self.hint})"
        return self.message

    def to_dict(self, surface: Surface | None = None) -> dict[str, Any]:
        """Stable, JSON-ready shape shared by the CLI's --json output and MCP.

        With a ``surface``, ``hint`` is that surface's and there is no ``hints``;
        without one (the control protocol), ``hint`` is the plain hint and
        ``hints`` carries every variant."""
        data: dict[str, Any] = {"code": self.code, "message": self.message}
        hint = self._hint if surface is None else self.hint_for(surface)
        if hint:
            data["hint"] = hint
        if surface is None and self.hints:
            data["hints"] = dict(self.hints)
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
