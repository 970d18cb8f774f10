"""The task file tools: take work back out of a task (read, write, edit, list, diff,
export) and put its /workspace back to the seed (reset)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyro_mcp.contract.context import ToolContext
from pyro_mcp.contract.inputs import TaskIdInput
from pyro_mcp.contract.spec import TASK_PROFILES, ToolHints, ToolSpec
from pyro_mcp.models import TaskResetResult

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro


def _run_task_reset(pyro: Pyro, args: TaskIdInput, ctx: ToolContext) -> TaskResetResult:
    return pyro.reset_task(args.task_id)


def render_task_reset(result: TaskResetResult) -> str:
    rest = "; everything outside /workspace started fresh" if result.guest_reverted else ""
    return f"{result.task_id}: /workspace reset to its seed ({result.workspace_seed_mode}){rest}"


FILE_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="task_reset",
        title="Reset a task's workspace",
        description=(
            "Put a task's /workspace back exactly as it was created (its seed, or empty), "
            "killing commands still running in it; the task_id stays. On VM backends the "
            "task gets a new VM, so packages installed and files outside /workspace are "
            "gone too (the result's guest_reverted says so). Use it to start an attempt "
            "over; use task_diff first to keep what you changed."
        ),
        input_model=TaskIdInput,
        output_model=TaskResetResult,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=TASK_PROFILES,
        run=_run_task_reset,
        render=render_task_reset,
    ),
)
