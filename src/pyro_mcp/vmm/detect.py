"""Is hardware KVM really usable here?

Opening /dev/kvm is the wrong test: on hosts whose KVM module is ``kvm_pvm``
(software nested virtualisation) /dev/kvm opens and KVM_CREATE_VM succeeds,
yet stock guest kernels stop with KVM_EXIT_INTERNAL_ERROR before their first
output. We decide from real signals instead, and never block.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_ROOT = Path("/")


@dataclass(frozen=True)
class KvmStatus:
    usable: bool
    reason: str


def _cpu_flags(root: Path) -> set[str]:
    try:
        text = (root / "proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def kvm_status(root: Path = _ROOT) -> KvmStatus:
    """Decide whether QEMU/Firecracker can use KVM; ``PYRO_ACCEL`` overrides."""
    forced = os.environ.get("PYRO_ACCEL", "").strip().lower()
    if forced == "tcg":
        return KvmStatus(False, "PYRO_ACCEL=tcg forces software emulation")
    dev = root / "dev/kvm"
    if not dev.exists():
        return KvmStatus(False, "/dev/kvm does not exist (no hardware virtualisation exposed)")
    if not os.access(dev, os.R_OK | os.W_OK):
        return KvmStatus(
            False, "/dev/kvm is not accessible to this user (add yourself to the 'kvm' group)"
        )
    if (root / "sys/module/kvm_pvm").exists():
        if forced == "kvm":
            return KvmStatus(True, "PYRO_ACCEL=kvm forces KVM despite kvm_pvm")
        return KvmStatus(
            False,
            "/dev/kvm is backed by kvm_pvm, where stock guest kernels do not boot; using TCG",
        )
    flags = _cpu_flags(root)
    if forced != "kvm" and flags and not ({"vmx", "svm"} & flags):
        return KvmStatus(False, "the CPU exposes no vmx/svm flag; /dev/kvm cannot run guests")
    return KvmStatus(True, "/dev/kvm is accessible and the CPU has hardware virtualisation")
