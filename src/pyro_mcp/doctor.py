"""``pyro doctor``: what this host can do, with a line of advice per problem.

Every check is isolated: one failing check never stops the others, and the
doctor itself never raises, with or without KVM, QEMU or a cache.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["ok", "warn", "fail"]


@dataclass(frozen=True)
class Check:
    name: str
    status: Status
    detail: str
    advice: str | None = None


def _python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check(
        "python",
        "ok" if ok else "fail",
        platform.python_version(),
        None if ok else "use Python 3.11 or newer",
    )


def _qemu() -> Check:
    from pyro_mcp.vmm.qemu import QemuBackend

    probe = QemuBackend().probe(detailed=True)
    if probe.binary is None:
        return Check("qemu", "fail", probe.reason, "; ".join(probe.advice) or None)
    status: Status = "ok" if probe.available else "fail"
    return Check(
        "qemu",
        status,
        f"{probe.binary}: {probe.version or 'unknown version'}",
        "; ".join(probe.advice) or None,
    )


def _kvm() -> Check:
    from pyro_mcp.vmm.detect import kvm_status

    kvm = kvm_status()
    if kvm.usable:
        return Check("acceleration", "ok", f"kvm: {kvm.reason}")
    return Check(
        "acceleration",
        "warn",
        f"tcg (software emulation): {kvm.reason}",
        "guests work but CPU-heavy work runs ~20x slower than with hardware KVM",
    )


def _gvisor() -> Check:
    from pyro_mcp.vmm.gvisor import RUNSC_ENV, probe_backend, runsc_info

    probe = probe_backend(detailed=True)
    if probe.binary is None:
        return Check("gvisor", "warn", probe.reason, "; ".join(probe.advice) or None)
    info = runsc_info()
    where = f"{probe.binary} ({RUNSC_ENV})" if os.environ.get(RUNSC_ENV) else probe.binary
    detail = f"{where} (runsc {probe.version or 'unknown version'}): {probe.reason}"
    if info is not None and info.works and info.statx_compat:
        detail += "; statx compat shim in use"
    return Check(
        "gvisor", "ok" if probe.available else "warn", detail, "; ".join(probe.advice) or None
    )


def _host_compat() -> Check:
    from pyro_mcp.vmm import host_compat, pids

    probe = host_compat.probe()
    if probe.available:
        detail = (
            f"bubblewrap works ({probe.binary}); opt-in only: --backend host_compat "
            "runs commands on the host kernel in namespaces, not in a VM"
        )
        bound = pids.describe()
        if bound is None:
            return Check(
                "host_compat",
                "warn",
                detail + "; nothing bounds a command's processes here (a fork bomb would "
                "reach the host's limit)",
                "run pyro as root where a pids cgroup controller is available, or as a "
                "non-root user (RLIMIT_NPROC applies then)",
            )
        return Check("host_compat", "ok", f"{detail}; processes bounded by {bound}")
    return Check(
        "host_compat",
        "ok",
        f"not available ({probe.reason}); optional, opt-in only",
        "; ".join(probe.advice) or None,
    )


def _agent_toolchain() -> Check:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return Check(
            "agent-compiler",
            "fail",
            "no C compiler to build the guest agent",
            "apt-get install gcc libc6-dev",
        )
    return Check("agent-compiler", "ok", cc)


def _rootfs_tools() -> Check:
    tool = shutil.which("mmdebstrap") or shutil.which("debootstrap")
    if tool is None:
        return Check(
            "rootfs-builder",
            "warn",
            "neither mmdebstrap nor debootstrap found",
            "apt-get install mmdebstrap (needed to build environments)",
        )
    root = os.geteuid() == 0
    return Check(
        "rootfs-builder",
        "ok" if root else "warn",
        f"{tool}; root={root}",
        None if root else "building environments needs root: sudo pyro env pull debian:12",
    )


def _dirs() -> Check:
    from pyro_mcp import paths

    cache, state = paths.cache_dir(), paths.state_dir()
    problems = []
    for d in (cache, state):
        probe = d
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir():
            problems.append(f"{probe} is not a folder")
        elif not os.access(probe, os.W_OK):
            problems.append(f"{d} is not writable")
    detail = f"cache={cache} state={state}"
    if problems:
        return Check(
            "directories",
            "fail",
            detail + "; " + "; ".join(problems),
            "set PYRO_CACHE_DIR / PYRO_STATE_DIR to writable folders",
        )
    return Check("directories", "ok", detail)


def _environments() -> Check:
    from pyro_mcp.environments.store import EnvironmentStore

    infos = EnvironmentStore().list()
    installed = [f"{i.name} {i.version}" for i in infos if i.installed]
    if not installed:
        return Check(
            "environments",
            "warn",
            "none installed",
            "pyro env pull debian:12 (or just run a command: it builds on first use)",
        )
    return Check("environments", "ok", ", ".join(installed))


def _snapshots() -> Check:
    from pyro_mcp.vmm import list_snapshots, snapshots_enabled

    if not snapshots_enabled():
        return Check("warm-start", "warn", "snapshots disabled (PYRO_SNAPSHOTS=0)")
    snaps = list_snapshots()
    if not snaps:
        return Check("warm-start", "ok", "no snapshot yet (taken on first run)")
    return Check("warm-start", "ok", f"{len(snaps)} snapshot(s) ready")


def config_report() -> tuple[dict[str, Any], Check]:
    """The config file, the defaults in effect and where each came from, and its check."""
    from pyro_mcp import config
    from pyro_mcp.errors import PyroError

    path = config.config_path()
    try:
        settings = config.load()
    except PyroError as exc:
        data = {"path": str(path), "exists": path.is_file(), "error": exc.message}
        return data, Check("config", "fail", exc.message, exc.hint_for("cli"))
    where = f"{path}" if path.is_file() else f"{path} (none; built-in defaults)"
    return settings.to_dict(), Check("config", "ok", where)


def _config() -> Check:
    return config_report()[1]


CHECKS: tuple[Callable[[], Check], ...] = (
    _python,
    _qemu,
    _kvm,
    _gvisor,
    _host_compat,
    _agent_toolchain,
    _rootfs_tools,
    _dirs,
    _environments,
    _snapshots,
    _config,
)


def run_checks() -> list[Check]:
    out = []
    for check in CHECKS:
        name = check.__name__.lstrip("_")
        try:
            out.append(check())
        except Exception as exc:  # a doctor must never crash
            advice = "unexpected error; fix what the other checks report, then rerun pyro doctor"
            out.append(Check(name, "fail", f"check failed: {exc!r}", advice))
    return out


def report() -> dict[str, Any]:
    checks = run_checks()
    settings = config_report()[0]
    backend: dict[str, str | None]
    try:
        from pyro_mcp.manager import VMManager

        choice = VMManager(backend=settings.get("backend")).backend_choice()
        backend = {
            "name": choice.name,
            "acceleration": choice.acceleration,
            "reason": choice.reason,
        }
    except Exception as exc:
        backend = {"name": None, "acceleration": None, "reason": None, "error": str(exc)}
    return {
        "ok": all(c.status != "fail" for c in checks),
        "backend": backend,
        "config": settings,
        "checks": [asdict(c) for c in checks],
    }
