"""What MCP adds to a `vm_run`: the same VM work over stdio MCP and as an SDK call.

    uv run python bench/bench_mcp.py [--runs 20] [--json FILE]

One `pyro mcp serve` process is started once (as an MCP client would) and kept
for all runs; each run is one `tools/call` of `vm_run` with `true`, timed on
the client from request to result. The SDK figure is `Pyro.run_in_vm` of the
same command in this process. The two are interleaved so drift hits both. The
difference of the medians is the MCP overhead (floor: <= 20 ms at p50); the
median of the paired differences is printed too (less sensitive to load). Also
timed without a VM (so without the VM's variance): a `tools/list` round trip,
and `vm_list_environments` over MCP versus `Pyro.list_environments`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
from mcp import ClientSession, StdioServerParameters, stdio_client

from pyro_mcp.api import Pyro

ENV = os.environ.get("PYRO_BENCH_ENV", "debian:12-base")
PYRO = Path(sys.executable).parent / "pyro"


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50_ms": round(statistics.median(values) * 1000, 1),
        "min_ms": round(ordered[0] * 1000, 1),
        "max_ms": round(ordered[-1] * 1000, 1),
        "p95_ms": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000, 1),
    }


async def measure(runs: int, state_dir: Path) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if k.startswith("PYRO_")}
    env["PYRO_STATE_DIR"] = str(state_dir)
    params = StdioServerParameters(command=str(PYRO), args=["mcp", "serve"], env=env)
    sdk = Pyro(state_dir=state_dir)
    args = {"environment": ENV, "command": "true"}
    mcp_times: list[float] = []
    sdk_times: list[float] = []
    list_times: list[float] = []
    envs_mcp: list[float] = []
    envs_sdk: list[float] = []
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        # warm-up: the first call of each path pays one-off costs (imports, snapshot check)
        await session.call_tool("vm_run", args)
        await anyio.to_thread.run_sync(lambda: sdk.run_in_vm(ENV, "true"))
        for _ in range(runs):
            t0 = time.perf_counter()
            result = await session.call_tool("vm_run", args)
            mcp_times.append(time.perf_counter() - t0)
            assert not result.is_error, result

            t0 = time.perf_counter()
            await anyio.to_thread.run_sync(lambda: sdk.run_in_vm(ENV, "true"))
            sdk_times.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await session.list_tools()
            list_times.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await session.call_tool("vm_list_environments", {})
            envs_mcp.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await anyio.to_thread.run_sync(sdk.list_environments)
            envs_sdk.append(time.perf_counter() - t0)
    mcp, plain = summary(mcp_times), summary(sdk_times)
    return {
        "environment": ENV,
        "runs": runs,
        "vm_run_over_mcp": mcp,
        "run_in_vm_sdk": plain,
        "tools_list_round_trip": summary(list_times),
        "vm_list_environments_over_mcp": summary(envs_mcp),
        "list_environments_sdk": summary(envs_sdk),
        "mcp_overhead_p50_ms": round(mcp["p50_ms"] - plain["p50_ms"], 1),
        # each MCP run minus the SDK run right after it: cancels slow drift in load
        "paired_difference_p50_ms": round(
            statistics.median(m - s for m, s in zip(mcp_times, sdk_times, strict=True)) * 1000, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    Pyro(reap=False).pull_environment(ENV)
    with tempfile.TemporaryDirectory(prefix="pyro-bm-") as tmp:
        data = anyio.run(measure, opts.runs, Path(tmp))
    for name in (
        "vm_run_over_mcp",
        "run_in_vm_sdk",
        "tools_list_round_trip",
        "vm_list_environments_over_mcp",
        "list_environments_sdk",
    ):
        row = data[name]
        print(
            f"{name:<30} p50 {row['p50_ms']:>8.1f} ms   "
            f"min {row['min_ms']:>8.1f}   max {row['max_ms']:>8.1f}"
        )
    print(
        f"MCP overhead at p50: {data['mcp_overhead_p50_ms']:+.1f} ms "
        f"(median of paired differences {data['paired_difference_p50_ms']:+.1f} ms) "
        f"over {data['runs']} runs"
    )
    if opts.json:
        opts.json.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
