"""``pyro env``: the environments (list, pull, inspect, prune)."""

from __future__ import annotations

import sys

import click

from pyro_mcp.cli.common import (
    StderrProgress,
    emit,
    fail,
    json_option,
    make_pyro,
)
from pyro_mcp.errors import PyroError


@click.group()
def env() -> None:
    """Guest environments: list, pull, inspect, prune."""


@env.command("list")
@json_option
def env_list(as_json: bool) -> None:
    """List the catalog and what is installed."""
    try:
        envs = make_pyro().list_environments()
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(envs)
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
@click.argument("environment")
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
