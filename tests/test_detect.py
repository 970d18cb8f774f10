"""The KVM decision (``vmm/detect.py``) from fake host signals under tmp_path: each
branch, the kvm_pvm case this project's machines are (``/dev/kvm`` opens, but the
module is kvm_pvm and the CPU has no vmx/svm), and that it never blocks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pyro_mcp.vmm.detect import HostSignals, KvmStatus, kvm_status

VMX = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme de pse vmx sse2\n\n"
SVM = "processor\t: 0\nflags\t\t: fpu svm sse2\n"
NO_VIRT = "processor\t: 0\nflags\t\t: fpu vme de pse sse2 hypervisor\n"


def host(
    tmp_path: Path, cpuinfo: str | None = VMX, *, kvm: bool = True, modules: tuple[str, ...] = ()
) -> HostSignals:
    tmp_path.mkdir(parents=True, exist_ok=True)
    signals = HostSignals(
        cpuinfo=tmp_path / "cpuinfo", modules=tmp_path / "module", kvm=tmp_path / "kvm"
    )
    if cpuinfo is not None:
        signals.cpuinfo.write_text(cpuinfo)
    signals.modules.mkdir()
    for name in ("kvm", *modules):
        (signals.modules / name).mkdir()
    if kvm:
        signals.kvm.write_bytes(b"")
    return signals


def decide(signals: HostSignals, accel: str = "") -> KvmStatus:
    return kvm_status(signals, {"PYRO_ACCEL": accel} if accel else {})


def test_real_kvm_with_vmx_or_svm_is_usable(tmp_path: Path) -> None:
    assert decide(host(tmp_path / "a", VMX)).usable
    assert decide(host(tmp_path / "b", SVM)).usable


def test_kvm_pvm_without_cpu_flags_is_not_usable(tmp_path: Path) -> None:
    """This project's machines: /dev/kvm is there and opens, KVM_CREATE_VM works,
    yet guests die with KVM_EXIT_INTERNAL_ERROR."""
    status = decide(host(tmp_path, NO_VIRT, modules=("kvm_pvm",)))
    assert not status.usable and "kvm_pvm" in status.reason


def test_kvm_pvm_wins_even_over_cpu_flags(tmp_path: Path) -> None:
    assert not decide(host(tmp_path, VMX, modules=("kvm_pvm",))).usable


def test_no_vmx_or_svm_flag_is_not_usable(tmp_path: Path) -> None:
    status = decide(host(tmp_path, NO_VIRT))
    assert not status.usable and "vmx/svm" in status.reason


def test_no_dev_kvm(tmp_path: Path) -> None:
    status = decide(host(tmp_path, VMX, kvm=False))
    assert not status.usable and "does not exist" in status.reason


def test_dev_kvm_not_accessible(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    signals = host(tmp_path, VMX)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: p != signals.kvm and real_access(p, mode))
    status = decide(signals)
    assert not status.usable and "'kvm' group" in status.reason


def test_unreadable_cpuinfo_trusts_dev_kvm(tmp_path: Path) -> None:
    assert decide(host(tmp_path, None)).usable
    assert decide(host(tmp_path / "b", "processor\t: 0\n")).usable  # no flags line


def test_pyro_accel_overrides(tmp_path: Path) -> None:
    assert not decide(host(tmp_path / "a", VMX), "tcg").usable
    assert decide(host(tmp_path / "b", NO_VIRT, modules=("kvm_pvm",)), "kvm").usable
    assert decide(host(tmp_path / "c", NO_VIRT), "KVM ").usable
    # Forcing KVM cannot make a missing /dev/kvm appear.
    assert not decide(host(tmp_path / "d", VMX, kvm=False), "kvm").usable


def test_never_blocks_on_fifos(tmp_path: Path) -> None:
    """A FIFO where cpuinfo or /dev/kvm should be (nobody writes to it) would block
    an open(); the decision must not open either."""
    signals = HostSignals(
        cpuinfo=tmp_path / "cpuinfo", modules=tmp_path / "module", kvm=tmp_path / "kvm"
    )
    os.mkfifo(signals.cpuinfo)
    os.mkfifo(signals.kvm)
    got: list[KvmStatus] = []
    worker = threading.Thread(target=lambda: got.append(decide(signals)), daemon=True)
    worker.start()
    worker.join(5)
    assert got, "kvm_status blocked on a FIFO"
    assert got[0].usable  # /dev/kvm "exists" and no flags could be read


def test_this_host_is_decided_quickly() -> None:
    got: list[KvmStatus] = []
    worker = threading.Thread(target=lambda: got.append(kvm_status()), daemon=True)
    worker.start()
    worker.join(5)
    assert got and got[0].reason


def test_doctor_names_only_backends_that_exist(state_dir: Path) -> None:
    """No line for the Firecracker backend, which is not built; the KVM decision is
    the acceleration line."""
    from pyro_mcp.doctor import run_checks

    checks = {c.name: c for c in run_checks()}
    assert "firecracker" not in checks
    assert {"qemu", "gvisor", "host_compat", "acceleration"} <= set(checks)
    assert checks["acceleration"].detail.endswith(kvm_status().reason)
