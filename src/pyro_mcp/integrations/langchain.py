"""The tool contract as LangChain tools.

    from pyro_mcp.integrations.langchain import langchain_tools

    tools = langchain_tools()              # profile "vm-run": vm_run, vm_list_environments
    model = some_chat_model.bind_tools(tools)

Each tool's ``args_schema`` is the contract's input model. A tool answers with
``content_and_artifact``: the short text for the model and the structured
result as the artifact. A tool that cannot do its job raises ``ToolException``
with the model-actionable message, which LangChain hands back to the model
(``handle_tool_error=True``). Needs ``langchain-core`` (the ``integrations`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import anyio

try:
    from langchain_core.tools import BaseTool, StructuredTool, ToolException
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"{__name__} needs langchain-core: pip install 'pyro-mcp[integrations]' ({exc})"
    ) from exc

from pyro_mcp.contract import Profile, ToolContext, ToolSpec, tools_for

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro

DEFAULT_PROFILE: Profile = "vm-run"


class _LazyPyro:
    def __init__(self, pyro: Pyro | None) -> None:
        self._pyro = pyro

    def get(self) -> Pyro:
        if self._pyro is None:
            from pyro_mcp.api import Pyro

            self._pyro = Pyro()
        return self._pyro


def langchain_tool(
    spec: ToolSpec, pyro: Pyro | None = None, context: ToolContext | None = None
) -> BaseTool:
    """One LangChain ``StructuredTool`` from a contract entry."""
    holder = _LazyPyro(pyro)
    ctx = context or ToolContext()

    def run(**kwargs: Any) -> tuple[str, dict[str, Any]]:
        outcome = spec.call(holder.get(), kwargs, ctx)
        if not outcome.ok:
            raise ToolException(outcome.text)
        return outcome.text, outcome.structured

    async def arun(**kwargs: Any) -> tuple[str, dict[str, Any]]:
        return await anyio.to_thread.run_sync(lambda: run(**kwargs))

    return StructuredTool.from_function(
        func=run,
        coroutine=arun,
        name=spec.name,
        description=spec.description,
        args_schema=spec.input_model,
        response_format="content_and_artifact",
        handle_tool_error=True,
        handle_validation_error=True,
    )


def langchain_tools(
    pyro: Pyro | None = None,
    *,
    profile: Profile = DEFAULT_PROFILE,
    context: ToolContext | None = None,
) -> list[BaseTool]:
    shared = _LazyPyro(pyro).get()
    return [langchain_tool(t, shared, context) for t in tools_for(profile)]
