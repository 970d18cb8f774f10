"""Bad input through the SDK: the right PyroError subclass, a hint, and nothing left behind.

Validation happens before anything is written or booted, so most cases need no VM;
the last tests check that bad arguments to a running VM leave that VM alone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.api import Pyro
from pyro_mcp.commands import ExecOptions
from pyro_mcp.errors import InvalidInputError, NotFoundError, PyroError, StateError, VMStateError

ENV = "debian:12-base"
UNKNOWN_ID = "vm-0123456789ab"


@pytest.fixture(autouse=True)
def _qemu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """These are microVM tests: pin the QEMU backend whatever `auto` would choose here
    (CLI subprocesses inherit it)."""
    monkeypatch.setenv("PYRO_BACKEND", "qemu")


Case = tuple[str, Callable[[Pyro], Any], type[PyroError]]

CASES: list[Case] = [
    ("unknown environment", lambda p: p.run_in_vm("nosuch:1", "true"), NotFoundError),
    ("unknown environment (create)", lambda p: p.create_vm("nosuch:1"), NotFoundError),
    ("malformed environment", lambda p: p.run_in_vm("../x", "true"), InvalidInputError),
    ("malformed environment (create)", lambda p: p.create_vm("../x"), InvalidInputError),
    ("vcpu_count 0", lambda p: p.run_in_vm(ENV, "true", vcpu_count=0), InvalidInputError),
    ("vcpu_count 99", lambda p: p.create_vm(ENV, vcpu_count=99), InvalidInputError),
    ("mem_mib 1", lambda p: p.run_in_vm(ENV, "true", mem_mib=1), InvalidInputError),
    ("mem_mib 1 (create)", lambda p: p.create_vm(ENV, mem_mib=1), InvalidInputError),
    ("ttl 1", lambda p: p.create_vm(ENV, ttl_seconds=1), InvalidInputError),
    ("timeout 0", lambda p: p.run_in_vm(ENV, "true", timeout_seconds=0), InvalidInputError),
    ("timeout -1", lambda p: p.run_in_vm(ENV, "true", timeout_seconds=-1), InvalidInputError),
    ("empty command str", lambda p: p.run_in_vm(ENV, ""), InvalidInputError),
    ("blank command str", lambda p: p.run_in_vm(ENV, "   "), InvalidInputError),
    ("empty command list", lambda p: p.run_in_vm(ENV, []), InvalidInputError),
    ("empty program name", lambda p: p.run_in_vm(ENV, [""]), InvalidInputError),
    ("env name 1BAD", lambda p: p.run_in_vm(ENV, "true", env={"1BAD": "x"}), InvalidInputError),
    ("relative cwd", lambda p: p.run_in_vm(ENV, "true", cwd="tmp"), InvalidInputError),
    ("stdout_cap 1", lambda p: p.run_in_vm(ENV, "true", stdout_cap=1), InvalidInputError),
    ("network", lambda p: p.run_in_vm(ENV, "true", network=True), InvalidInputError),
    ("id ../../etc status", lambda p: p.status_vm("../../etc"), InvalidInputError),
    ("id ../../etc start", lambda p: p.start_vm("../../etc"), InvalidInputError),
    ("id ../../etc stop", lambda p: p.stop_vm("../../etc"), InvalidInputError),
    ("id ../../etc delete", lambda p: p.delete_vm("../../etc"), InvalidInputError),
    ("id ../../etc exec", lambda p: p.exec_vm("../../etc", "true"), InvalidInputError),
    ("unknown id status", lambda p: p.status_vm(UNKNOWN_ID), NotFoundError),
    ("unknown id start", lambda p: p.start_vm(UNKNOWN_ID), NotFoundError),
    ("unknown id stop", lambda p: p.stop_vm(UNKNOWN_ID), NotFoundError),
    ("unknown id delete", lambda p: p.delete_vm(UNKNOWN_ID), NotFoundError),
    ("unknown id exec", lambda p: p.exec_vm(UNKNOWN_ID, "true"), NotFoundError),
]


def leftover_files(state_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(state_dir)) for p in state_dir.rglob("*") if not p.is_dir())


@pytest.mark.parametrize(("case", "call", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_cleanly(
    state_dir: Path, case: str, call: Callable[[Pyro], Any], expected: type[PyroError]
) -> None:
    pyro = Pyro(state_dir=state_dir)
    with pytest.raises(expected) as err:
        call(pyro)
    assert type(err.value) is expected, case
    assert err.value.message
    assert err.value.hint, f"{case}: no hint in {err.value!r}"
    assert err.value.to_dict()["code"] == expected.code
    assert leftover_files(state_dir) == []
    # Nothing escaped the state folder either (the id '../../etc' must name no file).
    assert not (state_dir.parent / "etc.lock").exists()


def test_unusable_state_folder_is_a_state_error(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    pyro = Pyro(state_dir=not_a_dir / "state")
    with pytest.raises(StateError) as err:
        pyro.list_vms()
    assert err.value.hint and "PYRO_STATE_DIR" in err.value.hint


@pytest.mark.vm
def test_create_in_an_unusable_state_folder(vm_environment: str, tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(StateError) as err:
        Pyro(state_dir=not_a_dir / "state").create_vm(vm_environment)
    assert err.value.hint and "PYRO_STATE_DIR" in err.value.hint


@pytest.mark.vm
def test_bad_exec_arguments_leave_the_vm_alone(pyro: Pyro, vm_environment: str) -> None:
    vm = pyro.create_vm(vm_environment).vm_id
    # Not started yet: exec_vm refuses and keeps the VM.
    with pytest.raises(VMStateError) as not_running:
        pyro.exec_vm(vm, "true")
    assert not_running.value.hint
    assert pyro.status_vm(vm).status == "created"
    pyro.start_vm(vm)
    bad: list[Callable[[], Any]] = [
        lambda: pyro.exec_vm(vm, "true", timeout_seconds=0),
        lambda: pyro.exec_vm(vm, ""),
        lambda: pyro.exec_vm(vm, []),
        lambda: pyro.exec_vm(vm, "true", env={"1BAD": "x"}),
        lambda: pyro.exec_vm(vm, "true", cwd="relative"),
        lambda: pyro.exec_vm(vm, "true", stdout_cap=0),
        lambda: pyro.manager.exec(vm, "true", ExecOptions.checked(timeout_seconds=-1)),
    ]
    for call in bad:
        with pytest.raises(InvalidInputError):
            call()
        assert pyro.status_vm(vm).status == "running"
    # A cwd that does not exist in the guest is the guest's error, not a crash.
    with pytest.raises(PyroError):
        pyro.manager.exec(vm, "true", ExecOptions.checked(cwd="/no/such/dir"))
    result = pyro.exec_vm(vm, "echo fine")
    assert result.stdout == "fine\n"
    assert result.cleanup is not None and result.cleanup.deleted
    with pytest.raises(NotFoundError):
        pyro.status_vm(vm)
