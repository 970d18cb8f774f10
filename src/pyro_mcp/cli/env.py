"""``pyro env``: the environments (list, pull, inspect, prune)."""

from __future__ import annotations

import sys
from typing import Any

import click

from pyro_mcp.cli.common import (
    StderrProgress,
    emit,
    fail,
    json_option,
    make_pyro,
    print_table,
    quiet_option,
)
from pyro_mcp.cli.complete import complete_environment
from pyro_mcp.errors import PyroError


@click.group()
def env() -> None:
    """Guest environments: list, pull, inspect, prune."""


@env.command("list")
@quiet_option
@json_option
def env_list(quiet: bool, as_json: bool) -> None:
    """List the catalog and what is installed.

    Columns: NAME VERSION INSTALLED DESCRIPTION. -q prints only the names; --json
    prints {"environments": [...]}, the `environment_list` tool's answer.
    """
    from pyro_mcp.contract.outputs import EnvironmentList

    try:
        envs = EnvironmentList.of(make_pyro().list_environments()).environments
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(EnvironmentList(environments=envs))
    elif quiet:
        for e in envs:
            click.echo(e.name)
    else:
        rows = [(e.name, e.version, "yes" if e.installed else "no", e.description) for e in envs]
        header = ("NAME", "VERSION", "INSTALLED", "DESCRIPTION")
        print_table(header, rows, empty="no environments")


@env.command("pull")
@click.argument("environment", shell_complete=complete_environment)
@click.option("--force", is_flag=True, help="Rebuild even if installed.")
@json_option
def env_pull(environment: str, force: bool, as_json: bool) -> None:
    """Build (or verify) ENVIRONMENT and its warm-start snapshot."""
    progress = StderrProgress()
    try:
        data = make_pyro(progress).pull_environment(environment, force=force)
    except PyroError as exc:
        progress.close()
        fail(exc, as_json)
    progress.close()
    if as_json:
        emit(data)
    else:
        click.echo(f"{data['name']} {data['version']} ready at {data['path']}")
        if data.get("snapshot"):
            click.echo(f"warm-start snapshot ready at {data['snapshot']}")
        elif data.get("snapshot_error"):
            click.echo(f"no warm-start snapshot: {data['snapshot_error']}", err=True)


@env.command("inspect")
@click.argument("environment", shell_complete=complete_environment)
@click.option("--verify", is_flag=True, help="Re-hash every artifact.")
@json_option
def env_inspect(environment: str, verify: bool, as_json: bool) -> None:
    """Show ENVIRONMENT's artifacts and their state."""
    try:
        info = make_pyro().inspect_environment(environment, verify=verify)
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(info)
    else:
        _print_environment(info)
    if info.get("problems"):
        sys.exit(1)


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / (1 << 20):.0f} MiB"


def _print_environment(info: dict[str, Any]) -> None:
    click.echo(f"name:         {info['name']} {info['version']}")
    click.echo(f"description:  {info['description']}")
    click.echo(f"packages:     {', '.join(info['packages'])}")
    if not info["installed"]:
        click.echo("installed:    no (`pyro env pull` builds it; so does its first use)")
        return
    click.echo(f"installed:    {info['path']} ({_size(info['size_bytes'])} on the host)")
    click.echo(
        f"guest disk:   {_size(info['disk_bytes'])}, {info['disk_free_mib']} MiB free when new"
    )
    if info.get("kernel_release"):
        click.echo(f"kernel:       {info['kernel_release']}")
    if info.get("built_at"):
        click.echo(f"built:        {info['built_at']} in {info['build_seconds']} s")
    if info.get("rootfs_sha256"):
        click.echo(f"rootfs:       sha256 {info['rootfs_sha256']}")
    verified = {None: "not re-hashed (--verify does)", True: "yes", False: "NO"}
    click.echo(f"verified:     {verified[info['verified']]}")
    for problem in info.get("problems") or ():
        click.echo(f"problem:      {problem}")
    snapshots = info.get("snapshots") or []
    if not snapshots:
        click.echo("snapshots:    none (the first run takes one)")
    for snap in snapshots:
        click.echo(
            f"snapshot:     {snap['id']} ({snap['backend']}, {snap['vcpu_count']} vCPU, "
            f"{snap['mem_mib']} MiB, {_size(snap['disk_bytes'])}, taken {snap['created_at']})"
        )


@env.command("prune")
@json_option
def env_prune(as_json: bool) -> None:
    """Remove unused environment versions, leftovers and stale snapshots."""
    try:
        removed = make_pyro().prune_environments()
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit({"removed": removed})
        return
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo("nothing to prune")
