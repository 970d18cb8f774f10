"""Benchmark tasks: seed throughput, task create time, task_exec p50.

    uv run python bench/bench_tasks.py [--runs 20] [--backends qemu,gvisor,host_compat]
                                       [--json FILE]

Seeds a 200 MB tree of mixed file sizes (60 % in 8-24 MiB files, 30 % in
64 KiB-1 MiB, 10 % in 100 B-16 KiB), as a directory and as a .tar.gz:

* host seed throughput: validate + extract + hash (+ ``mkfs.ext4 -d`` for the
  microVM disk), without any VM;
* ``task create`` wall time, empty and with each seed, per backend;
* ``task_exec`` p50 of ``true`` (exact argv) on a running task, per backend.

Floors from the tasks issue: seed >= 50 MB/s, task_exec p50 <= 50 ms. Backends
that are not usable here are skipped (and said so).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from pyro_mcp.api import Pyro
from pyro_mcp.errors import PyroError
from pyro_mcp.workspace.seed import build_workspace_image, seed_tree
from test_workspace_seed import make_mixed_tree

ENV = os.environ.get("PYRO_BENCH_ENV", "debian:12-base")
SEED_FLOOR_MBPS = 50.0
EXEC_FLOOR_MS = 50.0


def host_seed(source: Path, scratch: Path, with_image: bool) -> dict[str, Any]:
    staging = scratch / "staging"
    shutil.rmtree(scratch, ignore_errors=True)
    staging.mkdir(parents=True)
    t0 = time.perf_counter()
    result = seed_tree(staging, source)
    if with_image:
        build_workspace_image(staging, scratch / "workspace.img", entry_count=result.entry_count)
    seconds = time.perf_counter() - t0
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "seconds": round(seconds, 3),
        "mb_per_s": round(result.bytes_written / 1e6 / seconds, 1),
        "entries": result.entry_count,
    }


def bench_backend(backend: str, sources: dict[str, Path], runs: int) -> dict[str, Any]:
    pyro = Pyro(backend=backend)
    out: dict[str, Any] = {}
    created = []
    for _ in range(5):
        t0 = time.perf_counter()
        info = pyro.create_task(ENV)
        created.append(time.perf_counter() - t0)
        if len(created) < 5:
            pyro.delete_task(info.task_id)
    out["create_empty_p50_s"] = round(statistics.median(created), 3)
    try:
        pyro.exec_task(info.task_id, ["true"])
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            pyro.exec_task(info.task_id, ["true"])
            times.append(time.perf_counter() - t0)
        out["exec_true_p50_ms"] = round(statistics.median(times) * 1000, 1)
        out["exec_true_max_ms"] = round(max(times) * 1000, 1)
    finally:
        pyro.delete_task(info.task_id)
    for name, source in sources.items():
        t0 = time.perf_counter()
        info = pyro.create_task(ENV, source_path=source)
        seconds = time.perf_counter() - t0
        pyro.delete_task(info.task_id)
        out[f"create_{name}_s"] = round(seconds, 2)
        out[f"create_{name}_mb_per_s"] = round(info.workspace_seed.bytes_written / 1e6 / seconds, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--backends", default="qemu,gvisor,host_compat")
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="pyro-bench-tasks-"))
    state = work / "state"
    os.environ["PYRO_STATE_DIR"] = str(state)
    report: dict[str, Any] = {"env": ENV, "load_average": os.getloadavg()}
    try:
        tree = work / "tree"
        report["tree_files"] = make_mixed_tree(tree)
        tgz = work / "tree.tar.gz"
        with tarfile.open(tgz, "w:gz", compresslevel=1) as tf:
            tf.add(tree, arcname=".")
        sources = {"200mb_dir": tree, "200mb_tgz": tgz}
        report["host_seed"] = {
            f"{name}{'_image' if image else ''}": host_seed(source, work / "scratch", image)
            for name, source in sources.items()
            for image in (False, True)
        }
        report["backends"] = {}
        for backend in [b for b in args.backends.split(",") if b]:
            try:
                report["backends"][backend] = bench_backend(backend, sources, args.runs)
            except PyroError as exc:
                report["backends"][backend] = {"skipped": exc.message}
    finally:
        with_pyro = Pyro(state_dir=state, reap=False)
        for task in with_pyro.list_tasks():
            with_pyro.delete_task(task.task_id)
        shutil.rmtree(work, ignore_errors=True)

    seed_ok = all(v["mb_per_s"] >= SEED_FLOOR_MBPS for v in report["host_seed"].values())
    exec_ok = all(
        v.get("exec_true_p50_ms", 0) <= EXEC_FLOOR_MS
        for v in report["backends"].values()
        if "skipped" not in v
    )
    report["floors"] = {
        f"seed >= {SEED_FLOOR_MBPS} MB/s": seed_ok,
        f"task_exec p50 <= {EXEC_FLOOR_MS} ms": exec_ok,
    }
    print(f"load average at start: {report['load_average']}")
    for name, v in report["host_seed"].items():
        print(f"host seed {name:<22} {v['seconds']:>7.2f} s  {v['mb_per_s']:>7.1f} MB/s")
    for backend, v in report["backends"].items():
        if "skipped" in v:
            print(f"{backend:<12} skipped: {v['skipped']}")
            continue
        print(
            f"{backend:<12} create empty {v['create_empty_p50_s']:.3f} s | exec p50 "
            f"{v['exec_true_p50_ms']:.1f} ms | create 200 MB dir {v['create_200mb_dir_s']:.2f} s,"
            f" tgz {v['create_200mb_tgz_s']:.2f} s"
        )
    for floor, ok in report["floors"].items():
        print(f"{'PASS' if ok else 'FAIL'} {floor}")
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
