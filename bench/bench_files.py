"""Benchmark a task's file operations (the issue's figures), per backend.

    uv run python bench/bench_files.py [--runs 20] [--backends qemu,gvisor,host_compat]
                                       [--json FILE]

* baseline: ``cat`` of a 16 MiB file through ``task_exec`` (stdout, capped and decoded);
* 50 MiB written and read through the task (SDK ``write_task_file`` from a chunk
  generator, ``read_task_bytes`` into a hashing sink): MB/s each way (floor 20);
* ``task_read_file`` of a 4 KiB file, p50 (floor 30 ms); ``task_edit_file`` p50
  (floor 50 ms);
* ``task_diff`` on a 2,000-file seed with 10 files changed (floor 1 s);
* ``task_export`` of a 200 MB workspace to a host folder (floor 20 MB/s on qemu,
  50 MB/s on the directory backends);
* ``task_reset`` over a 200 MB seed and over the 2,000-file seed (floor 0.5 s on qemu).

Backends that are not usable here are skipped (and said so).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pyro_mcp.api import Pyro
from pyro_mcp.errors import PyroError

ENV = os.environ.get("PYRO_BENCH_ENV", "debian:12-base")
MB = 1e6


def p50_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return round(statistics.median(times), 1)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def small_tree(root: Path, files: int = 2000) -> Path:
    for i in range(files):
        folder = root / f"pkg{i % 40:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"mod{i:04d}.py").write_text(f"VALUE = {i}\n" + "# padding\n" * 20)
    old = time.time() - 3600
    for where, _, names in os.walk(root):
        for name in names:
            os.utime(os.path.join(where, name), (old, old))
    return root


def big_tree(root: Path, total: int = 200 * 10**6) -> Path:
    """200 MB: 20 files of 8 MB and 400 of 100 KB (random, so nothing compresses)."""
    root.mkdir(parents=True)
    block = os.urandom(1 << 20)
    for i in range(20):
        with (root / f"big{i:02d}.bin").open("wb") as fh:
            for _ in range(8):
                fh.write(block)
    left = total - 20 * 8 * (1 << 20)
    small = os.urandom(100_000)
    for i in range(max(0, left // 100_000)):
        (root / f"small{i:04d}.bin").write_bytes(small)
    return root


def bench_backend(backend: str, runs: int, scratch: Path) -> dict[str, Any]:
    pyro = Pyro(backend=backend)
    out: dict[str, Any] = {"backend": backend}
    task = pyro.create_task(ENV).task_id
    try:
        if backend == "qemu":
            pyro.exec_task(task, "head -c 16777216 /dev/urandom > cat.bin")
            seconds = timed(lambda: pyro.exec_task(task, ["cat", "cat.bin"], stdout_cap=16 << 20))
            out["baseline_exec_cat_16mib_mb_s"] = round(16.777 / seconds, 1)
        chunk = os.urandom(1 << 20)

        def chunks() -> Iterator[bytes]:
            for _ in range(50):
                yield chunk

        seconds = timed(lambda: pyro.write_task_file(task, "big.bin", chunks()))
        out["write_50mib_mb_s"] = round(50 * (1 << 20) / MB / seconds, 1)
        digest = hashlib.sha256()
        seconds = timed(lambda: pyro.read_task_bytes(task, "big.bin", digest.update))
        out["read_50mib_mb_s"] = round(50 * (1 << 20) / MB / seconds, 1)
        pyro.write_task_file(task, "small.txt", "x" * 4095 + "\n")
        out["read_file_4kib_p50_ms"] = p50_ms(lambda: pyro.read_task_file(task, "small.txt"), runs)
        pyro.write_task_file(task, "edit.py", "value = 0\n" * 100 + "marker = 0\n")
        counter = iter(range(1, 10**6))

        def edit() -> None:
            n = next(counter)
            pyro.edit_task_file(task, "edit.py", f"marker = {n - 1}\n", f"marker = {n}\n")

        out["edit_file_p50_ms"] = p50_ms(edit, runs)
    finally:
        pyro.delete_task(task)

    seed = small_tree(scratch / f"small-{backend}")
    task = pyro.create_task(ENV, source_path=seed).task_id
    try:
        for i in range(10):
            pyro.write_task_file(task, f"pkg{i:02d}/mod{i:04d}.py", f"VALUE = -{i}\n")
        result: list[Any] = []
        seconds = timed(lambda: result.append(pyro.diff_task(task)))
        assert len(result[0].modified) == 10, result[0].summary
        out["diff_2000_files_10_changed_s"] = round(seconds, 3)
        out["reset_2000_files_s"] = round(timed(lambda: pyro.reset_task(task)), 3)
    finally:
        pyro.delete_task(task)

    seed = big_tree(scratch / f"big-{backend}")
    task = pyro.create_task(ENV, source_path=seed).task_id
    try:
        dest = scratch / f"export-{backend}"
        got: list[Any] = []
        seconds = timed(lambda: got.append(pyro.export_task(task, dest)))
        out["export_200mb_mb_s"] = round(got[0].bytes / MB / seconds, 1)
        shutil.rmtree(dest)
        out["reset_200mb_s"] = round(timed(lambda: pyro.reset_task(task)), 3)
    finally:
        pyro.delete_task(task)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--backends", default="qemu,gvisor,host_compat")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="pyro-bench-files-") as tmp:
        for backend in args.backends.split(","):
            try:
                figures = bench_backend(backend, args.runs, Path(tmp))
            except PyroError as exc:
                print(f"{backend}: skipped ({exc.message})", file=sys.stderr)
                continue
            results.append(figures)
            print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
