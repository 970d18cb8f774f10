"""The task tools: a VM with a /workspace that keeps its files between commands."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyro_mcp.contract.context import ToolContext, resolve_source_path
from pyro_mcp.contract.inputs import (
    NoInput,
    TaskCreateInput,
    TaskExecInput,
    TaskIdInput,
    exec_options,
)
from pyro_mcp.contract.outputs import TaskList
from pyro_mcp.contract.render import render_exec, render_task, render_task_delete, render_tasks
from pyro_mcp.contract.spec import READ_ONLY, TASK_PROFILES, ToolHints, ToolSpec
from pyro_mcp.models import TaskDeleteResult, TaskExecResult, TaskInfo

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro


def _run_task_create(pyro: Pyro, args: TaskCreateInput, ctx: ToolContext) -> TaskInfo:
    source = None
    if args.source_path is not None:
        source = resolve_source_path(args.source_path, ctx.roots())
    ctx.check_cancelled()
    return pyro.create_task(
        args.environment,
        source_path=source,
        exclude=args.exclude,
        vcpu_count=args.vcpu_count,
        mem_mib=args.mem_mib,
        ttl_seconds=args.ttl_seconds,
        network=args.network,
        name=args.name,
    )


def _run_task_exec(pyro: Pyro, args: TaskExecInput, ctx: ToolContext) -> TaskExecResult:
    return pyro.exec_task(
        args.task_id,
        args.command,
        timeout_seconds=args.timeout_seconds,
        stdout_cap=args.stdout_cap,
        stderr_cap=args.stderr_cap,
        **exec_options(args.cwd, args.env, args.stdin, ctx.on_output),
    )


def _run_task_status(pyro: Pyro, args: TaskIdInput, ctx: ToolContext) -> TaskInfo:
    return pyro.status_task(args.task_id)


def _run_task_list(pyro: Pyro, args: NoInput, ctx: ToolContext) -> TaskList:
    return TaskList(tasks=pyro.list_tasks())


def _run_task_delete(pyro: Pyro, args: TaskIdInput, ctx: ToolContext) -> TaskDeleteResult:
    return pyro.delete_task(args.task_id)


TASK_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="task_create",
        title="Create a persistent workspace (task)",
        description=(
            "Create a task: a microVM with a /workspace folder that keeps its files "
            "between task_exec calls, optionally starting as a copy of source_path (a host "
            "folder or .tar archive; the host copy is never modified). Use it only when "
            "several commands must share files, e.g. copy a project in, then build it, then "
            "run its tests. For a single command use vm_run instead. Returns task_id; call "
            "task_delete when done (otherwise it is removed after ttl_seconds)."
        ),
        input_model=TaskCreateInput,
        output_model=TaskInfo,
        # Reads source_path on the host; writes only the task's own copy.
        hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
        profiles=TASK_PROFILES,
        run=_run_task_create,
        render=render_task,
    ),
    ToolSpec(
        name="task_exec",
        title="Run a command in a task",
        description=(
            "Run one shell command as root in a task's /workspace (the working directory); "
            "files, builds and installed packages persist for the next task_exec. A "
            "non-zero exit code is a normal result: read exit_code and stderr. A command "
            "that times out is killed; the task stays. Not for one-off commands that need "
            "no shared files: use vm_run."
        ),
        input_model=TaskExecInput,
        output_model=TaskExecResult,
        # A command may delete or overwrite files in the task's workspace (never the host's).
        hints=ToolHints(read_only=False, destructive=True, idempotent=False, open_world=False),
        profiles=TASK_PROFILES,
        run=_run_task_exec,
        render=render_exec,
    ),
    ToolSpec(
        name="task_status",
        title="Show a task",
        description="Show one task's state, environment, workspace origin and expiry time.",
        input_model=TaskIdInput,
        output_model=TaskInfo,
        hints=READ_ONLY,
        profiles=TASK_PROFILES,
        run=_run_task_status,
        render=render_task,
    ),
    ToolSpec(
        name="task_list",
        title="List tasks",
        description="List the tasks on this machine, e.g. to find one to reuse or delete.",
        input_model=NoInput,
        output_model=TaskList,
        hints=READ_ONLY,
        profiles=TASK_PROFILES,
        run=_run_task_list,
        render=render_tasks,
    ),
    ToolSpec(
        name="task_delete",
        title="Delete a task",
        description=(
            "Delete a task: stop its VM and remove its /workspace for good. Call it when "
            "you are done with a task."
        ),
        input_model=TaskIdInput,
        output_model=TaskDeleteResult,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=TASK_PROFILES,
        run=_run_task_delete,
        render=render_task_delete,
    ),
)
