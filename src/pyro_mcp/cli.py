"""The ``pyro`` command line.

Exit codes: ``pyro run`` and ``pyro task exec`` exit with the guest command's own
exit code, 124 when it timed out. Every command exits 125 (``PyroError.exit_code``)
for pyro's own errors (bad input, boot failure, ...) and for usage errors (unknown
option, missing argument, bad value), so 1..123 only ever come from a guest command.
Only the guest command's output goes to stdout; progress and errors go to stderr.

(Over the usual module size for now: the command groups are to become one module
each, ``cli/run.py``, ``cli/task.py``, ..., with the CLI and SDK work of issue 15.)
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from pyro_mcp import limits
from pyro_mcp._version import __version__
from pyro_mcp.errors import InvalidInputError, PyroError
from pyro_mcp.progress import ProgressEvent

EXIT_TIMEOUT = 124
EXIT_PYRO_ERROR = PyroError.exit_code
BACKEND_CHOICES = ("auto", "qemu", "gvisor", "host_compat")

F = TypeVar("F", bound=Callable[..., Any])


class StderrProgress:
    """Progress on stderr: a rich bar on a terminal, plain lines otherwise."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Any = None
        self._last = ""

    def __call__(self, event: ProgressEvent) -> None:
        if not sys.stderr.isatty():
            line = f"pyro: {event.message}"
            if line != self._last:
                self._last = line
                print(line, file=sys.stderr, flush=True)
            return
        if self._progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.fields[stage]}[/bold] {task.description}"),
                BarColumn(),
                console=Console(stderr=True),
                transient=True,
            )
            self._progress.start()
            self._task = self._progress.add_task(event.message, total=None, stage=event.stage)
        self._progress.update(
            self._task,
            description=event.message,
            stage=event.stage,
            completed=event.completed or 0,
            total=event.total,
        )

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def _fail(exc: PyroError, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"error": exc.to_dict()}, indent=2))
    else:
        click.echo(f"pyro: error: {exc.message}", err=True)
        if exc.hint:
            click.echo(f"pyro: hint: {exc.hint}", err=True)
        tail = exc.details.get("console_tail")
        if tail:
            click.echo("pyro: guest console (last lines):", err=True)
            click.echo(str(tail), err=True)
    sys.exit(exc.exit_code)


def _emit(data: Any) -> None:
    if hasattr(data, "model_dump"):
        data = data.model_dump()
    elif isinstance(data, list):
        data = [d.model_dump() if hasattr(d, "model_dump") else d for d in data]
    click.echo(json.dumps(data, indent=2, default=str))


def _finish_exec(result: Any, as_json: bool, timeout_seconds: int) -> NoReturn:
    """Print an exec result (the command's streams, or JSON) and exit with its code."""
    if as_json:
        _emit(result)
    else:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
        if result.stdout_truncated or result.stderr_truncated:
            click.echo("pyro: output was truncated at its cap", err=True)
        if result.timed_out:
            click.echo(f"pyro: command timed out after {timeout_seconds} s", err=True)
    sys.exit(EXIT_TIMEOUT if result.timed_out else result.exit_code)


def _pyro(progress: StderrProgress | None = None) -> Any:
    from pyro_mcp.api import Pyro

    backend = click.get_current_context().find_root().params.get("backend")
    if progress is None:
        return Pyro(backend=backend)
    return Pyro(backend=backend, progress=progress)


