"""``pyro task``: persistent tasks (create, exec, status, list, delete); the file
commands (read, write, ...) are in :mod:`pyro_mcp.cli.files`."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from pyro_mcp import limits
from pyro_mcp.cli.common import (
    StderrProgress,
    age,
    command_stdin,
    emit,
    env_option,
    expires,
    fail,
    json_option,
    make_pyro,
    mem_option,
    no_stdin_option,
    output_cap_option,
    parse_env,
    print_table,
    quiet,
    quiet_option,
    run_guest_command,
    timeout_option,
    ttl_option,
    vcpu_option,
)
from pyro_mcp.cli.complete import complete_environment, complete_task_id
from pyro_mcp.errors import NotFoundError, PyroError


@click.group()
def task() -> None:
    """Persistent tasks: a VM with a /workspace that keeps its files across commands.

    \b
    ID=$(pyro task create debian:12 --source-path ./my-project)
    pyro task exec "$ID" -- sh -lc 'make test'
    pyro task delete "$ID"
    """


def _print_task(info: Any) -> None:
    seed = info.workspace_seed
    source = f" from {seed.source_path}" if seed.source_path else ""
    click.echo(f"task_id:      {info.task_id}")
    if info.name:
        click.echo(f"name:         {info.name}")
    click.echo(f"environment:  {info.environment} {info.environment_version}")
    click.echo(f"status:       {info.status}" + (f" ({info.detail})" if info.detail else ""))
    click.echo(f"execution:    {info.execution_mode} ({info.backend}, {info.acceleration})")
    if info.vm_id:
        click.echo(f"vm_id:        {info.vm_id} ({info.boot or '-'})")
    click.echo(
        f"workspace:    {info.workspace_path}: {seed.mode}{source}, {seed.entry_count} entries, "
        f"{seed.bytes_written} bytes"
    )
    if seed.sha256:
        click.echo(f"seed sha256:  {seed.sha256}")
    remaining = max(0, int(info.expires_at.timestamp() - time.time()))
    click.echo(f"expires in:   {remaining} s")


@task.command("create")
@click.argument("environment", shell_complete=complete_environment)
@click.option(
    "--source-path",
    type=click.Path(path_type=str),
    default=None,
    help="Directory or .tar/.tar.gz/.tar.bz2/.tar.xz to copy into /workspace.",
)
@click.option(
    "--exclude",
    multiple=True,
    metavar="PATTERN",
    help="Leave out matching paths (glob on path or name, e.g. .git, '*.pyc'). Repeatable.",
)
@vcpu_option
@mem_option
@ttl_option(limits.DEFAULT_TASK_TTL_SECONDS, "task and its workspace")
@click.option("--network", is_flag=True, help="Give the guest a network (not available yet).")
@click.option(
    "--name",
    default=None,
    help="A name, unique among tasks, usable wherever the task's id is (a-z, 0-9, '_', "
    "'.', '-'; not hex digits only).",
)
@json_option
def task_create(
    environment: str,
    source_path: str | None,
    exclude: tuple[str, ...],
    vcpu_count: int,
    mem_mib: int,
    ttl_seconds: int,
    network: bool,
    name: str | None,
    as_json: bool,
) -> None:
    """Start a task in ENVIRONMENT; print its id (details on stderr)."""
    progress = StderrProgress()
    try:
        info = make_pyro(progress).create_task(
            environment,
            source_path=source_path,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            ttl_seconds=ttl_seconds,
            network=network,
            exclude=list(exclude),
            name=name,
        )
    except PyroError as exc:
        progress.close()
        fail(exc, as_json)
    except KeyboardInterrupt:
        progress.close()
        click.echo("pyro: interrupted; nothing was kept", err=True)
        sys.exit(130)
    progress.close()
    if as_json:
        emit(info)
        return
    click.echo(info.task_id)
    seed = info.workspace_seed
    what = f"{seed.entry_count} entries from {seed.source_path}" if seed.source_path else "empty"
    if not quiet():
        click.echo(
            f"pyro: task {info.task_id} {info.status} ({info.execution_mode}); /workspace: {what}",
            err=True,
        )


@task.command("exec")
@click.argument("task_id", shell_complete=complete_task_id)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@timeout_option
@click.option("--cwd", default=limits.TASK_WORKSPACE, show_default=True, help="Guest directory.")
@env_option
@output_cap_option
@no_stdin_option
@json_option
def task_exec(
    task_id: str,
    command: tuple[str, ...],
    timeout_seconds: int,
    cwd: str,
    env_pairs: tuple[str, ...],
    output_cap: int,
    no_stdin: bool,
    as_json: bool,
) -> None:
    """Run COMMAND in task TASK_ID; exits with the command's exit code (124 on timeout,
    125 for pyro's own errors).

    Put the command after `--`; its words are passed as the exact argv:

        pyro task exec ID -- sh -lc 'echo a && echo b'

    A piped or redirected stdin is streamed to the command; -n gives it an empty one.
    Its stdout and stderr are written here as they come, byte for byte.
    """
    env = parse_env(env_pairs)
    run_guest_command(
        lambda progress, streams: make_pyro(progress).exec_task(
            task_id,
            list(command),
            timeout_seconds=timeout_seconds,
            cwd=cwd,
            env=env,
            stdout_cap=output_cap,
            stderr_cap=output_cap,
            stdin=command_stdin(no_stdin),
            **streams,
        ),
        as_json=as_json,
        timeout_seconds=timeout_seconds,
        interrupted="the command was killed, the task is kept",
    )


@task.command("status")
@click.argument("task_id", shell_complete=complete_task_id)
@json_option
def task_status(task_id: str, as_json: bool) -> None:
    """Show one task (TASK_ID: its id, a unique start of it, or its name)."""
    try:
        info = make_pyro().status_task(task_id)
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(info)
    else:
        _print_task(info)


@task.command("list")
@quiet_option
@json_option
def task_list(quiet: bool, as_json: bool) -> None:
    """List tasks: ID ENV STATUS AGE EXPIRES SOURCE ("no tasks" on stderr when there
    are none). -q prints only the ids; --json prints {"tasks": [...]}."""
    from pyro_mcp.contract.outputs import TaskList

    try:
        tasks = make_pyro().list_tasks()
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(TaskList(tasks=tasks))
    elif quiet:
        for t in tasks:
            click.echo(t.task_id)
    else:
        rows = [
            (
                t.task_id,
                t.name or "-",
                t.environment,
                t.status,
                age(t.created_at),
                expires(t.expires_at),
                t.workspace_seed.source_path or "-",
            )
            for t in tasks
        ]
        print_table(
            ("ID", "NAME", "ENV", "STATUS", "AGE", "EXPIRES", "SOURCE"), rows, empty="no tasks"
        )


@task.command("delete")
@click.argument(
    "task_ids", metavar="TASK_ID...", nargs=-1, required=True, shell_complete=complete_task_id
)
@click.option("-f", "--force", is_flag=True, help="No error for tasks that do not exist (exit 0).")
@json_option
def task_delete(task_ids: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Stop each task's VM and remove it with its workspace (each TASK_ID: an id, a
    unique start of one, or a name). All are tried; the exit status is 125 if one
    could not be deleted (unless --force and it did not exist).

    --json prints the delete result (or the error) for one TASK_ID without --force,
    otherwise {"deleted": [ids], "errors": [{"task_id", "error"}]}."""
    pyro = make_pyro()
    if len(task_ids) == 1 and not force:
        try:
            data = pyro.delete_task(task_ids[0])
        except PyroError as exc:
            fail(exc, as_json)
        if as_json:
            emit(data)
        else:
            click.echo(f"deleted {data.task_id}")
        return
    deleted: list[str] = []
    errors: list[dict[str, Any]] = []
    for ref in task_ids:
        try:
            result = pyro.delete_task(ref)
        except PyroError as exc:
            if force and isinstance(exc, NotFoundError):
                continue
            errors.append({"task_id": ref, "error": exc.to_dict("cli")})
            if not as_json:
                click.echo(f"pyro: error: {exc.message}", err=True)
                hint = exc.hint_for("cli")
                if hint:
                    click.echo(f"pyro: hint: {hint}", err=True)
            continue
        deleted.append(result.task_id)
        if not as_json:
            click.echo(f"deleted {result.task_id}")
    if as_json:
        emit({"deleted": deleted, "errors": errors})
    if errors:
        sys.exit(PyroError.exit_code)


@task.command("prune")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
@json_option
def task_prune(dry_run: bool, as_json: bool) -> None:
    """Remove the tasks that cannot be used again: past their TTL (ttl_expired), creates
    cut short (create_interrupted, incomplete), a backend this version lacks
    (backend_unknown) or a workspace gone (workspace_missing). A task whose VM merely
    stopped is kept: its next exec starts a new VM."""
    try:
        result = make_pyro(reap=False).prune_tasks(dry_run=dry_run)
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(result)
        return
    verb = "would remove" if dry_run else "removed"
    for task_id in result.pruned:
        click.echo(f"{verb} {task_id} ({result.reasons[task_id]})")
    if not result.pruned:
        click.echo("nothing to prune", err=True)
