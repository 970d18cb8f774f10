"""The tool contract as PydanticAI tools.

    from pydantic_ai import Agent
    from pyro_mcp.integrations.pydantic_ai import pydantic_ai_tools

    agent = Agent("openai:gpt-4.1", tools=pydantic_ai_tools())

Each tool is ``Tool.from_schema`` with the contract's input schema and returns
the structured result (a dict). A tool that cannot do its job raises
``ToolFailed`` with the model-actionable message, so the model sees the failure
and adapts. Needs ``pydantic-ai-slim`` (the ``integrations`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    from pydantic_ai import Tool
    from pydantic_ai.exceptions import ToolFailed
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"{__name__} needs pydantic-ai-slim: pip install 'pyro-mcp[integrations]' ({exc})"
    ) from exc

from pyro_mcp.contract import Profile, ToolContext, ToolSpec, tools_for

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro

DEFAULT_PROFILE: Profile = "vm-run"


def pydantic_ai_tool(
    spec: ToolSpec, pyro: Pyro | None = None, context: ToolContext | None = None
) -> Tool[Any]:
    """One PydanticAI tool from a contract entry (sync; PydanticAI runs it in a thread)."""
    state: dict[str, Pyro] = {} if pyro is None else {"pyro": pyro}
    ctx = context or ToolContext()

    def run(**kwargs: Any) -> dict[str, Any]:
        if "pyro" not in state:
            from pyro_mcp.api import Pyro

            state["pyro"] = Pyro()
        outcome = spec.call(state["pyro"], kwargs, ctx)
        if not outcome.ok:
            raise ToolFailed(outcome.text)
        return outcome.structured

    return Tool[Any].from_schema(
        run,
        name=spec.name,
        description=spec.description,
        json_schema=spec.input_schema(),
    )


def pydantic_ai_tools(
    pyro: Pyro | None = None,
    *,
    profile: Profile = DEFAULT_PROFILE,
    context: ToolContext | None = None,
) -> list[Tool[Any]]:
    if pyro is None:
        from pyro_mcp.api import Pyro

        pyro = Pyro()
    return [pydantic_ai_tool(t, pyro, context) for t in tools_for(profile)]
