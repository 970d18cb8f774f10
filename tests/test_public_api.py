"""What users import: ``pyro_mcp``'s ``__all__``, pinned, cheap to import, and the only
module the docs and examples send them to (besides the framework adapters)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyro_mcp
from pyro_mcp import aio, api, errors, handle, models, progress
from pyro_mcp.contract import context
from pyro_mcp.workspace import archive

ROOT = Path(__file__).resolve().parent.parent

PUBLIC = [
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


def test_all_is_pinned_and_every_name_resolves() -> None:
    assert pyro_mcp.__all__ == PUBLIC
    namespace: dict[str, object] = {}
    exec("from pyro_mcp import *", namespace)
    assert set(PUBLIC) <= set(namespace)
    for name in PUBLIC:
        assert getattr(pyro_mcp, name) is namespace[name], name
    assert set(PUBLIC) <= set(dir(pyro_mcp))


def test_names_are_the_internal_objects_themselves() -> None:
    assert pyro_mcp.Pyro is api.Pyro
    assert pyro_mcp.AsyncPyro is aio.AsyncPyro
    assert pyro_mcp.Task is handle.Task
    assert pyro_mcp.ExecResult is models.ExecResult
    assert pyro_mcp.TaskExecResult is models.TaskExecResult
    assert pyro_mcp.SeedLimits is archive.SeedLimits
    assert pyro_mcp.ToolContext is context.ToolContext
    assert pyro_mcp.ProgressEvent is progress.ProgressEvent
    assert pyro_mcp.__version__ == pyro_mcp._version.__version__
    error_classes = [
        value
        for name in PUBLIC
        if isinstance(value := getattr(pyro_mcp, name), type) and issubclass(value, Exception)
    ]
    assert len(error_classes) == 12
    for cls in error_classes:
        assert issubclass(cls, errors.PyroError), cls
        assert cls.code, cls
    # every error class users can meet is exported
    exported = set(error_classes)
    for value in vars(errors).values():
        if isinstance(value, type) and issubclass(value, errors.PyroError):
            assert value in exported, value


def test_unknown_names_raise_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        pyro_mcp.NoSuchThing  # noqa: B018
    with pytest.raises(ImportError):
        exec("from pyro_mcp import NoSuchThing", {})


def test_import_pyro_mcp_stays_cheap() -> None:
    """The CLI imports ``pyro_mcp`` on every start: no pydantic, no SDK until used."""
    code = (
        "import sys; a = set(sys.modules); import pyro_mcp; "
        "print(' '.join(sorted(set(sys.modules) - a)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = set(out.stdout.split())
    ours = {m for m in loaded if m.startswith("pyro_mcp")}
    assert ours == {"pyro_mcp", "pyro_mcp._version", "pyro_mcp.errors"}, ours
    assert not {"pydantic", "importlib"} & loaded


def test_docs_and_examples_import_only_the_public_api() -> None:
    pattern = re.compile(
        r"^\s*(?:from\s+(pyro_mcp[\w.]*)\s+import|import\s+(pyro_mcp[\w.]*))", re.M
    )
    files = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "examples").glob("*")]
    bad = []
    for path in files:
        for match in pattern.finditer(path.read_text()):
            module = match.group(1) or match.group(2)
            if module != "pyro_mcp" and not module.startswith("pyro_mcp.integrations"):
                bad.append(f"{path.relative_to(ROOT)}: {match.group(0).strip()}")
    assert bad == [], "import from `pyro_mcp` (its __all__) instead"
    # the guard sees the imports it is meant to see
    assert pattern.search((ROOT / "examples" / "python_sdk_task.py").read_text())
