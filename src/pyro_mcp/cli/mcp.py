"""``pyro mcp serve``: the MCP server."""

from __future__ import annotations

import sys

import click

from pyro_mcp.cli.common import (
    fail,
)
from pyro_mcp.errors import PyroError


@click.group()
def mcp() -> None:
    """Serve the tools to MCP clients (Claude Desktop, Cursor, ...)."""


@mcp.command("serve")
@click.option(
    "--transport",
    type=click.Choice(["stdio", "streamable-http"]),
    default="stdio",
    show_default=True,
    help="stdio for a client that starts the server; streamable-http to serve on --host:--port.",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="HTTP bind address.")
@click.option(
    "--port", type=click.IntRange(1, 65535), default=8765, show_default=True, help="HTTP port."
)
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
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print an error that stops the server from starting as JSON on stdout.",
)
def mcp_serve(
    transport: str,
    host: str,
    port: int,
    token: str | None,
    profile: str,
    allow_paths: tuple[str, ...],
    allow_write: tuple[str, ...],
    as_json: bool,
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
        fail(exc, as_json)
    except KeyboardInterrupt:
        sys.exit(130)
