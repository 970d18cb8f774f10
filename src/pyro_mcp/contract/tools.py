"""The tool table: every tool, in the order clients list them, and its look-ups.

The order steers a model: ``vm_run`` first, then the environments, the task tools,
and the step-by-step VM lifecycle last (full profile only). A new tool is declared
in its domain's module (``vm_tools``, ``task_tools``, or a new one) and added here.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyro_mcp.contract.file_tools import FILE_TOOLS
from pyro_mcp.contract.spec import DEFAULT_PROFILE, PROFILES, Profile, ToolSpec
from pyro_mcp.contract.task_tools import TASK_TOOLS
from pyro_mcp.contract.vm_tools import LIST_ENVIRONMENTS, VM_LIFECYCLE_TOOLS, VM_RUN
from pyro_mcp.errors import InvalidInputError, NotFoundError

TOOLS: tuple[ToolSpec, ...] = (
    VM_RUN,
    LIST_ENVIRONMENTS,
    *TASK_TOOLS,
    *FILE_TOOLS,
    *VM_LIFECYCLE_TOOLS,
)

TOOLS_BY_NAME: dict[str, ToolSpec] = {t.name: t for t in TOOLS}


def tools_for(profile: Profile = DEFAULT_PROFILE) -> list[ToolSpec]:
    """The tools a profile exposes, in declaration order."""
    if profile not in PROFILES:
        raise InvalidInputError(
            f"unknown profile {profile!r}", hint=f"choose one of: {', '.join(PROFILES)}"
        )
    return [t for t in TOOLS if profile in t.profiles]


def get_tool(name: str, tools: Sequence[ToolSpec] = TOOLS) -> ToolSpec:
    for tool in tools:
        if tool.name == name:
            return tool
    names = ", ".join(t.name for t in tools)
    raise NotFoundError(
        f"unknown tool {name!r}",
        hint=f"available tools: {names}",
        details={"name": name, "available": [t.name for t in tools]},
    )
