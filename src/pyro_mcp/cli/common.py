"""What every ``pyro`` command shares: exit codes, progress on stderr, errors, JSON,
the SDK object, and the options several commands take."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, NoReturn, TypeVar

import click

from pyro_mcp import limits
from pyro_mcp.errors import InvalidInputError, PyroError
from pyro_mcp.progress import ProgressEvent

EXIT_TIMEOUT = 124
EXIT_PYRO_ERROR = PyroError.exit_code
BACKEND_CHOICES = ("auto", "qemu", "gvisor", "host_compat")

F = TypeVar("F", bound=Callable[..., Any])


PROGRESS_CHOICES = ("auto", "plain", "none")
HEARTBEAT_PLAIN_S = 10.0  # off a terminal: at most one "command running" line this often


def progress_mode() -> str:
    """The root group's ``--progress`` (``none`` under ``--quiet``/PYRO_QUIET=1);
    ``auto`` outside a ``pyro`` command."""
    ctx = click.get_current_context(silent=True)
    params = ctx.find_root().params if ctx is not None else {}
    if params.get("quiet"):
        return "none"
    mode = params.get("progress") or "auto"
    return str(mode)


def quiet() -> bool:
    """Whether pyro's own notes on stderr (not errors) are left out."""
    return progress_mode() == "none"


class StderrProgress:
    """Progress on stderr, as the root group's ``--progress`` says: ``auto`` a rich
    bar on a terminal and plain lines otherwise, ``plain`` lines, ``none`` nothing.
    A command's "running" heartbeat is a line at most every
    :data:`HEARTBEAT_PLAIN_S` as plain lines; once its output shows on the terminal
    the bar goes (:meth:`pause`) so the two never mix."""

    def __init__(self) -> None:
        self._progress: Any = None
        self._task: Any = None
        self._last = ""
        self._last_beat = 0.0
        self._paused = False
        mode = progress_mode()
        self._mode = mode if mode != "auto" else ("bar" if sys.stderr.isatty() else "plain")

    def __call__(self, event: ProgressEvent) -> None:
        if self._mode == "none":
            return
        if self._mode == "plain":
            if event.stage == "exec":
                now = time.monotonic()
                if now - self._last_beat < HEARTBEAT_PLAIN_S:
                    return
                self._last_beat = now
            line = f"pyro: {event.message}"
            if line != self._last:
                self._last = line
                print(line, file=sys.stderr, flush=True)
            return
        if self._paused:
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

    def pause(self) -> None:
        """The command's output is showing: no more bar."""
        self._paused = True
        self.close()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


EXIT_PIPE_CLOSED = 128 + 13  # as a shell reports a command killed by SIGPIPE


class OutputClosed(Exception):
    """Where the command's output goes was closed (``pyro run ... | head -1``): the
    command is stopped and pyro exits :data:`EXIT_PIPE_CLOSED` quietly."""


class OutputWriter:
    """A command's output written as it arrives, byte for byte, to this process's
    stdout and stderr (flushed at once)."""

    def __init__(self, progress: StderrProgress) -> None:
        self._progress = progress
        self.started = False

    def _write(self, stream: Any, data: bytes) -> None:
        if not self.started:
            self.started = True
            self._progress.pause()
        buffer = getattr(stream, "buffer", stream)
        try:
            buffer.write(data)
            buffer.flush()
        except BrokenPipeError:
            # Nothing more can be shown: stop the command; the interpreter's own
            # final flush must not fail either.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
            raise OutputClosed from None

    def stdout(self, data: bytes) -> None:
        self._write(sys.stdout, data)

    def stderr(self, data: bytes) -> None:
        self._write(sys.stderr, data)


def fail(exc: PyroError, as_json: bool) -> NoReturn:
    if as_json:
        click.echo(json.dumps({"error": exc.to_dict("cli")}, indent=2))
    else:
        click.echo(f"pyro: error: {exc.message}", err=True)
        hint = exc.hint_for("cli")
        if hint:
            click.echo(f"pyro: hint: {hint}", err=True)
        tail = exc.details.get("console_tail")
        if tail:
            click.echo("pyro: guest console (last lines):", err=True)
            click.echo(str(tail), err=True)
    sys.exit(exc.exit_code)


