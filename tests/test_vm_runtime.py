"""The core runtime on real VMs: exec semantics, timeouts, caps, concurrency, cleanup, TTLs.

Every test boots ``debian:12-base`` (restored from its snapshot, ~0.5 s) through the
``pyro`` fixture, on a private state folder that the fixture empties afterwards, once
per VM backend usable here (``backend`` in conftest: qemu, and gvisor where runsc runs).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import state_leftovers, vmm_pids, wait_until
from pyro_mcp.api import Pyro
from pyro_mcp.commands import ExecOptions
from pyro_mcp.errors import InvalidInputError, NotFoundError, VMStateError
from pyro_mcp.manager import ExecOutcome
from pyro_mcp.progress import no_progress
from pyro_mcp.state import read_json

pytestmark = pytest.mark.vm


@pytest.fixture(autouse=True)
def _on_backend(monkeypatch: pytest.MonkeyPatch, backend: str) -> None:
    """Run every test on each available backend, whatever `auto` would choose here
    (CLI subprocesses inherit it)."""
    monkeypatch.setenv("PYRO_BACKEND", backend)


def started_vm(pyro: Pyro, environment: str, ttl_seconds: int = 600) -> str:
    info = pyro.create_vm(environment, ttl_seconds=ttl_seconds)
    pyro.start_vm(info.vm_id)
    return info.vm_id


def out(outcome: ExecOutcome) -> str:
    return outcome.stdout.decode()


# --------------------------------------------------------------------------- exec semantics


def test_output_exit_code_and_separate_stderr(pyro: Pyro, vm_environment: str) -> None:
    result = pyro.run_in_vm(vm_environment, "echo out; echo err >&2; exit 3")
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"
    assert result.exit_code == 3
    assert not result.timed_out
    assert not result.stdout_truncated and not result.stderr_truncated
    assert result.cleanup is not None and result.cleanup.deleted
    assert result.boot in ("restored", "cold")


def test_cwd_and_env(pyro: Pyro, vm_environment: str) -> None:
    result = pyro.run_in_vm(
        vm_environment,
        'pwd; echo "$FOO"; echo "$PATH"',
        cwd="/tmp",
        env={"FOO": "bar baz 'q' $x", "PATH": "/opt/custom/bin:/usr/bin:/bin"},
    )
    assert result.stdout == "/tmp\nbar baz 'q' $x\n/opt/custom/bin:/usr/bin:/bin\n"
    # Default cwd is /root; a list command gets exactly the environment it is given.
    listed = pyro.run_in_vm(vm_environment, ["sh", "-c", 'pwd; echo "$FOO"'], env={"FOO": "1"})
    assert listed.stdout == "/root\n1\n"


def test_string_is_login_shell_and_callers_env_wins(pyro: Pyro, vm_environment: str) -> None:
    vm = started_vm(pyro, vm_environment)
    m = pyro.manager
    profile = "export FROM_PROFILE=profile; export PATH=/from/profile:$PATH"
    setup = m.exec(vm, ["sh", "-c", f"echo '{profile}' > /etc/profile.d/zz-test.sh"])
    assert setup.exit_code == 0
    # A string runs under `sh -lc`: the login profile is read ...
    seen = m.exec(vm, 'echo "$FROM_PROFILE"; echo "$PATH"')
    assert out(seen).splitlines()[0] == "profile"
    assert out(seen).splitlines()[1].startswith("/from/profile:")
    # ... but what the caller passes wins over it.
    env = {"FROM_PROFILE": "caller", "PATH": "/caller/bin:/usr/bin:/bin"}
    won = m.exec(vm, 'echo "$FROM_PROFILE"; echo "$PATH"', ExecOptions.checked(env=env))
    assert out(won) == "caller\n/caller/bin:/usr/bin:/bin\n"
    # A list is the exact argv: no shell, no profile, no expansion.
    exact = m.exec(vm, ["sh", "-c", 'echo "[$FROM_PROFILE]"'])
    assert out(exact) == "[]\n"
    literal = m.exec(vm, ["echo", "$HOME", "a  b", "*"])
    assert out(literal) == "$HOME a  b *\n"


def test_list_command_runs_its_own_shell(pyro: Pyro, vm_environment: str) -> None:
    result = pyro.run_in_vm(vm_environment, ["sh", "-lc", "echo a && echo b"])
    assert result.stdout == "a\nb\n"
    assert result.command == ["sh", "-lc", "echo a && echo b"]


def test_missing_program_exits_127(pyro: Pyro, vm_environment: str) -> None:
    vm = started_vm(pyro, vm_environment)
    as_list = pyro.manager.exec(vm, ["no-such-program-x", "arg"])
    assert as_list.exit_code == 127
    assert b"no-such-program-x" in as_list.stderr
    as_string = pyro.manager.exec(vm, "no-such-program-x arg")
    assert as_string.exit_code == 127
    assert b"no-such-program-x" in as_string.stderr


def test_timeout_kills_the_whole_process_group(pyro: Pyro, vm_environment: str) -> None:
    vm = started_vm(pyro, vm_environment)
    m = pyro.manager
    timed = m.exec(
        vm, "sleep 100 & echo $! > /tmp/pid; sleep 100", ExecOptions.checked(timeout_seconds=2)
    )
    assert timed.timed_out
    assert timed.exit_code == 128 + signal.SIGKILL
    # The backgrounded sleep was in the command's process group: it is gone too
    # (give PID 1 a moment to reap the orphan).
    check = m.exec(
        vm,
        'pid=$(cat /tmp/pid); test -n "$pid" || exit 2; '
        "for i in $(seq 50); do [ -e /proc/$pid ] || { echo gone; exit 0; }; sleep 0.1; done; "
        "cat /proc/$pid/status; exit 1",
    )
    assert (check.exit_code, out(check)) == (0, "gone\n"), check.stderr
    # The VM is still usable afterwards.
    assert out(m.exec(vm, "echo alive")) == "alive\n"


def test_output_caps_truncate_each_stream(pyro: Pyro, vm_environment: str) -> None:
    result = pyro.run_in_vm(
        vm_environment,
        "head -c 5000 /dev/zero | tr '\\0' o; head -c 7000 /dev/zero | tr '\\0' e >&2",
        stdout_cap=1024,
        stderr_cap=2048,
    )
    assert result.stdout_truncated and result.stderr_truncated
    assert result.stdout == "o" * 1024
    assert result.stderr == "e" * 2048
    assert result.exit_code == 0
    under = pyro.run_in_vm(vm_environment, "head -c 1024 /dev/zero | tr '\\0' o", stdout_cap=1024)
    assert not under.stdout_truncated
    assert len(under.stdout) == 1024


def test_concurrent_execs_in_one_vm(pyro: Pyro, vm_environment: str) -> None:
    vm = started_vm(pyro, vm_environment)
    results: dict[int, ExecOutcome] = {}
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            results[i] = pyro.manager.exec(vm, f"date +%s.%N; sleep 1; echo {i}; date +%s.%N")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    spans = []
    for i in range(4):
        assert results[i].exit_code == 0
        start, echoed, end = out(results[i]).split()
        assert echoed == str(i)
        spans.append((float(start), float(end)))
    # All four were running at the same moment (guest clock, no host timing involved).
    assert max(s for s, _ in spans) < min(e for _, e in spans)


# --------------------------------------------------------------------------- lifecycle


def test_two_vms_at_once_and_clean_deletion(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    ids = [pyro.create_vm(vm_environment).vm_id for _ in "ab"]
    threads = [threading.Thread(target=pyro.start_vm, args=(vm,)) for vm in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {v.vm_id: v.status for v in pyro.list_vms()} == dict.fromkeys(ids, "running")
    assert len(vmm_pids(state_dir)) == 2
    for n, vm in enumerate(ids):
        assert out(pyro.manager.exec(vm, f"echo {n}")) == f"{n}\n"
    for vm in ids:
        pyro.delete_vm(vm)
    assert vmm_pids(state_dir) == []
    assert state_leftovers(state_dir) == []
    assert pyro.list_vms() == []
    with pytest.raises(NotFoundError) as err:
        pyro.delete_vm(ids[0])
    assert err.value.hint
    with pytest.raises(NotFoundError):
        pyro.status_vm(ids[0])
    assert state_leftovers(state_dir) == []


@pytest.mark.backends("qemu")  # gvisor: the root filesystem starts fresh (test_gvisor.py)
def test_stop_start_keeps_the_disk(pyro: Pyro, vm_environment: str) -> None:
    vm = started_vm(pyro, vm_environment)
    m = pyro.manager
    assert m.exec(vm, "echo kept > /root/marker && sync").exit_code == 0
    assert pyro.stop_vm(vm).status == "stopped"
    with pytest.raises(VMStateError):
        m.exec(vm, "true")
    assert pyro.start_vm(vm).status == "running"
    assert out(m.exec(vm, "cat /root/marker")) == "kept\n"
    with pytest.raises(VMStateError):
        pyro.start_vm(vm)


def test_ttl_reaping(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    """One VM is reaped by its own supervisor at its TTL; another, whose supervisor was
    SIGKILLed, by ``reap_expired`` once its TTL has passed (and not before)."""
    reaped_by_itself = started_vm(pyro, vm_environment, ttl_seconds=10)
    orphan = started_vm(pyro, vm_environment, ttl_seconds=10)
    assert len(vmm_pids(state_dir)) == 2
    supervisor = pyro.manager.records.load(orphan).runtime.supervisor
    assert supervisor is not None
    os.kill(supervisor.pid, signal.SIGKILL)
    # QEMU dies with its supervisor; the VM now shows as stopped, not running.
    wait_until(lambda: len(vmm_pids(state_dir)) == 1, 10, "the orphan's QEMU to exit")
    assert pyro.status_vm(orphan).status == "stopped"
    assert orphan not in pyro.reap_expired().reaped  # within its TTL: kept

    expires_at = max(pyro.status_vm(v).expires_at.timestamp() for v in (reaped_by_itself, orphan))
    # A command still running when the TTL ends is cut off, with an error naming the TTL.
    with pytest.raises(VMStateError) as cut_off:
        pyro.manager.exec(reaped_by_itself, "sleep 60", ExecOptions.checked(timeout_seconds=60))
    assert "TTL" in cut_off.value.message
    assert cut_off.value.hint
    wait_until(lambda: time.time() > expires_at + 0.5, 20, "the TTL to pass")
    wait_until(
        lambda: not (state_dir / "vms" / reaped_by_itself).exists(),
        15,
        "the supervisor to reap its expired VM",
    )
    assert vmm_pids(state_dir) == []
    assert (state_dir / "vms" / orphan).exists()
    reap = pyro.reap_expired()
    assert reap.reaped == [orphan]
    assert reap.reasons == {orphan: "ttl_expired"}
    assert state_leftovers(state_dir) == []
    with pytest.raises(NotFoundError):
        pyro.status_vm(reaped_by_itself)


@pytest.mark.parametrize("ephemeral", [True, False])
def test_supervisor_whose_creator_vanished_during_boot(
    pyro: Pyro, vm_environment: str, state_dir: Path, ephemeral: bool
) -> None:
    """Nobody reads the supervisor's readiness line (its creator died mid-boot): it stops
    the VM at once; an ephemeral VM's folder goes too, a named VM is left stopped."""
    m = pyro.manager
    vm = m.create(vm_environment, owner_pid=os.getpid() if ephemeral else None).vm_id
    vm_dir = state_dir / "vms" / vm
    launch, _ = m._prepare_launch(m.records.load(vm), no_progress)
    launch.write(vm_dir / "launch.json")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the creator is gone before the VM is ready
    with (vm_dir / "supervisor.log").open("ab") as log:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "pyro_mcp.supervisor", str(vm_dir)],
            stdin=subprocess.DEVNULL,
            stdout=write_end,
            stderr=log,
            start_new_session=True,
        )
    os.close(write_end)
    try:
        assert supervisor.wait(timeout=120) == 0
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGKILL)
    assert vmm_pids(state_dir) == []
    if ephemeral:
        assert state_leftovers(state_dir) == []
    else:
        assert pyro.status_vm(vm).status != "running"
        assert read_json(vm_dir / "exit.json")["reason"] == "creator_exited"


