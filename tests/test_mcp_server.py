"""`pyro mcp serve` driven by the `mcp` SDK's own clients, with real VMs behind it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import anyio
import httpx2
import pytest
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client

from helpers import vm_record_fields
from mcp_helpers import PYRO, mcp_session, serve_params, structured, text_of
from pyro_mcp.api import Pyro
from pyro_mcp.contract import PROFILES, tools_for


def _vm_records(state_dir: Path) -> list[dict[str, Any]]:
    out = []
    for vm_json in sorted((state_dir / "vms").glob("vm-*/vm.json")):
        try:
            out.append(vm_record_fields(vm_json))
        except (OSError, ValueError, KeyError):
            continue  # mid-write or mid-delete
    return out


def _vm_dirs(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "vms").glob("vm-*"))


async def _wait_for(what: str, check: Any, timeout: float = 60) -> None:
    with anyio.fail_after(timeout):
        while not check():
            await anyio.sleep(0.05)
    del what


def _pid_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_profiles_list_their_tools_with_annotations_and_schemas(state_dir: Path) -> None:
    async def main() -> None:
        for profile in PROFILES:
            async with mcp_session(serve_params(state_dir, "--profile", profile)) as session:
                tools = (await session.list_tools()).tools
                assert [t.name for t in tools] == [t.name for t in tools_for(profile)]
                assert session.instructions and "vm_run" in session.instructions
                assert ("task_create" in session.instructions) == (profile != "vm-run")
                for tool in tools:
                    ann = tool.annotations
                    assert ann is not None, tool.name
                    hints = (
                        ann.read_only_hint,
                        ann.destructive_hint,
                        ann.idempotent_hint,
                        ann.open_world_hint,
                    )
                    assert None not in hints, tool.name
                    assert tool.output_schema is not None
                    assert tool.output_schema["type"] == "object"
                    assert tool.input_schema["type"] == "object"
                    assert tool.description and len(tool.description) > 40

    anyio.run(main)
    vm_run_only = {t.name for t in tools_for("vm-run")}
    assert vm_run_only == {"vm_run", "vm_list_environments"}


@pytest.mark.vm
def test_vm_run_results_and_errors(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    async def main() -> None:
        async with mcp_session(serve_params(state_dir)) as s:
            ok = await s.call_tool(
                "vm_run",
                {"environment": vm_environment, "command": "echo out; echo err >&2; exit 3"},
            )
            # A failing command is a normal result (and the client validated the
            # structured content against the tool's outputSchema).
            assert not ok.is_error
            data = structured(ok)
            assert (data["exit_code"], data["stdout"], data["stderr"]) == (3, "out\n", "err\n")
            assert data["cleanup"] == {"deleted": True, "reason": "run finished"}
            assert "exit code 3" in text_of(ok) and "out" in text_of(ok)

            bad_calls: list[tuple[str, dict[str, Any], str]] = [
                ("vm_run", {"environment": "nosuch:1", "command": "true"}, "not_found"),
                ("vm_run", {"command": "true", "vcpu_count": 99}, "invalid_input"),
                ("vm_run", {"command": "true", "bogus": 1}, "invalid_input"),
                ("vm_run", {}, "invalid_input"),
                ("vm_run", {"command": "true", "env": ["NOEQUALS"]}, "invalid_input"),
                ("vm_run", {"command": "true", "cwd": "tmp"}, "invalid_input"),
                (
                    "vm_run",
                    {"environment": vm_environment, "command": "true", "network": True},
                    "invalid_input",
                ),
                ("vm_create", {}, "not_found"),  # not in the default profile
            ]
            for name, args, code in bad_calls:
                res = await s.call_tool(name, args)
                assert res.is_error, (name, args)
                err = structured(res)["error"]
                assert err["code"] == code, (name, args, err)
                assert err["message"] and err.get("hint"), err
                assert "Traceback" not in text_of(res)
                assert err["message"] in text_of(res)

    anyio.run(main)
    assert _vm_dirs(state_dir) == []


@pytest.mark.vm
def test_vm_run_takes_cwd_env_and_stdin(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    async def main() -> None:
        async with mcp_session(serve_params(state_dir)) as s:
            (tool,) = [t for t in (await s.list_tools()).tools if t.name == "vm_run"]
            for name in ("cwd", "env", "stdin"):
                assert tool.input_schema["properties"][name]["default"] is None
            res = await s.call_tool(
                "vm_run",
                {
                    "environment": vm_environment,
                    "command": 'echo "$PWD|$GREETING|$EMPTY|$PATH"; ls',
                    "cwd": "/etc",
                    "env": ["GREETING=hello=world", "EMPTY="],
                },
            )
            assert not res.is_error, text_of(res)
            first, listing = structured(res)["stdout"].split("\n", 1)
            cwd, greeting, empty, path = first.split("|")
            assert (cwd, greeting, empty) == ("/etc", "hello=world", "")
            assert "/usr/bin" in path.split(":")  # the environment's own variables stay
            assert "passwd" in listing.split()
            res = await s.call_tool(
                "vm_run",
                {"environment": vm_environment, "command": "sort -r", "stdin": "a\nb\n"},
            )
            assert not res.is_error, text_of(res)
            assert structured(res)["stdout"] == "b\na\n"

    anyio.run(main)
    assert _vm_dirs(state_dir) == []


@pytest.mark.vm
def test_full_profile_lifecycle(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    async def main() -> None:
        async with mcp_session(serve_params(state_dir, "--profile", "full")) as s:
            created = structured(
                await s.call_tool("vm_create", {"environment": vm_environment, "ttl_seconds": 120})
            )
            vm_id = created["vm_id"]
            assert created["status"] == "created"
            listed = structured(await s.call_tool("vm_list", {}))
            assert [v["vm_id"] for v in listed["vms"]] == [vm_id]
            started = structured(await s.call_tool("vm_start", {"vm_id": vm_id}))
            assert started["status"] == "running"
            net = structured(await s.call_tool("vm_network_info", {"vm_id": vm_id}))
            assert net["network_enabled"] is False
            assert net["interfaces"] == ["lo"]  # asked of the running guest (/proc/net/dev)
            again = await s.call_tool("vm_start", {"vm_id": vm_id})
            assert again.is_error and structured(again)["error"]["code"] == "invalid_state"
            ran = structured(
                await s.call_tool(
                    "vm_exec",
                    {"vm_id": vm_id, "command": 'echo "hi $PWD $X"', "cwd": "/tmp", "env": ["X=1"]},
                )
            )
            assert ran["stdout"] == "hi /tmp 1\n" and ran["cleanup"]["deleted"] is True
            gone = await s.call_tool("vm_status", {"vm_id": vm_id})
            assert gone.is_error and structured(gone)["error"]["code"] == "not_found"

            other = structured(await s.call_tool("vm_create", {"environment": vm_environment}))
            stopped = await s.call_tool("vm_stop", {"vm_id": other["vm_id"]})
            assert structured(stopped)["status"] == "stopped"
            deleted = structured(await s.call_tool("vm_delete", {"vm_id": other["vm_id"]}))
            assert deleted == {"vm_id": other["vm_id"], "deleted": True}
            reaped = structured(await s.call_tool("vm_reap_expired", {}))
            assert reaped["reaped"] == []
            envs = structured(await s.call_tool("vm_list_environments", {}))
            names = {e["name"]: e["installed"] for e in envs["environments"]}
            assert names[vm_environment] is True

    anyio.run(main)


@pytest.mark.vm
def test_progress_notifications_during_a_long_command(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    seen: list[tuple[float, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        del total
        seen.append((progress, message))

    async def main() -> None:
        async with mcp_session(serve_params(state_dir)) as s:
            res = await s.call_tool(
                "vm_run",
                {"environment": vm_environment, "command": "echo started; sleep 3; echo done"},
                progress_callback=on_progress,
            )
            assert structured(res)["stdout"] == "started\ndone\n"

    anyio.run(main)
    assert len(seen) >= 2, seen
    values = [p for p, _ in seen]
    assert values == sorted(values) and len(set(values)) == len(values)
    assert any(m and "running" in m for _, m in seen), seen
    # A running command's progress carries the tail of what it printed so far.
    assert any(m and "last output: started" in m for _, m in seen), seen


@pytest.mark.vm
def test_concurrent_calls_run_in_parallel_off_the_event_loop(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    finished: list[str] = []

    async def main() -> None:
        async with mcp_session(serve_params(state_dir)) as s:

            async def run(tag: str) -> None:
                res = await s.call_tool(
                    "vm_run", {"environment": vm_environment, "command": f"sleep 6; echo {tag}"}
                )
                assert structured(res)["stdout"] == f"{tag}\n"
                finished.append(tag)

            async with anyio.create_task_group() as tg:
                tg.start_soon(run, "a")
                tg.start_soon(run, "b")
                # Both VMs exist at the same time: the second call did not wait for
                # the first one's boot or command.
                await _wait_for(
                    "two running VMs",
                    lambda: sum(r.get("status") == "running" for r in _vm_records(state_dir)) == 2,
                )
                # ... and the server still answers other requests meanwhile.
                envs = await s.call_tool("vm_list_environments", {})
                assert not envs.is_error
                assert finished == []

    anyio.run(main)
    assert sorted(finished) == ["a", "b"]
    assert _vm_dirs(state_dir) == []


@pytest.mark.vm
def test_cancelled_request_stops_the_command_and_deletes_the_vm(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    async def main() -> None:
        async with mcp_session(serve_params(state_dir)) as s:
            with anyio.CancelScope() as scope:

                async def watch() -> None:
                    await _wait_for(
                        "a running VM",
                        lambda: any(r.get("status") == "running" for r in _vm_records(state_dir)),
                    )
                    await anyio.sleep(1.5)  # the command is running in the guest
                    scope.cancel()

                async with anyio.create_task_group() as tg:
                    tg.start_soon(watch)
                    await s.call_tool(
                        "vm_run", {"environment": vm_environment, "command": "sleep 300"}
                    )
            assert scope.cancelled_caught
            await _wait_for("the VM to be deleted", lambda: _vm_dirs(state_dir) == [], 30)
            # The server is still healthy.
            res = await s.call_tool(
                "vm_run", {"environment": vm_environment, "command": "echo after"}
            )
            assert structured(res)["stdout"] == "after\n"

    anyio.run(main)
    assert _vm_dirs(state_dir) == []


@pytest.mark.vm
def test_vms_of_a_killed_server_are_cleaned_up(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    pids: dict[str, int] = {}

    async def main() -> None:
        async with mcp_session(serve_params(state_dir)) as s:

            async def kill_server() -> None:
                await _wait_for(
                    "a running VM",
                    lambda: any(r.get("status") == "running" for r in _vm_records(state_dir)),
                )
                (record,) = _vm_records(state_dir)
                pids["server"] = record["owner"]["pid"]
                pids["supervisor"] = record["supervisor"]["pid"]
                os.kill(pids["server"], signal.SIGKILL)

            with anyio.fail_after(60), pytest.raises(Exception):  # noqa: B017
                # (the connection just dies)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(kill_server)
                    await s.call_tool(
                        "vm_run", {"environment": vm_environment, "command": "sleep 300"}
                    )

    anyio.run(main)

    async def restart() -> None:
        async with mcp_session(serve_params(state_dir, "--profile", "full")) as s:
            listed = structured(await s.call_tool("vm_list", {}))
            assert listed["vms"] == []

    anyio.run(restart)
    assert _vm_dirs(state_dir) == []
    deadline = time.monotonic() + 30
    while _pid_alive(pids["supervisor"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _pid_alive(pids["supervisor"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.vm
def test_streamable_http_needs_the_token_and_checks_origin(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    port = _free_port()
    token = "test-token-123"
    env = dict(os.environ, PYRO_STATE_DIR=str(state_dir))
    proc = subprocess.Popen(
        [PYRO, "mcp", "serve", "--transport", "streamable-http", "--port", str(port)],
        env={**env, "PYRO_MCP_TOKEN": token},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-11-25",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "0"},
        },
    }
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the HTTP server did not come up"
                time.sleep(0.1)
        with httpx2.Client() as http:
            assert http.post(url, json=init, headers=headers).status_code == 401
            wrong = {**headers, "Authorization": "Bearer nope"}
            assert http.post(url, json=init, headers=wrong).status_code == 401
            authed = {**headers, "Authorization": f"Bearer {token}"}
            evil = {**authed, "Origin": "http://evil.example"}
            assert http.post(url, json=init, headers=evil).status_code == 403
            rebound = {**authed, "Host": f"evil.example:{port}"}
            assert http.post(url, json=init, headers=rebound).status_code == 421

        async def main() -> None:
            client = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"})
            async with (
                client,
                streamable_http_client(url, http_client=client) as (read, write),
                ClientSession(read, write) as s,
            ):
                await s.initialize()
                names = [t.name for t in (await s.list_tools()).tools]
                assert "vm_run" in names
                res = await s.call_tool(
                    "vm_run", {"environment": vm_environment, "command": "echo over-http"}
                )
                assert structured(res)["stdout"] == "over-http\n"

        anyio.run(main)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        if proc.stderr:
            proc.stderr.close()
    assert _vm_dirs(state_dir) == []


@pytest.mark.vm
def test_sigterm_cancels_running_calls_and_exits(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    proc = subprocess.Popen(
        [PYRO, "mcp", "serve"],
        env={**os.environ, "PYRO_STATE_DIR": str(state_dir)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None

    def send(message: dict[str, Any]) -> None:
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(message).encode() + b"\n")
        proc.stdin.flush()

    try:
        send(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "initialize",
                "params": {
                    "protocolVersion": "2025-11-25",
                    "capabilities": {},
                    "clientInfo": {"name": "t", "version": "0"},
                },
            }
        )
        assert json.loads(proc.stdout.readline())["id"] == 1
        send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        args = {"environment": vm_environment, "command": "sleep 300"}
        send(
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "vm_run", "arguments": args},
            }
        )
        deadline = time.monotonic() + 60
        while not any(r.get("status") == "running" for r in _vm_records(state_dir)):
            assert time.monotonic() < deadline, "the VM did not start"
            time.sleep(0.05)
        proc.terminate()
        # stdin stays open: the server must not wait for the client to hang up.
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
    assert _vm_dirs(state_dir) == []


def test_allow_path_replaces_the_working_directory_as_root(state_dir: Path, tmp_path: Path) -> None:
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "secret").write_text("x")

    async def main() -> None:
        params = serve_params(state_dir, "--allow-path", str(allowed), cwd=cwd)
        async with mcp_session(params) as s:
            refused = await s.call_tool("task_create", {"source_path": str(cwd / "secret")})
            assert refused.is_error
            err = structured(refused)["error"]
            assert err["code"] == "invalid_input" and str(allowed) in err["message"]
            assert "--allow-path" in err["hint"]
            # Inside the allowed folder the root check passes (and then the path is
            # missing: no VM is needed to see that).
            missing = await s.call_tool("task_create", {"source_path": str(allowed / "nope")})
            assert "does not exist" in structured(missing)["error"]["message"]
            relative = await s.call_tool("task_create", {"source_path": "nope"})
            assert str(allowed / "nope") in text_of(relative) or "does not exist" in text_of(
                relative
            )

    anyio.run(main)


@pytest.mark.vm
def test_modern_protocol_client(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    """The SDK's high-level Client negotiates the newest protocol era; same tools."""
    seen: list[str | None] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        del progress, total
        seen.append(message)

    async def main() -> None:
        async with Client(serve_params(state_dir)) as client:
            names = [t.name for t in (await client.list_tools()).tools]
            assert names == [t.name for t in tools_for("tasks")]
            res = await client.call_tool(
                "vm_run",
                {"environment": vm_environment, "command": "sleep 2; echo modern"},
                progress_callback=on_progress,
            )
            assert structured(res)["stdout"] == "modern\n"

    anyio.run(main)
    assert seen
