"""Load: many callers at once get correct, unmixed output and leave consistent state.

* 8 one-shot runs at the same time from 8 processes, mixed: ``pyro run`` (CLI),
  the SDK in its own interpreter, and ``pyro mcp serve`` driven by an MCP client.
* 50 ``task_exec`` calls at the same time on one task, from SDK threads and
  ``pyro task exec`` processes.

Every command prints tokens only it knows, on stdout and stderr; each result
must be exactly its own. bench/bench_load.py measures the same scenarios.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pytest

from helpers import qemu_pids, supervisor_pids
from mcp_helpers import PYRO, mcp_session, serve_params, structured
from pyro_mcp.api import Pyro
from pyro_mcp.models import TaskExecResult

pytestmark = [pytest.mark.vm, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _qemu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pin the microVM backend (subprocesses and MCP servers inherit it)."""
    monkeypatch.setenv("PYRO_BACKEND", "qemu")


def script(token: str) -> str:
    """Output that would show any mixing: several lines per stream, all tagged."""
    return f"for i in 1 2 3; do echo {token}-out-$i; echo {token}-err-$i >&2; done"


def expected(token: str) -> tuple[str, str]:
    return (
        "".join(f"{token}-out-{i}\n" for i in (1, 2, 3)),
        "".join(f"{token}-err-{i}\n" for i in (1, 2, 3)),
    )


SDK_RUN = """
import json, sys
from pyro_mcp.api import Pyro
r = Pyro().run_in_vm(sys.argv[1], sys.argv[2], timeout_seconds=120)
print(json.dumps({"stdout": r.stdout, "stderr": r.stderr, "exit_code": r.exit_code}))
"""


def wait_for_no_leftovers(state_dir: Path) -> None:
    """Deletion returns once the VMM is dead; its supervisor exits right after."""
    deadline = time.monotonic() + 20
    while leftover := qemu_pids(state_dir) + supervisor_pids(state_dir):
        assert time.monotonic() < deadline, f"still running: {leftover}"
        time.sleep(0.05)


def test_8_concurrent_runs_from_cli_sdk_and_mcp(vm_environment: str, state_dir: Path) -> None:
    env = {**os.environ, "PYRO_STATE_DIR": str(state_dir)}
    procs: dict[str, subprocess.Popen[str]] = {}
    for i in range(3):
        token = f"cli{i}-{os.urandom(4).hex()}"
        procs[token] = subprocess.Popen(
            [str(PYRO), "run", vm_environment, "--", "sh", "-c", script(token)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for i in range(3):
        token = f"sdk{i}-{os.urandom(4).hex()}"
        procs[token] = subprocess.Popen(
            [sys.executable, "-c", SDK_RUN, vm_environment, script(token)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    mcp_results: dict[str, dict[str, Any]] = {}

    async def mcp_run(token: str) -> None:
        async with mcp_session(serve_params(state_dir)) as session:
            result = await session.call_tool(
                "vm_run", {"environment": vm_environment, "command": script(token)}
            )
            assert not result.is_error, result
            mcp_results[token] = structured(result)

    async def mcp_both() -> None:
        async with anyio.create_task_group() as group:
            for i in range(2):
                group.start_soon(mcp_run, f"mcp{i}-{os.urandom(4).hex()}")

    anyio.run(mcp_both)

    for token, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (token, proc.returncode, err)
        if token.startswith("cli"):
            # stdout is exactly the guest's; pyro's own progress lines go to stderr too.
            assert out == expected(token)[0]
            tagged = [line for line in err.splitlines() if token in line]
            assert tagged == expected(token)[1].splitlines()
        else:
            data = json.loads(out)
            assert (data["stdout"], data["stderr"], data["exit_code"]) == (*expected(token), 0)
    assert len(mcp_results) == 2
    for token, data in mcp_results.items():
        assert (data["stdout"], data["stderr"], data["exit_code"]) == (*expected(token), 0)

    # Consistent afterwards: every VM deleted, nothing running, no stray files.
    assert Pyro(state_dir=state_dir).list_vms() == []
    assert list((state_dir / "vms").glob("vm-*")) == []
    assert list(state_dir.rglob("*.tmp")) == []
    wait_for_no_leftovers(state_dir)


def test_50_concurrent_execs_on_one_task(vm_environment: str, state_dir: Path) -> None:
    pyro = Pyro(state_dir=state_dir)
    task = pyro.create_task(vm_environment)
    try:
        tokens = [f"t{i:02d}-{os.urandom(3).hex()}" for i in range(50)]
        via_cli = set(tokens[:8])
        start = threading.Barrier(len(tokens) - len(via_cli))

        def sdk_exec(token: str) -> TaskExecResult:
            start.wait(60)
            return pyro.exec_task(
                task.task_id, script(token) + f"; echo {token} > /workspace/{token}"
            )

        env = {**os.environ, "PYRO_STATE_DIR": str(state_dir)}
        procs = {
            token: subprocess.Popen(
                [
                    str(PYRO),
                    "task",
                    "exec",
                    task.task_id,
                    "--json",
                    "--",
                    "sh",
                    "-c",
                    script(token) + f"; echo {token} > /workspace/{token}",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for token in via_cli
        }
        with ThreadPoolExecutor(max_workers=len(tokens)) as pool:
            futures = {t: pool.submit(sdk_exec, t) for t in tokens if t not in via_cli}
            results = {t: f.result(timeout=600) for t, f in futures.items()}
        for token, proc in procs.items():
            out, err = proc.communicate(timeout=600)
            assert proc.returncode == 0, (token, err)
            data = json.loads(out)
            assert (data["stdout"], data["stderr"]) == expected(token)
        for token, result in results.items():
            assert (result.exit_code, result.timed_out) == (0, False)
            assert (result.stdout, result.stderr) == expected(token)
        listing = pyro.exec_task(
            task.task_id, 'for f in /workspace/t*; do echo "${f##*/}=$(cat $f)"; done'
        )
        assert listing.stdout.split() == sorted(f"{t}={t}" for t in tokens)
        assert pyro.status_task(task.task_id).status == "running"
        assert len(pyro.list_vms()) == 1
    finally:
        pyro.delete_task(task.task_id)
    assert pyro.list_tasks() == [] and pyro.list_vms() == []
    wait_for_no_leftovers(state_dir)
