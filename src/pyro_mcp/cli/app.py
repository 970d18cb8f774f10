"""The root ``pyro`` group, ``pyro run`` and ``pyro doctor``; the other command groups
are one module each (``env``, ``vm``, ``task``, ``files``, ``mcp``) and attach here."""

from __future__ import annotations

import json
import os
import sys

import click

from pyro_mcp import limits
from pyro_mcp._version import __version__
from pyro_mcp.cli.common import (
    BACKEND_CHOICES,
    PROGRESS_CHOICES,
    PyroGroup,
    command_stdin,
    config_defaults,
    emit,
    env_option,
    fail,
    json_option,
    make_pyro,
    mem_option,
    no_stdin_option,
    output_cap_option,
    parse_env,
    run_guest_command,
    timeout_option,
    ttl_option,
    vcpu_option,
)
from pyro_mcp.cli.complete import complete_environment
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
@click.option(
    "-q",
    "--quiet",
    envvar="PYRO_QUIET",
    is_flag=True,
    help="No progress and no notes on stderr (errors still show). Also PYRO_QUIET=1.",
)
@click.option(
    "--progress",
    envvar="PYRO_PROGRESS",
    type=click.Choice(PROGRESS_CHOICES),
    default="auto",
    show_default=True,
    help="How progress shows on stderr: auto (a bar on a terminal, else plain lines), "
    "plain (lines; a running command's heartbeat at most every 10 s) or none. Also "
    "PYRO_PROGRESS.",
)
@click.pass_context
def cli(ctx: click.Context, backend: str | None, quiet: bool, progress: str) -> None:
    """Run commands in disposable local microVMs."""
    # read by make_pyro and StderrProgress; backend None: PYRO_BACKEND, then the config
    del backend, quiet, progress
    from pyro_mcp import config

    try:
        settings = config.load()
    except PyroError as exc:
        if ctx.invoked_subcommand == "doctor":  # it reports the broken file itself
            return
        fail(exc, "--json" in sys.argv)
    ctx.default_map = config_defaults(cli, settings)


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("environment", shell_complete=complete_environment)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@vcpu_option
@mem_option
@timeout_option
@ttl_option(limits.DEFAULT_TTL_SECONDS, "VM")
@click.option("--network", is_flag=True, help="Give the guest a network (not available yet).")
@click.option("--cwd", default=None, help="Guest directory to run in (default: /root).")
@env_option
@output_cap_option
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
    cwd: str | None,
    env_pairs: tuple[str, ...],
    output_cap: int,
    no_stdin: bool,
    as_json: bool,
) -> None:
    """Run COMMAND in a fresh ENVIRONMENT VM, then delete the VM.

    Put the command after `--`; its words are passed as the exact argv:

        pyro run debian:12 -- sh -lc 'echo a && echo b'

    A piped or redirected stdin is streamed to the command
    (`cat data.csv | pyro run debian:12 -- wc -l`); -n gives it an empty one. The
    command's stdout and stderr are written here as they come, byte for byte
    (with --json: whole, in the JSON, as text).
    """
    env = parse_env(env_pairs)
    run_guest_command(
        lambda progress, streams: make_pyro(progress).run_in_vm(
            environment,
            list(command),
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            timeout_seconds=timeout_seconds,
            ttl_seconds=ttl_seconds,
            network=network,
            cwd=cwd,
            env=env,
            stdout_cap=output_cap,
            stderr_cap=output_cap,
            stdin=command_stdin(no_stdin),
            **streams,
        ),
        as_json=as_json,
        timeout_seconds=timeout_seconds,
        interrupted="the VM was deleted",
    )


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
@json_option
def logs(ref: str, follow: bool, lines: int | None, as_json: bool) -> None:
    """Print the console log of a VM, or of a task's current VM.

    ID is a VM id, a task id or name, or a unique start of either (task-3fa, vm-8c, 3fa).
    With --json: {"ref", "log"}; with --follow too, one {"text"} object a line as the
    log grows.
    """
    pyro = make_pyro()
    try:
        if not follow:
            text = pyro.console_log(ref, lines=lines)
            if as_json:
                emit({"ref": ref, "log": text})
                return
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        for text in pyro.follow_console_log(ref, lines=10 if lines is None else lines):
            sys.stdout.write(json.dumps({"text": text}) + "\n" if as_json else text)
            sys.stdout.flush()
    except PyroError as exc:
        fail(exc, as_json)
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
    config = data["config"]
    click.echo(f"config: {config['path']}{'' if config['exists'] else ' (not present)'}")
    for key, source in config.get("sources", {}).items():
        click.echo(f"  {key} = {config[key]!r}  ({source})")


from pyro_mcp.cli.complete import completion  # noqa: E402 - the groups attach to the root above
from pyro_mcp.cli.env import env  # noqa: E402
from pyro_mcp.cli.files import COMMANDS as FILE_COMMANDS  # noqa: E402
from pyro_mcp.cli.mcp import mcp  # noqa: E402
from pyro_mcp.cli.task import task  # noqa: E402
from pyro_mcp.cli.vm import vm  # noqa: E402

for group in (env, vm, task, mcp, completion):
    cli.add_command(group)
for command in FILE_COMMANDS:
    task.add_command(command)


def main() -> None:
    from pyro_mcp.cli.complete import COMPLETE_VAR, register_shells

    if COMPLETE_VAR in os.environ:  # a shell asks for completions
        register_shells()
    cli(prog_name="pyro")


if __name__ == "__main__":
    main()