def test_network_info_asks_the_guest(pyro: Pyro, vm_environment: str) -> None:
    """The interfaces come from the running guest, not from the record: an interface
    the guest has (loopback only, networking being off) is what is reported, and a VM
    that is not running says so instead of guessing."""
    created = pyro.create_vm(vm_environment)
    idle = pyro.network_info_vm(created.vm_id)
    assert idle.interfaces == [] and "start it" in idle.detail
    pyro.start_vm(created.vm_id)
    info = pyro.network_info_vm(created.vm_id)
    assert (info.network_enabled, info.interfaces) == (False, ["lo"])
    seen = pyro.manager.exec(created.vm_id, ["cat", "/proc/net/dev"]).stdout.decode()
    assert all(name in seen for name in info.interfaces)


# --------------------------------------------------------------------------- stdin


def endless(chunk: bytes = b"x" * 65536) -> Iterator[bytes]:
    """A stdin that never ends: only a command that stops reading lets the exec end."""
    while True:
        yield chunk


def test_stdin_is_byte_exact_and_a_command_may_stop_reading(
    pyro: Pyro, vm_environment: str
) -> None:
    vm = started_vm(pyro, vm_environment)
    data = os.urandom(1 << 20) + b"\x00\n\xff"
    digest = pyro.manager.exec(vm, ["sha256sum"], ExecOptions.checked(stdin=data))
    assert out(digest).split()[0] == hashlib.sha256(data).hexdigest()
    first = pyro.manager.exec(vm, ["head", "-c1"], ExecOptions.checked(stdin=endless()))
    assert (first.exit_code, out(first)) == (0, "x")
    late = pyro.manager.exec(
        vm, ["sleep", "60"], ExecOptions.checked(stdin=endless(), timeout_seconds=2)
    )
    assert late.timed_out

    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("the source broke")

    with pytest.raises(InvalidInputError, match="the source broke"):
        pyro.manager.exec(vm, "cat; sleep 60", ExecOptions.checked(stdin=broken()))
    # No stdin is an empty one; vm_exec (which then deletes the VM) takes text.
    assert out(pyro.manager.exec(vm, "wc -c")).strip() == "0"
    text = pyro.exec_vm(vm, "cat", stdin="héllo\n")
    assert text.stdout == "héllo\n"


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def test_fifty_mib_of_stdin_in_bounded_memory(pyro: Pyro, vm_environment: str) -> None:
    """50 MiB from a generator: neither this process nor the supervisor holds it."""
    vm = started_vm(pyro, vm_environment)
    supervisor = pyro.manager.records.load(vm).runtime.supervisor
    assert supervisor is not None
    for pid in (os.getpid(), supervisor.pid):
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS now
    before = {pid: _hwm_kib(pid) for pid in (os.getpid(), supervisor.pid)}
    total = 50 << 20

    def chunks() -> Iterator[bytes]:
        for _ in range(total // 65536):
            yield os.urandom(16) * 4096

    result = pyro.manager.exec(
        vm, ["wc", "-c"], ExecOptions.checked(stdin=chunks(), timeout_seconds=600)
    )
    assert out(result).strip() == str(total)
    for pid, start in before.items():
        grown_mib = (_hwm_kib(pid) - start) / 1024
        assert grown_mib < 16, f"pid {pid} grew by {grown_mib:.1f} MiB for 50 MiB of stdin"
