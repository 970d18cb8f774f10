"""What one gVisor sandbox is made of: the runsc global flags, the OCI runtime
config (mounts, capabilities, cgroup limits), the statx compat shim for old runsc
releases, and the sweep of cgroups a killed ``runsc run`` left behind.

Split from :mod:`pyro_mcp.vmm.gvisor` (finding and probing runsc, starting and
stopping sandboxes), which re-exports these names.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from pyro_mcp import paths
from pyro_mcp.commands import BASE_ENV
from pyro_mcp.errors import BootError

FLAGS_ENV = "PYRO_RUNSC_FLAGS"  # extra runsc global flags, appended last (debugging)
AGENT_PATH = "/.pyro/pyro-agent"
COMPAT_SHIM_PATH = "/.pyro/compat.so"
WORKSPACE_TARGET = "/workspace"
HOSTNAME = "pyro"
PIDS_LIMIT = 8192
CGROUP_PARENT = "pyro"
STALE_CGROUP_AGE_S = 60.0

#: Capabilities of the guest's root inside the sandbox. They are gVisor's own,
#: checked by the Sentry; none of them is a host capability.
CAPABILITIES = (
    "CAP_AUDIT_WRITE", "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER",
    "CAP_FSETID", "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_KILL", "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE", "CAP_MKNOD", "CAP_NET_ADMIN", "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW", "CAP_SETFCAP", "CAP_SETGID", "CAP_SETPCAP", "CAP_SETUID",
    "CAP_SYS_ADMIN", "CAP_SYS_CHROOT", "CAP_SYS_NICE", "CAP_SYS_PTRACE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME",
)  # fmt: skip

COMPAT_SHIM_SOURCE = r"""/* pyro-mcp: runsc before 2023 rejects AT_NO_AUTOMOUNT (EINVAL) in statx
 * and newfstatat; gVisor has no automounts, so clearing the flag changes nothing. */
#include <sys/syscall.h>
#define PYRO_AT_NO_AUTOMOUNT 0x800
extern long syscall(long number, ...);
int statx(int dirfd, const char *path, int flags, unsigned int mask, void *buf) {
    return (int)syscall(SYS_statx, dirfd, path, flags & ~PYRO_AT_NO_AUTOMOUNT, mask, buf);
}
int fstatat(int dirfd, const char *path, void *buf, int flags) {
    return (int)syscall(SYS_newfstatat, dirfd, path, buf, flags & ~PYRO_AT_NO_AUTOMOUNT);
}
int fstatat64(int dirfd, const char *path, void *buf, int flags) {
    return fstatat(dirfd, path, buf, flags);
}
int __fxstatat(int ver, int dirfd, const char *path, void *buf, int flags) {
    (void)ver;
    return fstatat(dirfd, path, buf, flags);
}
int __fxstatat64(int ver, int dirfd, const char *path, void *buf, int flags) {
    (void)ver;
    return fstatat(dirfd, path, buf, flags);
}
"""


def _gvisor_cache() -> Path:
    return paths.cache_dir() / "gvisor"


def _run(argv: list[str], timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL
    )


# --------------------------------------------------------------------------- compat shim


def ensure_compat_shim() -> tuple[Path, Path]:
    """(shared library, ld.so.preload file) of the statx compat shim; built once."""
    from filelock import FileLock

    from pyro_mcp.guest.build import ensure_agent_binary

    digest = hashlib.sha256(COMPAT_SHIM_SOURCE.encode()).hexdigest()[:12]
    folder = _gvisor_cache() / f"compat-{digest}"
    lib, preload = folder / "compat.so", folder / "ld.so.preload"
    if lib.is_file() and preload.is_file():
        return lib, preload
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        if lib.is_file() and preload.is_file():
            return lib, preload
        ensure_agent_binary()  # fails with the same clear error when there is no compiler
        cc = shutil.which(os.environ.get("CC") or "cc") or shutil.which("gcc") or "cc"
        src = folder / "compat.c"
        src.write_text(COMPAT_SHIM_SOURCE)
        tmp = folder / f".compat-{secrets.token_hex(4)}.so"
        proc = _run(
            [cc, "-shared", "-fPIC", "-Os", "-s", "-Wall", "-Werror", "-o", str(tmp), str(src)]
        )
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise BootError(
                f"could not build the gVisor statx compat shim: {proc.stderr.strip()[-800:]}",
                hint="apt-get install gcc libc6-dev, or set PYRO_RUNSC to a 2023+ runsc",
            )
        tmp.chmod(0o755)
        os.replace(tmp, lib)
        ptmp = folder / f".preload-{secrets.token_hex(4)}"
        ptmp.write_text(COMPAT_SHIM_PATH + "\n")
        ptmp.chmod(0o644)
        os.replace(ptmp, preload)
    return lib, preload


# --------------------------------------------------------------------------- the OCI bundle


def global_flags(*, root: Path, overlay_dir: Path, platform: str, rootless: bool) -> list[str]:
    """runsc's global flags for one sandbox (its own state root, no network)."""
    flags = [
        f"--root={root}",
        f"--log={root / 'runsc.log'}",
        f"--platform={platform}",
        "--network=none",
        f"--overlay2=root:{overlay_dir}",
        "--cpu-num-from-quota",
        *os.environ.get(FLAGS_ENV, "").split(),  # e.g. --debug-log=/tmp/runsc/ to debug
    ]
    if rootless:
        flags += ["--rootless", "--ignore-cgroups"]
    return flags


