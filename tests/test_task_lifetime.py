"""Tasks outlive the process that made them (docs/tasks.md): neither the CLI nor
the MCP server deletes a task, or stops its VM, when it exits."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from mcp_helpers import mcp_session, serve_params, structured
from pyro_mcp import Pyro
from test_cli import cli

pytestmark = pytest.mark.vm


def test_a_task_made_by_the_cli_outlives_it(vm_environment: str, state_dir: Path) -> None:
    made = cli(state_dir, "task", "create", vm_environment, "--json")
    assert made.returncode == 0, made.stderr
    task_id = json.loads(made.stdout)["task_id"]
    try:
        wrote = cli(state_dir, "task", "exec", task_id, "--", "sh", "-c", "echo kept > f")
        assert wrote.returncode == 0, wrote.stderr
        # Both CLI processes are gone; the task and its VM are still there.
        info = Pyro(state_dir=state_dir).status_task(task_id)
        assert info.status == "running"
        again = cli(state_dir, "task", "exec", task_id, "--", "cat", "f")
        assert (again.returncode, again.stdout) == (0, "kept\n")
    finally:
        Pyro(state_dir=state_dir).delete_task(task_id)


def test_a_task_made_over_mcp_outlives_the_server(vm_environment: str, state_dir: Path) -> None:
    async def make() -> str:
        async with mcp_session(serve_params(state_dir, "--profile", "tasks")) as session:
            created = await session.call_tool("task_create", {"environment": vm_environment})
            assert not created.is_error, created
            task_id = str(structured(created)["task_id"])
            ran = await session.call_tool(
                "task_exec", {"task_id": task_id, "command": "echo kept > f"}
            )
            assert not ran.is_error and structured(ran)["exit_code"] == 0, ran
            return task_id

    task_id = anyio.run(make)  # the server has exited here
    pyro = Pyro(state_dir=state_dir)
    try:
        assert pyro.status_task(task_id).status == "running"
        assert pyro.exec_task(task_id, "cat f").stdout == "kept\n"
    finally:
        pyro.delete_task(task_id)
