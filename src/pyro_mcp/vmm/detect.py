"""Is hardware KVM really usable here?

Opening /dev/kvm is the wrong test: on hosts whose KVM module is ``kvm_pvm``
(software nested virtualisation) /dev/kvm opens and KVM_CREATE_VM succeeds,
yet stock guest kernels stop with KVM_EXIT_INTERNAL_ERROR before their first
output. We decide from real signals instead, and never block.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

_CPUINFO_MAX_BYTES = 1 << 20  # the first CPU's flags line is near the start


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str


@dataclass(frozen=True)
class HostSignals:
    """Where the signals are read (tests point these at fake files)."""

    cpuinfo: Path = Path("/proc/cpuinfo")
    modules: Path = Path("/sys/module")
    kvm: Path = Path("/dev/kvm")


HOST = HostSignals()


def _cpu_flags(cpuinfo: Path) -> set[str]:
    """The first ``flags`` line; empty when unreadable. Only a regular file is read
    (procfs files are regular), so a FIFO or device there cannot block us."""
    try:
        if not stat.S_ISREG(os.stat(cpuinfo).st_mode):
            return set()
        with cpuinfo.open("rb") as fh:
            text = fh.read(_CPUINFO_MAX_BYTES).decode(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def kvm_status(signals: HostSignals = HOST, environ: Mapping[str, str] | None = None) -> KvmStatus:
    """Decide whether QEMU can use KVM; ``PYRO_ACCEL`` (tcg or kvm) overrides.

    /dev/kvm is never opened: its presence and permissions, the ``kvm_pvm`` module
    and the CPU flags decide."""
    env = os.environ if environ is None else environ
    forced = env.get("PYRO_ACCEL", "").strip().lower()
    if forced == "tcg":
        return KvmStatus(False, "PYRO_ACCEL=tcg forces software emulation")
    dev = signals.kvm
    if not dev.exists():
        return KvmStatus(False, "/dev/kvm does not exist (no hardware virtualisation exposed)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmStatus(
            False, "/dev/kvm is not accessible to this user (add yourself to the 'kvm' group)"
        )
    if (signals.modules / "kvm_pvm").exists():
        if forced == "kvm":
            return KvmStatus(True, "PYRO_ACCEL=kvm forces KVM despite kvm_pvm")
        return KvmStatus(
            False,
            "/dev/kvm is backed by kvm_pvm, where stock guest kernels do not boot; using TCG",
        )
    flags = _cpu_flags(signals.cpuinfo)
    if forced != "kvm" and flags and not ({"vmx", "svm"} & flags):
        return KvmStatus(False, "the CPU exposes no vmx/svm flag; /dev/kvm cannot run guests")
    return KvmStatus(True, "/dev/kvm is accessible and the CPU has hardware virtualisation")
