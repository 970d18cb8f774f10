"""The root ``pyro`` group, ``pyro run`` and ``pyro doctor``; the other command groups
are one module each (``env``, ``vm``, ``task``, ``files``, ``mcp``) and attach here."""

from __future__ import annotations

import sys

import click

from pyro_mcp import limits
from pyro_mcp._version import __version__
from pyro_mcp.cli.common import (
    BACKEND_CHOICES,
    PyroGroup,
    StderrProgress,
    command_stdin,
    emit,
    fail,
    finish_exec,
    json_option,
    make_pyro,
    no_stdin_option,
)
from pyro_mcp.errors import PyroError


@click.group(cls=PyroGroup, context_settings={"help_option_names": ["-h", "--help"]})
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
        result = make_pyro(progress).run_in_vm(
            environment,
            list(command),
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            timeout_seconds=timeout_seconds,
            ttl_seconds=ttl_seconds,
            network=network,
            stdin=command_stdin(no_stdin),
        )
    except PyroError as exc:
        progress.close()
        fail(exc, as_json)
    except KeyboardInterrupt:
        progress.close()
        click.echo("pyro: interrupted; the VM was deleted", err=True)
        sys.exit(130)
    progress.close()
    finish_exec(result, as_json, timeout_seconds)


@cli.command()
@click.argument("ref", metavar="ID")
@click.option(
    "-f",
    "--follow",
    is_flag=True,
    help="Keep printing what the VM writes until it stops (or Ctrl-C).",
)
@click.option(
    "-n",
    "--lines",
    type=click.IntRange(min=0),
    default=None,
    help="Only the last N lines (with --follow: 10 by default).",
)
def logs(ref: str, follow: bool, lines: int | None) -> None:
    """Print the console log of a VM, or of a task's current VM.

    ID is a VM id, a task id or name, or a unique start of either (task-3fa, vm-8c, 3fa).
    """
    pyro = make_pyro()
    try:
        if not follow:
            sys.stdout.write(pyro.console_log(ref, lines=lines))
            sys.stdout.flush()
            return
        for text in pyro.follow_console_log(ref, lines=10 if lines is None else lines):
            sys.stdout.write(text)
            sys.stdout.flush()
    except PyroError as exc:
        fail(exc, False)
    except KeyboardInterrupt:
        sys.exit(130)


@cli.command()
@json_option
def doctor(as_json: bool) -> None:
    """Check what this host can run, with advice for each problem."""
    from pyro_mcp.doctor import report

    data = report()
    if as_json:
        emit(data)
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


from pyro_mcp.cli.env import env  # noqa: E402 - the groups attach to the root above
from pyro_mcp.cli.files import COMMANDS as FILE_COMMANDS  # noqa: E402
from pyro_mcp.cli.mcp import mcp  # noqa: E402
from pyro_mcp.cli.task import task  # noqa: E402
from pyro_mcp.cli.vm import vm  # noqa: E402

for group in (env, vm, task, mcp):
    cli.add_command(group)
for command in FILE_COMMANDS:
    task.add_command(command)


def main() -> None:
    cli(prog_name="pyro")


if __name__ == "__main__":
    main()