def emit(data: Any) -> None:
    """``data`` (a model, or plain JSON-ready data) as JSON on stdout. Lists are
    wrapped by the caller in an object named for what they hold (``{"tasks": [...]}``),
    the shape the MCP tools answer with."""
    if hasattr(data, "model_dump"):
        data = data.model_dump(mode="json")
    click.echo(json.dumps(data, indent=2, default=str))


def quiet_option(fn: F) -> F:
    return click.option(
        "-q",
        "--quiet",
        is_flag=True,
        help="Print only the ids (names for `env list`, paths for `task files`), one a "
        "line, nothing when there are none: `pyro task delete $(pyro task list -q)`.",
    )(fn)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], *, empty: str) -> None:
    """A headed table on stdout, columns padded to their widest cell; with no rows just
    ``empty`` (e.g. "no tasks") on stderr, so stdout holds nothing to parse."""
    if not rows:
        click.echo(empty, err=True)
        return
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        line = "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True))
        click.echo(line.rstrip())


def human_duration(seconds: float) -> str:
    """A rough duration for tables: 45s, 12m, 5h, 3d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def age(when: datetime) -> str:
    """How long ago ``when`` was, for tables."""
    return human_duration(time.time() - when.timestamp())


def expires(when: datetime) -> str:
    """How long until ``when``, for tables: ``in 5h``, or ``expired``."""
    left = when.timestamp() - time.time()
    return f"in {human_duration(left)}" if left > 0 else "expired"


def local_time(when: datetime) -> str:
    """``when`` for people: local time to the second, with its UTC offset."""
    return when.astimezone().isoformat(sep=" ", timespec="seconds")


def run_guest_command(
    call: Callable[[StderrProgress, dict[str, Any]], Any],
    *,
    as_json: bool,
    timeout_seconds: int,
    interrupted: str,
) -> NoReturn:
    """What ``pyro run`` and ``pyro task exec`` share: ``call(progress, streams)`` runs
    the command (``streams``: the ``on_stdout``/``on_stderr`` callbacks that write its
    bytes here as they come; none with --json), then pyro exits by its rules: 125 for
    its own errors, 141 when its stdout was closed, 130 on Ctrl-C (saying
    ``interrupted``), else the command's own code (124 on timeout)."""
    progress = StderrProgress()
    out = OutputWriter(progress)
    streams: dict[str, Any] = {} if as_json else {"on_stdout": out.stdout, "on_stderr": out.stderr}
    try:
        result = call(progress, streams)
    except PyroError as exc:
        progress.close()
        fail(exc, as_json)
    except OutputClosed:
        progress.close()
        sys.exit(EXIT_PIPE_CLOSED)
    except KeyboardInterrupt:
        progress.close()
        if not quiet():
            click.echo(f"pyro: interrupted; {interrupted}", err=True)
        sys.exit(130)
    progress.close()
    finish_exec(result, as_json, timeout_seconds, streamed=not as_json)


def finish_exec(
    result: Any, as_json: bool, timeout_seconds: int, *, streamed: bool = False
) -> NoReturn:
    """Print an exec result (the command's exact bytes unless they were ``streamed``
    already, or JSON) and exit with its code."""
    if as_json:
        emit(result)
    else:
        if not streamed:
            for stream, data in (
                (sys.stdout, result.stdout_bytes),
                (sys.stderr, result.stderr_bytes),
            ):
                buffer = getattr(stream, "buffer", stream)
                buffer.write(data)
                buffer.flush()
        if not quiet():
            if result.stdout_truncated or result.stderr_truncated:
                click.echo("pyro: output was truncated at its cap (see --output-cap)", err=True)
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


def wants_json(args: Sequence[str]) -> bool:
    """Whether a command line asks for JSON: ``--json`` before any ``--`` (after it,
    the words are the guest command's)."""
    words = list(args)
    if "--" in words:
        words = words[: words.index("--")]
    return "--json" in words


def usage_failure(exc: click.ClickException, as_json: bool) -> None:
    """A usage error exits 125; with --json it is printed as the one error shape
    (``{"error": {"code": "invalid_input", ...}}``) on stdout, like pyro's own errors."""
    as_pyro_exit(exc)
    if not as_json:
        return
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else "pyro"
    fail(InvalidInputError(exc.format_message(), hint=f"see `{where} --help`"), True)