def json_option(fn: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")(fn)


def no_stdin_option(fn: F) -> F:
    return click.option(
        "-n",
        "--no-stdin",
        is_flag=True,
        help="Give the command an empty stdin instead of passing this one's through "
        "(use it in `while read ...; do pyro ...; done < file` loops). A terminal is "
        "never read.",
    )(fn)


def _command_stdin(no_stdin: bool) -> Any:
    """This process's stdin for the guest command, streamed: None (an empty stdin)
    with --no-stdin, on a terminal (never wait for the user) or when it is closed."""
    stream = sys.stdin
    if no_stdin or stream is None:
        return None
    try:
        if stream.isatty():
            return None
    except (ValueError, OSError):  # closed
        return None
    return getattr(stream, "buffer", None)


def _as_pyro_exit(exc: click.ClickException) -> None:
    # click declares exit_code a class variable; this one instance exits 125.
    setattr(exc, "exit_code", EXIT_PYRO_ERROR)  # noqa: B010


class _PyroGroup(click.Group):
    """The root group: a usage error anywhere below it (parsing any subcommand, or a
    ``click.BadParameter`` raised in a command) exits 125, like pyro's own errors."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            _as_pyro_exit(exc)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            _as_pyro_exit(exc)
            raise


@click.group(cls=_PyroGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pyro")
@click.option(
    "--backend",
    envvar="PYRO_BACKEND",
    type=click.Choice(BACKEND_CHOICES),
    default=None,
    help="auto (the default): qemu with KVM where KVM really works, else qemu with TCG; "
    "gvisor only when QEMU is missing (`pyro doctor` says which and why). qemu: a "
    "microVM. gvisor: a gVisor sandbox (near-native CPU speed, no VM). host_compat: an "
    "explicit opt-in to run tasks and `pyro run` on the host, confined by bubblewrap "
    "(no VM). Also PYRO_BACKEND.",
)
def cli(backend: str | None) -> None:
    """Run commands in disposable local microVMs."""


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("environment")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option("--vcpu-count", type=int, default=limits.DEFAULT_VCPU_COUNT, show_default=True)
@click.option("--mem-mib", type=int, default=limits.DEFAULT_MEM_MIB, show_default=True)
@click.option(
    "--timeout-seconds", type=int, default=limits.DEFAULT_TIMEOUT_SECONDS, show_default=True
)
@click.option("--ttl-seconds", type=int, default=limits.DEFAULT_TTL_SECONDS, show_default=True)
@click.option("--network", is_flag=True, help="Give the guest a network (not available yet).")
@no_stdin_option
@json_option
def run(
    environment: str,
    command: tuple[str, ...],
    vcpu_count: int,
    mem_mib: int,
    timeout_seconds: int,
    ttl_seconds: int,
    network: bool,
    no_stdin: bool,
    as_json: bool,
) -> None:
    """Run COMMAND in a fresh ENVIRONMENT VM, then delete the VM.

    Put the command after `--`; its words are passed as the exact argv:

        pyro run debian:12 -- sh -lc 'echo a && echo b'

    A piped or redirected stdin is streamed to the command
    (`cat data.csv | pyro run debian:12 -- wc -l`); -n gives it an empty one.
    """
    progress = StderrProgress()
    try:
        result = _pyro(progress).run_in_vm(
            environment,
            list(command),
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            timeout_seconds=timeout_seconds,
            ttl_seconds=ttl_seconds,
            network=network,
            stdin=_command_stdin(no_stdin),
        )
    except PyroError as exc:
        progress.close()
        _fail(exc, as_json)
    except KeyboardInterrupt:
        progress.close()
        click.echo("pyro: interrupted; the VM was deleted", err=True)
        sys.exit(130)
    progress.close()
    _finish_exec(result, as_json, timeout_seconds)


@cli.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check what this host can run, with advice for each problem."""
    from pyro_mcp.doctor import report

    data = report()
    if as_json:
        _emit(data)
        return
    marks = {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}
    for check in data["checks"]:
        click.echo(f"[{marks[check['status']]}] {check['name']}: {check['detail']}")
        if check.get("advice"):
            click.echo(f"       -> {check['advice']}")
    backend = data["backend"]
    if backend.get("name"):
        click.echo(f"backend: {backend['name']} ({backend['acceleration']})")
        if backend.get("reason"):
            click.echo(f"       -> {backend['reason']}")
    else:
        click.echo(f"backend: none usable: {backend.get('error')}")


# -- environments ------------------------------------------------------------
@cli.group()
def env() -> None:
    """Guest environments: list, pull, inspect, prune."""


@env.command("list")
@json_option
def env_list(as_json: bool) -> None:
    """List the catalog and what is installed."""
    try:
        envs = _pyro().list_environments()
    except PyroError as exc:
        _fail(exc, as_json)
    if as_json:
        _emit(envs)
        return
    for e in envs:
        state = "installed" if e["installed"] else "not installed"
        click.echo(f"{e['name']:<18} {e['version']:<8} {state:<14} {e['description']}")


@env.command("pull")
@click.argument("environment")
@click.option("--force", is_flag=True, help="Rebuild even if installed.")
@json_option
def env_pull(environment: str, force: bool, as_json: bool) -> None:
    """Build (or verify) ENVIRONMENT and its warm-start snapshot."""
    progress = StderrProgress()
    try:
        data = _pyro(progress).pull_environment(environment, force=force)
    except PyroError as exc:
        progress.close()
        _fail(exc, as_json)
    progress.close()
    if as_json:
        _emit(data)
    else:
        click.echo(f"{data['name']} {data['version']} ready at {data['path']}")
        if data.get("snapshot"):
            click.echo(f"warm-start snapshot ready at {data['snapshot']}")
        elif data.get("snapshot_error"):
            click.echo(f"no warm-start snapshot: {data['snapshot_error']}", err=True)


@env.command("inspect")
@click.argument("environment")
@click.option("--verify", is_flag=True, help="Re-hash every artifact.")
@json_option
def env_inspect(environment: str, verify: bool, as_json: bool) -> None:
    """Show ENVIRONMENT's artifacts and their state."""
    try:
        info = _pyro().inspect_environment(environment, verify=verify)
    except PyroError as exc:
        _fail(exc, as_json)
    if as_json:
        _emit(info)
        return
    for key, value in info.items():
        click.echo(f"{key}: {value}")
    if info.get("problems"):
        sys.exit(1)


@env.command("prune")
@json_option
def env_prune(as_json: bool) -> None:
    """Remove unused environment versions, leftovers and stale snapshots."""
    try:
        removed = _pyro().prune_environments()
    except PyroError as exc:
        _fail(exc, as_json)
    if as_json:
        _emit({"removed": removed})
        return
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo("nothing to prune")


# -- VMs ---------------------------------------------------------------------
@cli.group()
def vm() -> None:
    """Inspect and clean up VMs (for one-shot commands use `pyro run`)."""


@vm.command("list")
@json_option
def vm_list(as_json: bool) -> None:
    try:
        vms = _pyro().list_vms()
    except PyroError as exc:
        _fail(exc, as_json)
    if as_json:
        _emit(vms)
        return
    for v in vms:
        click.echo(f"{v.vm_id}  {v.environment:<16} {v.status:<8} {v.boot or '-'}")


@vm.command("status")
@click.argument("vm_id")
@json_option
def vm_status(vm_id: str, as_json: bool) -> None:
    try:
        info = _pyro().status_vm(vm_id)
    except PyroError as exc:
        _fail(exc, as_json)
    _emit(info)


@vm.command("delete")
@click.argument("vm_id")
@json_option
def vm_delete(vm_id: str, as_json: bool) -> None:
    try:
        data = _pyro().delete_vm(vm_id)
    except PyroError as exc:
        _fail(exc, as_json)
    if as_json:
        _emit(data)
    else:
        click.echo(f"deleted {vm_id}")


@vm.command("reap")
@json_option
def vm_reap(as_json: bool) -> None:
    """Delete VMs past their TTL and those of dead `pyro` processes."""
    try:
        data = _pyro().reap_expired()
    except PyroError as exc:
        _fail(exc, as_json)
    if as_json:
        _emit(data)
    else:
        for vm_id in data.reaped:
            click.echo(f"reaped {vm_id} ({data.reasons.get(vm_id)})")


# -- tasks -------------------------------------------------------------------
@cli.group()
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
    remaining = max(0, int(info.expires_at - time.time()))
    click.echo(f"expires in:   {remaining} s")


@task.command("create")
@click.argument("environment")
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
@click.option("--vcpu-count", type=int, default=limits.DEFAULT_VCPU_COUNT, show_default=True)
@click.option("--mem-mib", type=int, default=limits.DEFAULT_MEM_MIB, show_default=True)
@click.option("--ttl-seconds", type=int, default=limits.DEFAULT_TASK_TTL_SECONDS, show_default=True)
@click.option("--network", is_flag=True, help="Give the guest a network (not available yet).")
@json_option
def task_create(
    environment: str,
    source_path: str | None,
    exclude: tuple[str, ...],
    vcpu_count: int,
    mem_mib: int,
    ttl_seconds: int,
    network: bool,
    as_json: bool,
) -> None:
    """Start a task in ENVIRONMENT; print its id (details on stderr)."""
    progress = StderrProgress()
    try:
        info = _pyro(progress).create_task(
            environment,
            source_path=source_path,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            ttl_seconds=ttl_seconds,
            network=network,
            exclude=list(exclude),
        )
    except PyroError as exc:
        progress.close()
        _fail(exc, as_json)
    except KeyboardInterrupt:
        progress.close()
        click.echo("pyro: interrupted; nothing was kept", err=True)
        sys.exit(130)
    progress.close()
    if as_json:
        _emit(info)
        return
    click.echo(info.task_id)
    seed = info.workspace_seed
    what = f"{seed.entry_count} entries from {seed.source_path}" if seed.source_path else "empty"
    click.echo(
        f"pyro: task {info.task_id} {info.status} ({info.execution_mode}); /workspace: {what}",
        err=True,
    )


def _parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    try:
        return limits.parse_env_pairs(pairs, what="--env")
    except InvalidInputError as exc:
        raise click.BadParameter(exc.message, param_hint="--env") from None


@task.command("exec")
@click.argument("task_id")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.option(
    "--timeout-seconds", type=int, default=limits.DEFAULT_TIMEOUT_SECONDS, show_default=True
)
@click.option("--cwd", default=limits.TASK_WORKSPACE, show_default=True, help="Guest directory.")
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@no_stdin_option
@json_option
def task_exec(
    task_id: str,
    command: tuple[str, ...],
    timeout_seconds: int,
    cwd: str,
    env_pairs: tuple[str, ...],
    no_stdin: bool,
    as_json: bool,
) -> None:
    """Run COMMAND in task TASK_ID; exits with the command's exit code (124 on timeout,
    125 for pyro's own errors).

    Put the command after `--`; its words are passed as the exact argv:

        pyro task exec ID -- sh -lc 'echo a && echo b'

    A piped or redirected stdin is streamed to the command; -n gives it an empty one.
    """
    progress = StderrProgress()
    try:
        env = _parse_env(env_pairs)
        result = _pyro(progress).exec_task(
            task_id,
            list(command),
            timeout_seconds=timeout_seconds,
            cwd=cwd,
            env=env,
            stdin=_command_stdin(no_stdin),
        )
    except PyroError as exc:
        progress.close()
        _fail(exc, as_json)
    except KeyboardInterrupt:
        progress.close()
        click.echo("pyro: interrupted; the command was killed, the task is kept", err=True)
        sys.exit(130)
    progress.close()
    _finish_exec(result, as_json, timeout_seconds)


@task.command("status")
@click.argument("task_id")
@json_option
def task_status(task_id: str, as_json: bool) -> None:
    """Show one task."""
    try:
        info = _pyro().status_task(task_id)
    except PyroError as exc:
        _fail(exc, as_json)
    if as_json:
        _emit(info)
    else:
        _print_task(info)


@task.command("list")
@json_option
def task_list(as_json: bool) -> None:
    """List tasks."""
    try:
        tasks = _pyro().list_tasks()
    except PyroError as exc:
        _fail(exc, as_json)
    if as_json:
        _emit(tasks)
        return
    for t in tasks:
        seed = t.workspace_seed
        source = seed.source_path or "(empty)"
        click.echo(
            f"{t.task_id}  {t.environment:<16} {t.status:<8} {t.execution_mode:<12} {source}"
        )


@task.command("delete")
@click.argument("task_id")
@json_option
def task_delete(task_id: str, as_json: bool) -> None:
    """Stop TASK_ID's VM and remove it with its workspace."""
    try:
        data = _pyro().delete_task(task_id)
    except PyroError as exc:
        _fail(exc, as_json)
    if as_json:
        _emit(data)
    else:
        click.echo(f"deleted {task_id}")


def _register_file_commands() -> None:
    from pyro_mcp.cli_files import COMMANDS

    for command in COMMANDS:
        task.add_command(command)


_register_file_commands()


# -- MCP -----------------------------------------------------------------------
@cli.group()
def mcp() -> None:
    """Serve the tools to MCP clients (Claude Desktop, Cursor, ...)."""


@mcp.command("serve")
@click.option(
    "--transport",
    type=click.Choice(["stdio", "streamable-http"]),
    default="stdio",
    show_default=True,
)
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP bind address.")
@click.option("--port", type=int, default=8765, show_default=True, help="HTTP port.")
@click.option(
    "--token",
    envvar="PYRO_MCP_TOKEN",
    default=None,
    help="Bearer token HTTP clients must send (default: a random one, printed). "
    "Also PYRO_MCP_TOKEN.",
)
@click.option(
    "--profile",
    type=click.Choice(["vm-run", "tasks", "full"]),
    default="tasks",
    show_default=True,
    help="vm-run: vm_run + vm_list_environments; tasks: adds task_*; full: every tool.",
)
@click.option(
    "--allow-path",
    "allow_paths",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, resolve_path=True),
    help="Folder a source_path may come from (repeatable). Used when the client "
    "offers no MCP roots; default: the working directory.",
)
@click.option(
    "--allow-write",
    "allow_write",
    multiple=True,
    type=click.Path(exists=True, file_okay=False, resolve_path=True),
    help="Folder task_export may write into (repeatable), besides the client's MCP "
    "roots. Default: none (the working directory is not writable unless named).",
)
def mcp_serve(
    transport: str,
    host: str,
    port: int,
    token: str | None,
    profile: str,
    allow_paths: tuple[str, ...],
    allow_write: tuple[str, ...],
) -> None:
    """Run the MCP server (stdio by default)."""
    from pathlib import Path

    from pyro_mcp.mcp_server import ServerConfig, serve

    backend = click.get_current_context().find_root().params.get("backend")
    config = ServerConfig(
        profile=profile,  # type: ignore[arg-type]
        allow_paths=[Path(p) for p in allow_paths],
        allow_write=[Path(p) for p in allow_write],
        backend=backend,
    )
    try:
        serve(config, transport=transport, host=host, port=port, token=token)
    except PyroError as exc:
        _fail(exc, False)
    except KeyboardInterrupt:
        sys.exit(130)


def main() -> None:
    cli(prog_name="pyro")


if __name__ == "__main__":
    main()
