"""The tool contract: every tool pyro-mcp offers a model, declared once as data.

Each :class:`ToolSpec` holds the tool's name, a description written for a model
(when to use it and when not), a pydantic input model (bounds and defaults from
:mod:`pyro_mcp.limits`), a pydantic output model, truthful behaviour hints and
the function that runs it against a :class:`~pyro_mcp.api.Pyro`. The MCP server,
the OpenAI Responses tool list, the LangChain and PydanticAI tools and the
generated tool reference (docs/tools.md) are all derived from :data:`TOOLS`;
none of them restates a schema.

Calling a tool goes through :meth:`ToolSpec.call`, which never raises for the
tool's own failures: it returns a :class:`ToolOutcome` that is either the
output model (a failing guest command is a normal result with its exit code)
or an error in :meth:`PyroError.to_dict` shape with a message a model can act on.

The modules, from the bottom up:

* ``context``: :class:`ToolContext` (allowed roots, cancellation) and
  :func:`resolve_source_path`.
* ``schema``: the JSON Schemas served, and their rewriting for OpenAI's strict mode.
* ``inputs`` / ``outputs``: the argument and result models; the options of a
  command (``cwd``, ``env``) are declared once in ``inputs``.
* ``spec``: :class:`ToolSpec`, hints, profiles, :class:`ToolOutcome`.
* ``render``: the short text of each result.
* ``vm_tools``, ``task_tools``: each tool's runner and declaration, by domain.
* ``tools``: the table (:data:`TOOLS`) and its look-ups.
* ``reference``: docs/tools.md (``python -m pyro_mcp.contract``).
"""

from pyro_mcp.contract.context import ToolCancelled, ToolContext, resolve_source_path
from pyro_mcp.contract.inputs import (
    EnvPairs,
    ExecOptions,
    GuestCwd,
    NoInput,
    TaskCreateInput,
    TaskExecInput,
    TaskIdInput,
    VMCreateInput,
    VMExecInput,
    VMIdInput,
    VMRunInput,
    exec_options,
)
from pyro_mcp.contract.outputs import (
    DeleteResult,
    EnvironmentEntry,
    EnvironmentList,
    ErrorInfo,
    TaskList,
    ToolError,
    VMList,
)
from pyro_mcp.contract.reference import reference_markdown
from pyro_mcp.contract.render import TEXT_OUTPUT_CHARS, render_exec, render_task, render_vm
from pyro_mcp.contract.spec import (
    DEFAULT_PROFILE,
    PROFILES,
    Profile,
    Runner,
    ToolHints,
    ToolOutcome,
    ToolSpec,
)
from pyro_mcp.contract.tools import TOOLS, TOOLS_BY_NAME, get_tool, tools_for

__all__ = [
    "DEFAULT_PROFILE",
    "PROFILES",
    "TEXT_OUTPUT_CHARS",
    "TOOLS",
    "TOOLS_BY_NAME",
    "DeleteResult",
    "EnvPairs",
    "EnvironmentEntry",
    "EnvironmentList",
    "ErrorInfo",
    "ExecOptions",
    "GuestCwd",
    "NoInput",
    "Profile",
    "Runner",
    "TaskCreateInput",
    "TaskExecInput",
    "TaskIdInput",
    "TaskList",
    "ToolCancelled",
    "ToolContext",
    "ToolError",
    "ToolHints",
    "ToolOutcome",
    "ToolSpec",
    "VMCreateInput",
    "VMExecInput",
    "VMIdInput",
    "VMList",
    "VMRunInput",
    "exec_options",
    "get_tool",
    "reference_markdown",
    "render_exec",
    "render_task",
    "render_vm",
    "resolve_source_path",
    "tools_for",
]
