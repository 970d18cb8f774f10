"""Memory of idle restored VMs: RSS and PSS per VM with 1, 4 and 16 running.

    uv run python bench/bench_memory.py [--counts 1,4,16] [--json FILE]

Restored VMs map the same snapshot RAM file (``x-ignore-shared``), so much of their
RSS is shared page cache; PSS (proportional set size, ``/proc/PID/smaps_rollup``)
divides shared pages among the processes that map them, which is what a VM really
costs. Per VM: QEMU's RSS and PSS, the supervisor's, and their sum. The issue that
asks for it sets PSS per idle VM with 16 running at <= 50 MB (supervisor included).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from pyro_mcp.api import Pyro
from pyro_mcp.records import VMRecord
from pyro_mcp.state import read_json

ENV = os.environ.get("PYRO_BENCH_ENV", "debian:12-base")


def rollup_kib(pid: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[-1] == "kB":
            out[key] = int(fields[0])
    return out


def measure(count: int) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="pyro-bench-mem-"))
    pyro = Pyro(state_dir=state)
    ids = []
    try:
        for _ in range(count):
            info = pyro.create_vm(ENV)
            pyro.start_vm(info.vm_id)
            ids.append(info.vm_id)
        time.sleep(2)  # idle: boot-time work settled
        rows = []
        for vm_id in ids:
            runtime = VMRecord.from_dict(read_json(state / "vms" / vm_id / "vm.json")).runtime
            assert runtime.vmm is not None and runtime.supervisor is not None
            vmm, sup = rollup_kib(runtime.vmm.pid), rollup_kib(runtime.supervisor.pid)
            rows.append(
                {
                    "vmm_rss": vmm["Rss"],
                    "vmm_pss": vmm["Pss"],
                    "supervisor_rss": sup["Rss"],
                    "supervisor_pss": sup["Pss"],
                }
            )
        per_vm = {key: round(statistics.median(r[key] for r in rows) / 1024, 1) for key in rows[0]}
        per_vm["total_pss"] = round(per_vm["vmm_pss"] + per_vm["supervisor_pss"], 1)
        return {"vms": count, "per_vm_mib": per_vm}
    finally:
        for vm_id in ids:
            pyro.delete_vm(vm_id)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1,4,16")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    results = []
    for count in (int(c) for c in args.counts.split(",")):
        figures = measure(count)
        results.append(figures)
        print(json.dumps(figures))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
