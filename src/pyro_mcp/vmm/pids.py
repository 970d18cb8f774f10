"""A bound on the number of processes of one host_compat sandbox (a fork bomb's answer).

bubblewrap has no pids option, so a command is bounded one of two ways:

* **a pids cgroup** (as root, when the host has a pids controller we may use): a
  leaf ``pyro-hc-<pid>-<random>`` with ``pids.max`` = :data:`PIDS_LIMIT`. On cgroup
  v2, under this process's own cgroup when the pids controller is enabled for its
  children, else beside it (under its parent: a systemd slice enables pids for its
  units, while our own cgroup holds processes and so cannot enable controllers);
  else in the v1 ``pids`` hierarchy, under our own cgroup there. The sandbox enters it
  before bwrap starts (a ``sh`` that writes its own pid to ``cgroup.procs``, then
  ``exec``s bwrap), every process in it is killed when the command ends, and the
  leaf is removed. Leaves left by a killed process are swept by the next one.
* **RLIMIT_NPROC** otherwise, for a non-root user (``prlimit`` in front of
  bwrap). The kernel counts the user's processes host-wide (the sandbox's root is
  that user outside its namespace), so the limit is set to what the user runs now
  plus :data:`PIDS_LIMIT`. It cannot help host root: the kernel exempts processes
  whose host uid is 0 from RLIMIT_NPROC, namespace or not (checked on 6.18), so
  as root without a usable pids controller nothing bounds a fork bomb
  (``pyro doctor`` says so).

Either way fork() fails with EAGAIN past the limit, inside the sandbox only.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

#: Processes and threads one host_compat command may have at once.
PIDS_LIMIT = 512
LEAF_PREFIX = "pyro-hc-"
STALE_LEAF_AGE_S = 60.0
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")

# Writes the shell's own pid (the future bwrap) into the leaf, then becomes bwrap.
_ENTER = (
    'echo $$ > "$0" || { echo "pyro: cannot enter the pids cgroup $0" >&2; exit 125; }; exec "$@"'
)


@dataclass(frozen=True)
class PidsCgroup:
    """One leaf cgroup holding one sandbox."""

    path: Path
    version: int  # 1 or 2

    def wrap(self, argv: Sequence[str]) -> list[str]:
        """``argv``, started inside this cgroup."""
        return ["/bin/sh", "-c", _ENTER, str(self.path / "cgroup.procs"), *argv]

    def pids(self) -> list[int]:
        with contextlib.suppress(OSError, ValueError):
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        return []

    def close(self, timeout: float = 10.0) -> None:
        """Kill whatever is left in the leaf and remove it (bounded by ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = self.pids()
            if not left:
                with contextlib.suppress(OSError):
                    self.path.rmdir()
                if not self.path.exists() or time.monotonic() > deadline:
                    return
            elif time.monotonic() > deadline:
                return
            kill_file = self.path / "cgroup.kill"  # v2, kernel 5.14+: kills atomically
            if left and kill_file.exists():
                with contextlib.suppress(OSError):
                    kill_file.write_text("1")
            for pid in left:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.02)


def _own_cgroups(self_cgroup: Path) -> dict[str, str]:
    """``/proc/self/cgroup`` as {controller (``""`` for v2): path}."""
    found: dict[str, str] = {}
    with contextlib.suppress(OSError):
        for line in self_cgroup.read_text().splitlines():
            hierarchy, _, rest = line.partition(":")
            controllers, _, path = rest.partition(":")
            if hierarchy == "0" and not controllers:
                found[""] = path
            for name in controllers.split(","):
                if name:
                    found[name] = path
    return found


def pids_parent(
    cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP
) -> tuple[Path, int] | None:
    """Where a pids-limited leaf can go (our own cgroup) and the cgroup version."""
    own = _own_cgroups(self_cgroup)
    if "" in own:
        for mount in (cgroup_root, cgroup_root / "unified"):
            if not (mount / "cgroup.controllers").exists():
                continue
            here = mount / own[""].lstrip("/")
            for parent in (here, here.parent) if here != mount else (here,):
                with contextlib.suppress(OSError):
                    if "pids" in (parent / "cgroup.subtree_control").read_text().split():
                        return parent, 2
            break
    if "pids" in own:
        mount = cgroup_root / "pids"
        parent = mount / own["pids"].lstrip("/")
        if (parent / "cgroup.procs").exists() and os.access(parent, os.W_OK):
            return parent, 1
    return None


def _sweep(parent: Path) -> None:
    """Remove empty leaves older than :data:`STALE_LEAF_AGE_S` (their owner was killed)."""
    now = time.time()
    with contextlib.suppress(OSError):
        for leaf in parent.glob(f"{LEAF_PREFIX}*"):
            with contextlib.suppress(OSError):
                old = now - leaf.stat().st_mtime > STALE_LEAF_AGE_S
                if old and not (leaf / "cgroup.procs").read_text().strip():
                    leaf.rmdir()


def open_cgroup(
    limit: int = PIDS_LIMIT, cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP
) -> PidsCgroup | None:
    """A fresh leaf with ``pids.max`` = ``limit``; None where we may not make one."""
    if os.geteuid() != 0:
        return None
    found = pids_parent(cgroup_root, self_cgroup)
    if found is None:
        return None
    parent, version = found
    _sweep(parent)
    leaf = parent / f"{LEAF_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    try:
        leaf.mkdir()
    except OSError:
        return None
    try:
        (leaf / "pids.max").write_text(str(limit))
    except OSError:
        with contextlib.suppress(OSError):
            leaf.rmdir()
        return None
    return PidsCgroup(leaf, version)


def tasks_of_uid(uid: int) -> int:
    """Processes and threads the user ``uid`` runs now (what RLIMIT_NPROC counts)."""
    count = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
        except OSError:
            continue
        real_uid = threads = None
        for line in status.splitlines():
            if line.startswith("Uid:"):
                real_uid = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
        if real_uid == uid:
            count += threads or 1
    return count


def nproc_prefix(limit: int = PIDS_LIMIT) -> list[str]:
    """``prlimit --nproc`` in front of bwrap (the non-root fallback); [] for root or
    without prlimit."""
    prlimit = shutil.which("prlimit")
    uid = os.getuid()
    if prlimit is None or uid == 0:
        return []
    value = tasks_of_uid(uid) + limit
    return [prlimit, f"--nproc={value}:{value}", "--"]


def describe(cgroup_root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> str | None:
    """How a host_compat command's processes are bounded here; None if they are not."""
    if os.geteuid() == 0:
        found = pids_parent(cgroup_root, self_cgroup)
        if found is not None:
            return f"a pids cgroup (v{found[1]}) of {PIDS_LIMIT} processes per command"
        return None
    if shutil.which("prlimit") is None:
        return None
    return f"RLIMIT_NPROC: {PIDS_LIMIT} processes per command beyond the user's own"
