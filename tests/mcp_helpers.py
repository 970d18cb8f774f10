"""Launching ``pyro mcp serve`` the way MCP clients do, for the tests.

The server is started as a real subprocess by the ``mcp`` SDK's own stdio
client; ``pyro`` in a command resolves to this venv's console script (the
locally installed one, never anything from a registry).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import mcp_types as types
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.session import ClientRequestContext
from pydantic import FileUrl

PYRO = Path(sys.executable).parent / "pyro"


def resolve_command(command: str) -> str:
    """``pyro`` -> this venv's console script; anything else unchanged."""
    return str(PYRO) if command == "pyro" else command


def server_params(
    command: str,
    args: Sequence[str],
    state_dir: Path,
    *,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> StdioServerParameters:
    passed = {k: v for k, v in os.environ.items() if k.startswith("PYRO_")}
    passed["PYRO_STATE_DIR"] = str(state_dir)
    passed.update(env or {})
    return StdioServerParameters(
        command=resolve_command(command), args=list(args), env=passed, cwd=cwd
    )


def serve_params(state_dir: Path, *args: str, cwd: Path | None = None) -> StdioServerParameters:
    return server_params("pyro", ["mcp", "serve", *args], state_dir, cwd=cwd)


@asynccontextmanager
async def mcp_session(
    params: StdioServerParameters, *, roots: Sequence[Path] | None = None
) -> AsyncIterator[ClientSession]:
    """An initialized ClientSession on a freshly launched server.

    With ``roots``, the client offers them as its MCP roots.
    """

    async def list_roots(context: ClientRequestContext) -> types.ListRootsResult:
        del context
        return types.ListRootsResult(
            roots=[types.Root(uri=FileUrl(p.as_uri()), name=p.name) for p in roots or []]
        )

    async with (
        stdio_client(params) as (read, write),
        ClientSession(
            read, write, list_roots_callback=list_roots if roots is not None else None
        ) as session,
    ):
        await session.initialize()
        yield session


def structured(result: types.CallToolResult) -> dict[str, Any]:
    assert isinstance(result.structured_content, dict), result
    return result.structured_content


def text_of(result: types.CallToolResult) -> str:
    return "\n".join(c.text for c in result.content if isinstance(c, types.TextContent))


def load_configs(path: Path) -> list[dict[str, Any]]:
    """The stdio server entries (``command`` + ``args``) in a JSON or Markdown file."""
    if path.suffix == ".json":
        docs = [json.loads(path.read_text())]
    else:
        blocks = path.read_text().split("```json\n")[1:]
        docs = [json.loads(block.split("```", 1)[0]) for block in blocks]
    entries = []
    for doc in docs:
        servers = doc.get("mcpServers", {"": doc})
        entries += [s for s in servers.values() if "command" in s]
    return entries