def _mount(destination: str, kind: str, source: str, *options: str) -> dict[str, Any]:
    entry: dict[str, Any] = {"destination": destination, "type": kind, "source": source}
    if options:
        entry["options"] = list(options)
    return entry


def oci_config(
    *,
    rootfs: Path,
    agent: Path,
    mem_mib: int,
    vcpu_count: int,
    container_id: str,
    args: tuple[str, ...] = (AGENT_PATH, "--stdio"),
    compat: tuple[Path, Path] | None = None,
    workspace: Path | None = None,
    rootless: bool = False,
) -> dict[str, Any]:
    """The OCI runtime config of one sandbox (see the module docstring)."""
    mounts: list[dict[str, Any]] = [
        _mount("/proc", "proc", "proc"),
        _mount("/dev", "tmpfs", "tmpfs", "nosuid"),
        _mount("/dev/pts", "devpts", "devpts"),
        _mount("/dev/shm", "tmpfs", "shm", "nosuid", "nodev"),
        _mount("/sys", "sysfs", "sysfs", "ro", "nosuid", "nodev", "noexec"),
        _mount("/run", "tmpfs", "tmpfs", "nosuid", "nodev"),
        _mount(AGENT_PATH, "bind", str(agent), "bind", "ro"),
    ]
    if compat is not None:
        lib, preload = compat
        mounts.append(_mount(COMPAT_SHIM_PATH, "bind", str(lib), "bind", "ro"))
        mounts.append(_mount("/etc/ld.so.preload", "bind", str(preload), "bind", "ro"))
    if workspace is not None:
        mounts.append(_mount(WORKSPACE_TARGET, "bind", str(workspace), "bind", "rw"))
    caps = list(CAPABILITIES)
    linux: dict[str, Any] = {
        "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
        "resources": {
            "memory": {"limit": mem_mib << 20},
            "pids": {"limit": PIDS_LIMIT},
            "cpu": {"quota": vcpu_count * 100_000, "period": 100_000},
        },
    }
    if not rootless:
        linux["cgroupsPath"] = f"/{CGROUP_PARENT}/{container_id}"
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": list(args),
            "env": [f"PATH={BASE_ENV['PATH']}"],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "soft": 1024, "hard": 524288}],
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": HOSTNAME,
        "mounts": mounts,
        "linux": linux,
    }


# --------------------------------------------------------------------------- cgroups


def _cgroup_parents() -> list[Path]:
    """The ``pyro`` cgroup folder in each hierarchy where runsc put sandboxes."""
    base = Path("/sys/fs/cgroup")
    found = []
    candidates = [base / CGROUP_PARENT]
    with contextlib.suppress(OSError):
        candidates += [d / CGROUP_PARENT for d in base.iterdir() if d.is_dir()]
    for cand in candidates:
        if cand.is_dir():
            found.append(cand)
    return found


def sweep_stale_cgroups(
    min_age_s: float = STALE_CGROUP_AGE_S, only: str | None = None
) -> list[str]:
    """Remove empty sandbox cgroups older than ``min_age_s`` (left by a killed runsc);
    ``only``: just those of this container id."""
    removed = []
    now = time.time()
    for parent in _cgroup_parents():
        with contextlib.suppress(OSError):
            for child in parent.iterdir():
                if only is not None and child.name != only:
                    continue
                try:
                    if not child.is_dir() or now - child.stat().st_mtime < min_age_s:
                        continue
                    if (child / "cgroup.procs").read_text().strip():
                        continue
                    child.rmdir()
                    removed.append(str(child))
                except OSError:
                    continue
    return removed
