"""A model on the OpenAI Responses API works in a task: a project folder copied into a
persistent /workspace, then the agent loop: test, edit, test again, diff.

    uv sync                      # or: pip install 'pyro-mcp[integrations]'
    export OPENAI_API_KEY=sk-...
    uv run python examples/openai_responses_task.py PROJECT_DIR

The "tasks" profile offers vm_run, task_create/exec/status/list/delete and the file
tools (task_read_file, task_write_file, task_edit_file, task_list_files, task_diff,
task_export, task_reset); ``source_path`` may only name files under the allowed roots
(here PROJECT_DIR). The answer ends with the model's change as a patch: save it and
``git apply`` it in PROJECT_DIR to take the change.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from openai import OpenAI

from pyro_mcp import ToolContext
from pyro_mcp.integrations.openai_responses import ToolBox

MODEL = os.environ.get("OPENAI_MODEL", "gpt-4.1")
ENVIRONMENT = os.environ.get("PYRO_ENVIRONMENT", "debian:12")
MAX_TURNS = 12


def main(project: Path) -> str:
    client = OpenAI()
    box = ToolBox(profile="tasks", context=ToolContext(source_roots=[project]))
    conversation: list[object] = [
        {
            "role": "user",
            "content": (
                f"Copy the project at {project} into a {ENVIRONMENT} task, list its files and "
                "run its check script (sh check.sh). Then change the README so the check "
                "says 'edited in the task', run the check again, and show me the diff of "
                "your change (task_diff) before you delete the task."
            ),
        }
    ]
    for _ in range(MAX_TURNS):
        response = client.responses.create(model=MODEL, input=conversation, tools=box.tools)
        calls = box.function_calls(response)
        if not calls:
            return response.output_text
        conversation += response.output
        conversation += [box.run(call) for call in calls]
    raise SystemExit(f"the model was still calling tools after {MAX_TURNS} turns")


if __name__ == "__main__":
    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()))
