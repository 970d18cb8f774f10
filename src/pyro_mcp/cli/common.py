"""What every ``pyro`` command shares: exit codes, progress on stderr, errors, JSON,
the SDK object, and the options several commands take."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click

from pyro_mcp import limits
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


def fail(exc: PyroError, as_json: bool) -> NoReturn:
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


def emit(data: Any) -> None:
    if hasattr(data, "model_dump"):
        data = data.model_dump()
    elif isinstance(data, list):
        data = [d.model_dump() if hasattr(d, "model_dump") else d for d in data]
    click.echo(json.dumps(data, indent=2, default=str))


def finish_exec(result: Any, as_json: bool, timeout_seconds: int) -> NoReturn:
    """Print an exec result (the command's streams, or JSON) and exit with its code."""
    if as_json:
        emit(result)
    else:
        sys.stdout.write(result.stdout)
        sys.stdout.flush()
        sys.stderr.write(result.stderr)
        if result.stdout_truncated or result.stderr_truncated:
            click.echo("pyro: output was truncated at its cap", err=True)
        if result.timed_out:
            click.echo(f"pyro: command timed out after {timeout_seconds} s", err=True)
    sys.exit(EXIT_TIMEOUT if result.timed_out else result.exit_code)


def make_pyro(progress: StderrProgress | None = None, *, reap: bool = True) -> Any:
    """The SDK object for a command; ``reap=False`` leaves expired leftovers alone
    (``pyro task prune --dry-run`` must see them, not remove them)."""
    from pyro_mcp.api import Pyro

    backend = click.get_current_context().find_root().params.get("backend")
    if progress is None:
        return Pyro(backend=backend, reap=reap)
    return Pyro(backend=backend, progress=progress, reap=reap)


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


def command_stdin(no_stdin: bool) -> Any:
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


def as_pyro_exit(exc: click.ClickException) -> None:
    # click declares exit_code a class variable; this one instance exits 125.
    setattr(exc, "exit_code", EXIT_PYRO_ERROR)  # noqa: B010


class PyroGroup(click.Group):
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
            as_pyro_exit(exc)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            as_pyro_exit(exc)
            raise


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    try:
        return limits.parse_env_pairs(pairs, what="--env")
    except InvalidInputError as exc:
        raise click.BadParameter(exc.message, param_hint="--env") from None
