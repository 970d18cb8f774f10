"""Real work, native and in each backend, in one run: how much slower is it in a sandbox?

    uv run python bench/bench_realwork.py [--backends gvisor,qemu] [--runs 3]
                                          [--qemu-runs 1] [--sdk-runs 20] [--json FILE]

Workloads (the same commands everywhere; the guest is ``debian:12``, whose python3
is the same 3.11 as Debian 12's ``/usr/bin/python3`` used for the native runs):

* ``cpu``: a CPU-bound Python loop.
* ``files``: create 2,000 small files, then read them all back (in /tmp: the VM's
  own root filesystem; and ``files_workspace``: the same in /workspace, a task's
  seeded folder).
* ``pytest``: pytest on a small project (a module and 60 tests, with pytest and its
  dependencies vendored in, as the environments ship no pytest), seeded into a task's
  /workspace with ``source_path``; bytecode is written on a warm-up run first.

Each guest figure is the command's own duration as the guest agent measures it (fork
to exit), each native one the same command's wall time in a subprocess: boot and
the host-to-agent round trip are left out of both. Medians of ``--runs`` (qemu-TCG:
``--qemu-runs``, it is ~20x slower). Also measured: SDK ``run_in_vm`` of ``true``
(p50 over ``--sdk-runs``, boot and teardown included), per backend.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

from pyro_mcp.api import Pyro
from pyro_mcp.commands import BASE_ENV

ENV = os.environ.get("PYRO_BENCH_ENV", "debian:12")
NATIVE_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else "python3"
VENDORED = ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py.py")

CPU = textwrap.dedent(
    """\
    total = 0
    for i in range(3_000_000):
        total += i * i % 7
    print(total)
    """
)
FILES = textwrap.dedent(
    """\
    import os, sys, tempfile
    root = tempfile.mkdtemp(prefix="bench-", dir=sys.argv[1])
    for i in range(2000):
        with open(os.path.join(root, f"f{i:04d}.txt"), "w") as fh:
            fh.write(f"file {i}\\n" * 8)
    size = 0
    for name in sorted(os.listdir(root)):
        with open(os.path.join(root, name)) as fh:
            size += len(fh.read())
    print(size)
    """
)
MODULE = textwrap.dedent(
    '''\
    """A tiny library for the benchmark's test suite."""


    def fib(n: int) -> int:
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a


    def is_prime(n: int) -> bool:
        return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


    def words(text: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for word in text.lower().split():
            counts[word] = counts.get(word, 0) + 1
        return counts
    '''
)
TESTS = textwrap.dedent(
    """\
    import pytest

    from calc import fib, is_prime, words


    @pytest.mark.parametrize("n", range(20))
    def test_fib_recurrence(n):
        assert fib(n + 2) == fib(n + 1) + fib(n)


    @pytest.mark.parametrize("n", range(2, 22))
    def test_primes(n):
        assert is_prime(n) == all(n % d for d in range(2, n))


    @pytest.mark.parametrize("k", range(20))
    def test_words(k, tmp_path):
        text = " ".join(["a"] * k + ["B"] * 2)
        (tmp_path / "t.txt").write_text(text)
        assert words((tmp_path / "t.txt").read_text()) == ({"a": k, "b": 2} if k else {"b": 2})
    """
)
PYTEST_CMD = "python3 -m pytest -q -p no:cacheprovider tests"
# Same on every side; the host's own pytest plugins (if any) stay out of the native run.
PYTEST_ENV = {"PYTHONPATH": "vendor:src", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def make_project(dest: Path) -> Path:
    """The seeded folder: src/calc.py, tests/test_calc.py, vendor/<pytest and deps>."""
    import pytest as pytest_module

    site = Path(pytest_module.__file__).resolve().parent.parent
    (dest / "src").mkdir(parents=True)
    (dest / "tests").mkdir()
    (dest / "src" / "calc.py").write_text(MODULE)
    (dest / "tests" / "test_calc.py").write_text(TESTS)
    vendor = dest / "vendor"
    vendor.mkdir()
    for name in VENDORED:
        src = site / name
        if src.is_dir():
            shutil.copytree(src, vendor / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.is_file():
            shutil.copy2(src, vendor / name)
    return dest


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


# --------------------------------------------------------------------------- runners

WORKLOADS = ("cpu", "files", "files_workspace", "pytest")


def native_run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    """``argv`` as a host process, with the environment a guest command gets."""
    full_env = {**BASE_ENV, **(env or {})}
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, env=full_env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"native {argv[:3]} failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    return elapsed


class Native:
    """The workloads as host processes, on a copy of the project."""

    name = "native"

    def __init__(self, project: Path, work: Path) -> None:
        self.copy = work / "native-project"
        shutil.copytree(project, self.copy)
        self.tmp = work / "native-tmp"
        self.tmp.mkdir()
        self.run("pytest")  # warm-up: writes the bytecode

    def run(self, workload: str) -> float:
        py = NATIVE_PYTHON
        if workload == "cpu":
            return native_run([py, "-c", CPU], self.copy)
        if workload == "files":
            return native_run([py, "-c", FILES, str(self.tmp)], self.copy)
        if workload == "files_workspace":
            return native_run([py, "-c", FILES, str(self.copy)], self.copy)
        return native_run([py, *PYTEST_CMD.split()[1:]], self.copy, PYTEST_ENV)

    def close(self) -> None:
        pass


class InBackend:
    """The workloads in a task (its /workspace seeded with the project) on a backend."""

    def __init__(self, backend: str, project: Path, state: Path) -> None:
        self.name = backend
        self.pyro = Pyro(backend=backend, state_dir=state / backend)
        task = self.pyro.create_task(ENV, source_path=str(project), ttl_seconds=3600)
        self.task_id = task.task_id
        self.run("pytest")  # warm-up: writes the bytecode, as natively

    def _guest(self, command: list[str], env: dict[str, str] | None = None) -> float:
        result = self.pyro.exec_task(self.task_id, command, env=env, timeout_seconds=3600)
        if result.exit_code != 0:
            raise RuntimeError(f"{self.name}: {command!r} failed: {result.stdout} {result.stderr}")
        return result.duration_ms / 1000

    def run(self, workload: str) -> float:
        if workload == "cpu":
            return self._guest(["python3", "-c", CPU])
        if workload == "files":
            return self._guest(["python3", "-c", FILES, "/tmp"])
        if workload == "files_workspace":
            return self._guest(["python3", "-c", FILES, "/workspace"])
        return self._guest(PYTEST_CMD.split(), PYTEST_ENV)

    def close(self) -> None:
        self.pyro.delete_task(self.task_id)


def bench_sdk(backend: str, runs: int, state: Path) -> dict[str, float]:
    pyro = Pyro(backend=backend, state_dir=state / f"sdk-{backend}")
    pyro.run_in_vm(ENV, ["true"])  # snapshot / unpacked tree exist
    out: dict[str, float] = {}
    for label, command in (("argv", ["true"]), ("shell", "true")):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            pyro.run_in_vm(ENV, command)
            times.append(time.perf_counter() - t0)
        out[f"{label}_p50_s"] = round(median(times), 3)
        out[f"{label}_p95_s"] = round(pct(times, 0.95), 3)
    return out


# --------------------------------------------------------------------------- report

FLOORS = (
    # (backend, workload, max ratio to native)
    ("gvisor", "cpu", 1.5),
    ("gvisor", "files", 4.0),
    ("gvisor", "pytest", 4.0),
)


def report(results: dict[str, Any]) -> list[str]:
    """Medians, with each ratio to native; then the best runs' ratios (fastest guest run
    over fastest native run), which is what a quiet machine shows."""
    native = results["native"]
    best = results["best"]
    backends = [b for b in results["backends"] if b in results]
    lines = []
    head = f"{'workload':<17}{'native':>9}"
    for b in backends:
        head += f"{b + ' (x native)':>24}"
    if "gvisor" in backends and "qemu" in backends:
        head += f"{'gvisor vs qemu':>17}"
    lines.append("medians:")
    lines.append(head)
    for workload in WORKLOADS:
        line = f"{workload:<17}{native[workload]:>8.3f}s"
        for b in backends:
            value = results[b][workload]
            line += f"{value:>12.3f}s ({value / native[workload]:>6.2f}x)"
        if "gvisor" in backends and "qemu" in backends:
            line += f"{results['qemu'][workload] / results['gvisor'][workload]:>11.1f}x faster"
        lines.append(line)
    lines.append("best runs:")
    lines.append(head)
    for workload in WORKLOADS:
        line = f"{workload:<17}{best['native'][workload]:>8.3f}s"
        for b in backends:
            value = best[b][workload]
            line += f"{value:>12.3f}s ({value / best['native'][workload]:>6.2f}x)"
        if "gvisor" in backends and "qemu" in backends:
            line += f"{best['qemu'][workload] / best['gvisor'][workload]:>11.1f}x faster"
        lines.append(line)
    for b in backends:
        sdk = results.get("sdk", {}).get(b)
        if sdk:
            lines.append(
                f"SDK run_in_vm {b}: ['true'] p50 {sdk['argv_p50_s']} s (p95 {sdk['argv_p95_s']}), "
                f"'true' (sh -lc) p50 {sdk['shell_p50_s']} s"
            )
    checks = []
    for backend, workload, limit in FLOORS:
        if backend in results:
            ratio = results[backend][workload] / native[workload]
            checks.append((f"{backend} {workload} <= {limit}x native", ratio <= limit, ratio))
    if "gvisor" in results and "qemu" in results:
        for workload in ("files", "pytest"):
            speedup = results["qemu"][workload] / results["gvisor"][workload]
            checks.append((f"gvisor {workload} >= 5x faster than qemu", speedup >= 5, speedup))
    if "gvisor" in results.get("sdk", {}):
        p50 = results["sdk"]["gvisor"]["argv_p50_s"]
        checks.append(("gvisor SDK run_in_vm(true) p50 <= 0.4 s", p50 <= 0.4, p50))
    for name, ok, value in checks:
        lines.append(f"[{'PASS' if ok else 'FAIL'}] {name} ({value:.2f})")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="gvisor,qemu")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--qemu-runs", type=int, default=1)
    parser.add_argument("--sdk-runs", type=int, default=20)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]

    def log(message: str) -> None:
        print(f"bench: {message}", flush=True)

    state = Path(tempfile.mkdtemp(prefix="pyro-rw-"))
    work = Path(tempfile.mkdtemp(prefix="pyro-rw-project-"))
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} cores",
        "environment": ENV,
        "backends": backends,
        "runs": args.runs,
    }
    try:
        project = make_project(work / "project")
        Pyro(state_dir=state, reap=False).pull_environment(ENV)
        runners: list[Native | InBackend] = [Native(project, work)]
        for backend in backends:
            log(f"{backend}: creating a task seeded with the project")
            runners.append(InBackend(backend, project, state))
        raw: dict[str, dict[str, list[float]]] = {
            r.name: {w: [] for w in WORKLOADS} for r in runners
        }
        try:
            # Interleaved, so that load from elsewhere falls on every side alike.
            for i in range(max(args.runs, args.qemu_runs)):
                log(f"round {i + 1}")
                for workload in WORKLOADS:
                    for r in runners:
                        limit = args.qemu_runs if r.name == "qemu" else args.runs
                        if i < limit:
                            raw[r.name][workload].append(r.run(workload))
        finally:
            for r in runners:
                r.close()
        results["sdk"] = {}
        for backend in backends:
            if args.sdk_runs:
                log(f"{backend}: SDK run_in_vm x{args.sdk_runs}")
                results["sdk"][backend] = bench_sdk(backend, args.sdk_runs, state)
        results["best"] = {}
        for key, per_workload in raw.items():
            results[key] = {w: round(median(v), 4) for w, v in per_workload.items()}
            results["best"][key] = {w: round(min(v), 4) for w, v in per_workload.items()}
        results["raw"] = raw
    finally:
        shutil.rmtree(state, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    lines = report(results)
    print("\n".join(lines))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps({**results, "report": lines}, indent=2))


if __name__ == "__main__":
    main()
