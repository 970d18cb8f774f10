"""Errors carry a hint for the surface that raised them: the CLI names commands, the
SDK methods, MCP tools. No VM: a missing task is found missing without one."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import anyio
import pytest

from mcp_helpers import mcp_session, serve_params, structured, text_of
from pyro_mcp import NotFoundError, Pyro, PyroError
from pyro_mcp.contract.spec import ToolOutcome
from pyro_mcp.control import error_from_dict
from pyro_mcp.errors import InvalidInputError, hints
from test_cli import pyro_argv

MISSING = "task-0123456789ab"


def test_hint_for_picks_the_surface_and_falls_back_to_the_plain_hint() -> None:
    exc = PyroError("m", hint="plain", hints=hints(cli="c", sdk="s", mcp="m"))
    assert (exc.hint_for("cli"), exc.hint_for("sdk"), exc.hint_for("mcp")) == ("c", "s", "m")
    assert exc.hint == "s" and str(exc) == "m (hint: s)"
    only_plain = PyroError("m", hint="plain")
    assert only_plain.hint == only_plain.hint_for("mcp") == only_plain.hint_for("cli") == "plain"
    partial = PyroError("m", hint="plain", hints={"cli": "c"})
    assert (partial.hint, partial.hint_for("cli"), partial.hint_for("mcp")) == (
        "plain",
        "c",
        "plain",
    )
    # per surface, one hint and no variants; without one, every variant (the wire)
    assert exc.to_dict("mcp") == {"code": "pyro_error", "message": "m", "hint": "m"}
    assert exc.to_dict()["hints"] == {"cli": "c", "sdk": "s", "mcp": "m"}


def test_hints_survive_the_control_protocol() -> None:
    sent = NotFoundError("gone", hints=hints(cli="c", sdk="s", mcp="m"), details={"a": 1})
    got = error_from_dict(json.loads(json.dumps(sent.to_dict())))
    assert isinstance(got, NotFoundError)
    assert (got.hint_for("cli"), got.hint, got.hint_for("mcp"), got.details) == (
        "c",
        "s",
        "m",
        {"a": 1},
    )


def test_sdk_not_found_names_the_sdk_method(state_dir: Path) -> None:
    pyro = Pyro(state_dir=state_dir, reap=False)
    with pytest.raises(NotFoundError) as info:
        pyro.status_task(MISSING)
    assert info.value.hint is not None and "list_tasks()" in info.value.hint
    assert "pyro task list" not in str(info.value)
    with pytest.raises(NotFoundError) as vm_info:
        pyro.status_vm("vm-0123456789ab")
    assert "list_vms()" in (vm_info.value.hint or "")
    with pytest.raises(NotFoundError) as unknown:
        pyro.status_task("nope")  # a name or id prefix nobody has
    assert "list_tasks()" in (unknown.value.hint or "")
    with pytest.raises(InvalidInputError) as bad:
        pyro.status_task("../nope")
    assert "list_tasks()" in (bad.value.hint or "")


def test_mcp_names_the_tool(state_dir: Path) -> None:
    # in process: the MCP outcome of the SDK's error
    try:
        Pyro(state_dir=state_dir, reap=False).status_task(MISSING)
    except NotFoundError as exc:
        outcome = ToolOutcome.from_error(exc)
    assert "task_list" in outcome.structured["error"]["hint"]
    assert "pyro task" not in outcome.text and "list_tasks()" not in outcome.text

    async def main() -> None:  # and through a real MCP session
        with anyio.fail_after(60):
            await session()

    async def session() -> None:
        async with mcp_session(serve_params(state_dir)) as s:
            res = await s.call_tool("task_status", {"task_id": MISSING})
            assert res.is_error
            error = structured(res)["error"]
            assert error["code"] == "not_found"
            assert "task_list" in error["hint"] and "pyro task list" not in error["hint"]
            assert "task_list" in text_of(res)
            gone = await s.call_tool("task_delete", {"task_id": MISSING})
            assert "task_list" in structured(gone)["error"]["hint"]

    anyio.run(main)


def test_cli_names_the_command(state_dir: Path) -> None:
    env = {**os.environ, "PYRO_STATE_DIR": str(state_dir)}
    proc = subprocess.run(
        [*pyro_argv(), "task", "status", MISSING],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 125
    assert "pyro: hint: list tasks with `pyro task list`" in proc.stderr
    as_json = subprocess.run(
        [*pyro_argv(), "task", "status", "--json", MISSING],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    error = json.loads(as_json.stdout)["error"]
    assert "pyro task list" in error["hint"] and "hints" not in error