class PyroGroup(click.Group):
    """The root group: a usage error anywhere below it (parsing any subcommand, or a
    ``click.BadParameter`` raised in a command) exits 125, like pyro's own errors, and
    is printed as JSON when the command line has ``--json``."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        as_json = wants_json(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            usage_failure(exc, as_json)
            raise
        ctx.meta["pyro.json"] = as_json
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            usage_failure(exc, bool(ctx.meta.get("pyro.json")))
            raise


def parse_env(pairs: tuple[str, ...]) -> dict[str, str]:
    """``--env NAME=value`` items; a bare ``NAME`` passes this process's value (as
    docker does), and one that is not set here is an error."""
    resolved: list[str] = []
    for pair in pairs:
        if "=" not in pair and pair:
            value = os.environ.get(pair)
            if value is None:
                raise click.BadParameter(
                    f"{pair} is not set in this environment (a bare NAME passes its value "
                    f"on); write {pair}=value to give one",
                    param_hint="--env",
                )
            resolved.append(f"{pair}={value}")
        else:
            resolved.append(pair)
    try:
        return limits.parse_env_pairs(resolved, what="--env")
    except InvalidInputError as exc:
        raise click.BadParameter(exc.message, param_hint="--env") from None


def config_defaults(group: click.Group, settings: Any) -> dict[str, Any]:
    """A click ``default_map`` that makes the config's defaults (docs/config.md) the
    defaults of every ``--mem-mib`` and ``--timeout-seconds`` below ``group``, and of
    the ENVIRONMENT of ``task create`` and ``vm create`` (``env pull`` still needs
    one named). A flag on the command line still wins; env vars are in ``settings``."""
    values = {
        "mem_mib": settings.mem_mib,
        "timeout_seconds": settings.timeout_seconds,
        "environment": settings.environment,
    }
    out: dict[str, Any] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            sub = config_defaults(command, settings)
        else:
            arguments = [p for p in command.params if isinstance(p, click.Argument)]
            sub = {
                p.name: values[p.name]
                for p in command.params
                if p.name in ("mem_mib", "timeout_seconds")
                or (p.name == "environment" and arguments == [p] and name == "create")
            }
        if sub:
            out[name] = sub
    return out


def vcpu_option(fn: F) -> F:
    return click.option(
        "--vcpu-count",
        type=click.IntRange(1, limits.MAX_VCPU_COUNT),
        default=limits.DEFAULT_VCPU_COUNT,
        show_default=True,
        help="Virtual CPUs of the guest.",
    )(fn)


def mem_option(fn: F) -> F:
    return click.option(
        "--mem-mib",
        type=click.IntRange(limits.MIN_MEM_MIB, limits.MAX_MEM_MIB),
        default=limits.DEFAULT_MEM_MIB,
        show_default=True,
        help="Guest memory in MiB.",
    )(fn)


def timeout_option(fn: F) -> F:
    return click.option(
        "--timeout-seconds",
        type=click.IntRange(1, limits.MAX_TIMEOUT_SECONDS),
        default=limits.DEFAULT_TIMEOUT_SECONDS,
        show_default=True,
        help="Kill the command after this long; pyro then exits 124.",
    )(fn)


def ttl_option(default: int, what: str) -> Callable[[F], F]:
    def decorate(fn: F) -> F:
        return click.option(
            "--ttl-seconds",
            type=click.IntRange(limits.MIN_TTL_SECONDS, limits.MAX_TTL_SECONDS),
            default=default,
            show_default=True,
            help=f"Delete the {what} this long after it was created, even if in use.",
        )(fn)

    return decorate


def env_option(fn: F) -> F:
    return click.option(
        "--env",
        "env_pairs",
        multiple=True,
        metavar="NAME=VALUE|NAME",
        help="Set a variable in the command's environment; a bare NAME passes this "
        "shell's value. Repeatable.",
    )(fn)


def output_cap_option(fn: F) -> F:
    return click.option(
        "--output-cap",
        type=click.IntRange(1024, limits.MAX_OUTPUT_CAP),
        default=limits.DEFAULT_OUTPUT_CAP,
        show_default=True,
        metavar="BYTES",
        help=f"Keep at most BYTES of stdout and of stderr each (1024 to "
        f"{limits.MAX_OUTPUT_CAP}); the rest is dropped and reported as truncated.",
    )(fn)
