"""Benchmark the figures the issues name; prints a table (and --json).

    uv run python bench/bench.py [--runs 10] [--skip-cold-provision] [--json FILE]

Measures, on this machine: environment provisioning (cold, in a scratch cache;
and cached), `pyro run ENV -- true` CLI wall time, SDK run_in_vm p50/p95 (cold
boot vs snapshot restore), exec round trip on a running VM, RSS of one VM, and
wall time of 4 concurrent runs.
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyro_mcp.api import Pyro
from pyro_mcp.records import VMRecord
from pyro_mcp.state import read_json

ENV = os.environ.get("PYRO_BENCH_ENV", "debian:12-base")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def timed(fn: Callable[[], object], runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def summary(name: str, values: list[float]) -> dict[str, Any]:
    return {
        "name": name,
        "runs": len(values),
        "p50_s": round(statistics.median(values), 4),
        "p95_s": round(pct(values, 0.95), 4),
        "min_s": round(min(values), 4),
        "max_s": round(max(values), 4),
    }


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def cold_provision() -> dict[str, Any]:
    scratch = Path(tempfile.mkdtemp(prefix="pyro-bench-cache-"))
    env = {**os.environ, "PYRO_CACHE_DIR": str(scratch)}
    code = f"from pyro_mcp.api import Pyro; Pyro(reap=False).pull_environment({ENV!r})"
    try:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True)
        pull = time.perf_counter() - t0
        state = tempfile.mkdtemp(prefix="pyro-bs-")
        env["PYRO_STATE_DIR"] = state
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pyro_mcp.cli", "run", ENV, "--", "true"],
            env=env,
            check=True,
            capture_output=True,
        )
        first_run = time.perf_counter() - t0
        shutil.rmtree(state, ignore_errors=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return {"pull_s": round(pull, 2), "first_run_incl_snapshot_s": round(first_run, 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--skip-cold-provision", action="store_true")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    runs = max(10, args.runs)

    state = Path(tempfile.mkdtemp(prefix="pyro-b-"))
    os.environ["PYRO_STATE_DIR"] = str(state)
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "environment": ENV,
    }
    pyro = Pyro(state_dir=state)

    if not args.skip_cold_provision:
        results["provision_cold"] = cold_provision()
    t0 = time.perf_counter()
    pyro.pull_environment(ENV)  # pull re-verifies every digest
    results["pull_cached_with_verify_s"] = round(time.perf_counter() - t0, 4)
    t0 = time.perf_counter()
    pyro.manager.store.ensure(ENV)  # what a run does: the cheap fingerprint check
    results["provision_cached_s"] = round(time.perf_counter() - t0, 4)
    pyro.run_in_vm(ENV, ["true"])  # make sure the snapshot exists

    pyro_script = shutil.which("pyro", path=str(Path(sys.executable).parent)) or "pyro"
    cli_times = timed(
        lambda: subprocess.run(
            [pyro_script, "run", ENV, "--", "true"], check=True, capture_output=True
        ),
        runs,
    )
    results["cli_run_true"] = summary("pyro run -- true (CLI wall)", cli_times)

    restored = timed(lambda: pyro.run_in_vm(ENV, ["true"]), runs)
    results["sdk_run_restored"] = summary("SDK run_in_vm true (restored)", restored)

    os.environ["PYRO_SNAPSHOTS"] = "0"
    cold = timed(lambda: pyro.run_in_vm(ENV, ["true"]), max(5, runs // 2))
    os.environ.pop("PYRO_SNAPSHOTS")
    results["sdk_run_cold"] = summary("SDK run_in_vm true (cold boot)", cold)

    info = pyro.create_vm(ENV)
    pyro.start_vm(info.vm_id)
    manager = pyro.manager
    manager.exec(info.vm_id, ["true"])
    rtt = timed(lambda: manager.exec(info.vm_id, ["true"]), max(20, runs))
    results["exec_round_trip"] = summary("exec true on a running VM", rtt)
    runtime = VMRecord.from_dict(read_json(state / "vms" / info.vm_id / "vm.json")).runtime
    assert runtime.vmm is not None and runtime.supervisor is not None
    vmm_pid = runtime.vmm.pid
    sup_pid = runtime.supervisor.pid
    results["rss_restored_vm_mib"] = {
        "vmm_rss": round(rss_kib(vmm_pid) / 1024, 1),
        "vmm_peak": round(rss_kib(vmm_pid, "VmHWM") / 1024, 1),
        "supervisor_rss": round(rss_kib(sup_pid) / 1024, 1),
    }
    pyro.delete_vm(info.vm_id)

    def concurrent() -> None:
        threads = [threading.Thread(target=lambda: pyro.run_in_vm(ENV, ["true"])) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    results["concurrent_4_runs"] = summary("4 concurrent run_in_vm (wall)", timed(concurrent, 3))

    with Pyro(state_dir=state, pool_size=1, pool_environment=ENV) as pooled_pyro:
        pool = pooled_pyro.pool
        assert pool is not None

        def pooled() -> None:
            pool.wait_ready(60)  # the replacement is restored between runs
            t0 = time.perf_counter()
            result = pooled_pyro.run_in_vm(ENV, ["true"])
            pooled_times.append(time.perf_counter() - t0)
            assert result.boot == "pooled", result.boot

        pooled_times: list[float] = []
        for _ in range(runs):
            pooled()
    results["sdk_run_pooled"] = summary("SDK run_in_vm true (pooled)", pooled_times)

    # MCP: `vm_run` over stdio against `pyro mcp serve` (bench_mcp.py, same VM work as the SDK)
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        subprocess.run(
            [
                sys.executable,
                str(Path(__file__).with_name("bench_mcp.py")),
                *("--runs", str(runs), "--json", out.name),
            ],
            check=True,
            capture_output=True,
        )
        mcp = json.loads(Path(out.name).read_text())
    results["mcp_vm_run"] = {
        "name": "MCP vm_run round trip (stdio)",
        "runs": runs,
        "p50_s": mcp["vm_run_over_mcp"]["p50_ms"] / 1000,
        "p95_s": mcp["vm_run_over_mcp"]["p95_ms"] / 1000,
    }
    results["mcp_overhead_ms"] = {
        "p50_difference": mcp["mcp_overhead_p50_ms"],
        "paired_difference_p50": mcp["paired_difference_p50_ms"],
        "vm_list_environments_mcp_vs_sdk_p50": [
            mcp["vm_list_environments_over_mcp"]["p50_ms"],
            mcp["list_environments_sdk"]["p50_ms"],
        ],
    }

    importtime = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import pyro_mcp.cli, pyro_mcp.api"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    cumulative = {
        line.split("|")[2].strip(): int(line.split("|")[1])
        for line in importtime.splitlines()
        if line.startswith("import time:") and line.count("|") == 2 and "cumulative" not in line
    }
    results["import_ms"] = {
        "pyro_mcp.cli": round(cumulative.get("pyro_mcp.cli", 0) / 1000, 1),
        "pyro_mcp.api (loaded by `pyro run`)": round(cumulative.get("pyro_mcp.api", 0) / 1000, 1),
    }
    shutil.rmtree(state, ignore_errors=True)

    print(f"pyro-mcp bench — {results['date']} — {results['machine']} — {ENV}")
    for key, value in results.items():
        if isinstance(value, dict) and "p50_s" in value:
            print(
                f"  {value['name']:<36} p50 {value['p50_s'] * 1000:8.1f} ms"
                f"   p95 {value['p95_s'] * 1000:8.1f} ms   (n={value['runs']})"
            )
        elif key not in ("date", "machine", "environment"):
            print(f"  {key:<36} {value}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
