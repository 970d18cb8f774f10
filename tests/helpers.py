"""Small helpers shared by the test modules: finding a test's processes and
leftovers, waiting for a condition, and checking the host stays responsive."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MAX_TICK_GAP_S = 10.0  # a host thread that stalls this long means the host is not responsive


def pids_matching(state_dir: Path, match: Callable[[bytes], bool]) -> list[int]:
    """Processes whose command line names ``state_dir`` and satisfies ``match``."""
    needle = str(state_dir).encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if needle in cmdline and match(cmdline):
            found.append(int(entry))
    return found


def qemu_pids(state_dir: Path) -> list[int]:
    """QEMU processes whose command line names a file under ``state_dir``."""
    return pids_matching(state_dir, lambda cmdline: b"qemu-system" in cmdline)


def supervisor_pids(state_dir: Path) -> list[int]:
    return pids_matching(state_dir, lambda cmdline: b"pyro_mcp.supervisor" in cmdline)


def _is_vmm(cmdline: bytes) -> bool:
    args = cmdline.split(b"\0")
    return b"qemu-system" in cmdline or (b"runsc" in args[0] and b"run" in args)


def vmm_pids(state_dir: Path) -> list[int]:
    """One process per running VM under ``state_dir``: its QEMU, or its `runsc run`."""
    return pids_matching(state_dir, _is_vmm)


def state_leftovers(state_dir: Path) -> list[str]:
    """What is left of VMs in the state folder: their folders and their lock files
    (the folder-wide ``.start.lock`` is not a VM's)."""
    vms = state_dir / "vms"
    if not vms.exists():
        return []
    return sorted(p.name for p in vms.iterdir() if p.name.startswith(("vm-", ".vm-")))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for: {what}")
        time.sleep(0.05)


def vm_record_fields(path: Path) -> dict[str, Any]:
    """A VM record file (``vm.json``) as one flat dict of its config and runtime fields,
    read without pyro's own reader (so tests see what is on disk)."""
    data = json.loads(path.read_text())
    return {**data["config"], **data["runtime"]}


class Ticker:
    """A host thread ticking every 20 ms; records the longest gap between ticks."""

    def __init__(self) -> None:
        self.ticks = 0
        self.max_gap = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(0.02):
            now = time.monotonic()
            self.max_gap = max(self.max_gap, now - last)
            last = now
            self.ticks += 1

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def assert_responsive(self) -> None:
        assert self.ticks > 0
        assert self.max_gap < MAX_TICK_GAP_S, f"the host stalled for {self.max_gap:.1f} s"
