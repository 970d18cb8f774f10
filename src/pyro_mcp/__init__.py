"""pyro-mcp: run an agent's shell commands in disposable local microVMs.

What users import is here, and only here (``from pyro_mcp import Pyro, ExecResult``);
every other module is internal and may change. The one exception is
:mod:`pyro_mcp.integrations`, the framework adapters (they need optional extras).

``import pyro_mcp`` stays cheap (the CLI imports it on every start): the error
classes load at once, everything else (the SDK, the pydantic result models) on
first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyro_mcp._version import __version__
from pyro_mcp.errors import (
    BackendUnavailableError,
    BootError,
    EnvironmentBuildError,
    GuestProtocolError,
    InvalidInputError,
    LimitError,
    NotFoundError,
    PyroError,
    StateError,
    VMStateError,
)

if TYPE_CHECKING:
    from pyro_mcp.aio import AsyncPyro, AsyncTask
    from pyro_mcp.api import Pyro
    from pyro_mcp.contract.context import ToolContext
    from pyro_mcp.handle import Task
    from pyro_mcp.models import (
        CleanupInfo,
        ExecResult,
        NetworkInfo,
        ReapResult,
        TaskDeleteResult,
        TaskExecResult,
        TaskInfo,
        TaskPruneResult,
        TaskResetResult,
        VMInfo,
        WorkspaceSeed,
    )
    from pyro_mcp.progress import ProgressEvent, ProgressFn
    from pyro_mcp.workspace.archive import SeedLimits, UnsafeSeedError
    from pyro_mcp.workspace.diff import DiffResult
    from pyro_mcp.workspace.export import ExportError, ExportResult
    from pyro_mcp.workspace.files import (
        FileEditResult,
        FileListResult,
        FileReadResult,
        FileWriteResult,
    )

# name -> the internal module that defines it, imported on first access
_LAZY = {
    "AsyncPyro": "pyro_mcp.aio",
    "AsyncTask": "pyro_mcp.aio",
    "Pyro": "pyro_mcp.api",
    "Task": "pyro_mcp.handle",
    "ToolContext": "pyro_mcp.contract.context",
    "ProgressEvent": "pyro_mcp.progress",
    "ProgressFn": "pyro_mcp.progress",
    "SeedLimits": "pyro_mcp.workspace.archive",
    "UnsafeSeedError": "pyro_mcp.workspace.archive",
    "DiffResult": "pyro_mcp.workspace.diff",
    "ExportError": "pyro_mcp.workspace.export",
    "ExportResult": "pyro_mcp.workspace.export",
    **dict.fromkeys(
        ("FileEditResult", "FileListResult", "FileReadResult", "FileWriteResult"),
        "pyro_mcp.workspace.files",
    ),
    **dict.fromkeys(
        (
            "CleanupInfo",
            "ExecResult",
            "NetworkInfo",
            "ReapResult",
            "TaskDeleteResult",
            "TaskExecResult",
            "TaskInfo",
            "TaskPruneResult",
            "TaskResetResult",
            "VMInfo",
            "WorkspaceSeed",
        ),
        "pyro_mcp.models",
    ),
}

__all__ = [
    "AsyncPyro",
    "AsyncTask",
    "BackendUnavailableError",
    "BootError",
    "CleanupInfo",
    "DiffResult",
    "EnvironmentBuildError",
    "ExecResult",
    "ExportError",
    "ExportResult",
    "FileEditResult",
    "FileListResult",
    "FileReadResult",
    "FileWriteResult",
    "GuestProtocolError",
    "InvalidInputError",
    "LimitError",
    "NetworkInfo",
    "NotFoundError",
    "ProgressEvent",
    "ProgressFn",
    "Pyro",
    "PyroError",
    "ReapResult",
    "SeedLimits",
    "StateError",
    "Task",
    "TaskDeleteResult",
    "TaskExecResult",
    "TaskInfo",
    "TaskPruneResult",
    "TaskResetResult",
    "ToolContext",
    "UnsafeSeedError",
    "VMInfo",
    "VMStateError",
    "WorkspaceSeed",
    "__version__",
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyro_mcp' has no attribute {name!r}")
    # __import__ with a fromlist returns the submodule (importlib would add 3 imports)
    value = getattr(__import__(module, fromlist=[name]), name)
    globals()[name] = value  # the next access does not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
