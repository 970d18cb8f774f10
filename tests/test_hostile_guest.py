"""What runs inside a guest cannot hurt the host or other VMs.

Each hostile workload runs in a real QEMU microVM and must end with a clear
result (exit code, timeout flag, truncation flag) within its timeout plus the
host's grace, leave no VMM process behind once the VM is deleted, and leave
the host responsive (a host-side ticker thread keeps ticking throughout).
Also here: no network when networking is off, the cap on running VMs, the
bound on a VM's disk growth, and a guest that takes over the agent's channel
(garbage, forged frames, floods) - the host side stays up and bounded.

docs/security.md lists each promise next to the test that checks it.
"""

from __future__ import annotations

import base64
import contextlib
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers import Ticker, qemu_pids, vm_record_fields, wait_until
from pyro_mcp import limits
from pyro_mcp.api import Pyro
from pyro_mcp.commands import ExecOptions
from pyro_mcp.errors import (
    GuestProtocolError,
    InvalidInputError,
    LimitError,
    PyroError,
    VMStateError,
)
from pyro_mcp.guest import protocol as p
from pyro_mcp.supervisor import HOST_GRACE_S

pytestmark = pytest.mark.vm

# A command must be over by its timeout plus the supervisor's grace; the extra
# seconds cover the host side (socket round trips on a loaded 2-core CI box).
SLACK_S = HOST_GRACE_S + 10


# --------------------------------------------------------------------- helpers


@pytest.fixture
def qpyro(vm_environment: str, state_dir: Path, request: pytest.FixtureRequest) -> Iterator[Pyro]:
    """A Pyro on the QEMU backend (these promises are about the microVM) and a private
    state dir; every VM is deleted afterwards and consoles are printed on failure."""
    client = Pyro(state_dir=state_dir, backend="qemu")
    yield client
    failed = getattr(request.node, "rep_call", None)
    for info in client.list_vms():
        if failed is not None and failed.failed:
            console = state_dir / "vms" / info.vm_id / "console.log"
            if console.exists():
                print(f"--- console of {info.vm_id} ---")
                print(console.read_text(errors="replace")[-4000:])
        with contextlib.suppress(PyroError):
            client.delete_vm(info.vm_id)


def assert_no_vmm_left(state_dir: Path) -> None:
    wait_until(lambda: not qemu_pids(state_dir), 15, "every QEMU process of the test to exit")


def record(state_dir: Path, vm_id: str) -> dict[str, Any]:
    return vm_record_fields(state_dir / "vms" / vm_id / "vm.json")


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmHWM for pid {pid}")


def started_vm(pyro: Pyro, environment: str) -> str:
    info = pyro.create_vm(environment)
    pyro.start_vm(info.vm_id)
    return info.vm_id


# ------------------------------------------------------- hostile workloads


def test_fork_bomb_one_shot(qpyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    """The classic bomb backgrounds itself and the shell returns at once; the VM
    (with the bomb still going) is deleted with the run."""
    with Ticker() as ticker:
        started = time.monotonic()
        result = qpyro.run_in_vm(vm_environment, "bash -c ':(){ :|:& };:'", timeout_seconds=10)
        elapsed = time.monotonic() - started
    assert not result.timed_out
    assert result.cleanup is not None and result.cleanup.deleted
    assert elapsed < 10 + SLACK_S
    assert_no_vmm_left(state_dir)
    assert qpyro.list_vms() == []
    ticker.assert_responsive()


@pytest.mark.slow
def test_fork_bomb_in_the_foreground_is_killed_at_its_timeout(
    qpyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    """A bomb whose main process keeps running is killed (whole process group) at the
    timeout, and the same VM answers the next command."""
    m = qpyro.manager
    vm_id = started_vm(qpyro, vm_environment)
    with Ticker() as ticker:
        started = time.monotonic()
        bomb = m.exec(
            vm_id, "bash -c ':(){ :|:& };:; sleep 100'", ExecOptions.checked(timeout_seconds=5)
        )
        elapsed = time.monotonic() - started
        after = m.exec(vm_id, "echo alive", ExecOptions.checked(timeout_seconds=60))
    assert bomb.timed_out and bomb.exit_code == 137
    assert elapsed < 5 + SLACK_S
    assert (after.exit_code, after.stdout) == (0, b"alive\n")
    ticker.assert_responsive()
    qpyro.delete_vm(vm_id)
    assert_no_vmm_left(state_dir)


@pytest.mark.slow
def test_memory_hog_is_killed_by_the_guest_oom_killer(
    qpyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    """``tail`` buffers a line that never ends: 600 MiB in a 512 MiB guest. The guest's
    OOM killer ends it (non-zero exit, not a timeout); the VM still answers. Under TCG on a
    busy host the guest can thrash for minutes before the OOM killer acts (seen once at
    over 120 s on a fresh CI machine), hence the generous timeout: the promise tested is
    the kill, not its speed."""
    m = qpyro.manager
    vm_id = started_vm(qpyro, vm_environment)
    with Ticker() as ticker:
        started = time.monotonic()
        hog = m.exec(
            vm_id, "head -c 600m /dev/zero | tail", ExecOptions.checked(timeout_seconds=400)
        )
        elapsed = time.monotonic() - started
        after = m.exec(vm_id, "echo alive", ExecOptions.checked(timeout_seconds=60))
    assert hog.exit_code != 0 and not hog.timed_out, hog
    assert elapsed < 400 + SLACK_S
    assert (after.exit_code, after.stdout) == (0, b"alive\n")
    ticker.assert_responsive()
    qpyro.delete_vm(vm_id)
    assert_no_vmm_left(state_dir)


@pytest.mark.slow
def test_disk_filler_is_bounded_by_the_image(
    qpyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    """Writing until ENOSPC fills the guest's root filesystem, never the host: the
    per-VM overlay grows at most to the root image's size (plus qcow2 metadata)."""
    m = qpyro.manager
    vm_id = started_vm(qpyro, vm_environment)
    image_bytes = qpyro.manager.store.ensure(vm_environment).rootfs.stat().st_size
    overlay = state_dir / "vms" / vm_id / "disk.qcow2"
    with Ticker() as ticker:
        fill = m.exec(
            vm_id,
            "dd if=/dev/zero of=/root/fill bs=1M; sync; df -k /",
            ExecOptions.checked(timeout_seconds=300),
        )
    assert not fill.timed_out
    assert b"No space left on device" in fill.stderr, fill.stderr
    used = overlay.stat().st_blocks * 512
    assert overlay.stat().st_size <= image_bytes + (64 << 20)
    assert used <= image_bytes + (64 << 20)
    after = m.exec(vm_id, "rm /root/fill && echo alive", ExecOptions.checked(timeout_seconds=60))
    assert (after.exit_code, after.stdout) == (0, b"alive\n")
    ticker.assert_responsive()
    qpyro.delete_vm(vm_id)
    assert not overlay.exists()
    assert_no_vmm_left(state_dir)


def test_100_mb_of_stdout_is_truncated_at_the_cap(
    qpyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    """The cap is honoured, the truncation flag set, stderr still arrives, and neither
    the supervisor nor this process holds more than about the cap."""
    m = qpyro.manager
    vm_id = started_vm(qpyro, vm_environment)
    supervisor = int(record(state_dir, vm_id)["supervisor"]["pid"])
    ours_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cap = limits.DEFAULT_OUTPUT_CAP
    with Ticker() as ticker:
        started = time.monotonic()
        out = m.exec(
            vm_id,
            "head -c 100000000 /dev/zero; echo done >&2",
            ExecOptions.checked(timeout_seconds=120, stdout_cap=cap),
        )
        elapsed = time.monotonic() - started
    assert (out.exit_code, out.timed_out) == (0, False)
    assert out.stdout_truncated and len(out.stdout) == cap
    assert out.stderr == b"done\n" and not out.stderr_truncated
    assert elapsed < 120 + SLACK_S
    # 100 MB went through the guest; the host held about the cap (1 MiB), twice
    # over for base64 on the control socket, plus the interpreter.
    assert peak_rss_kib(supervisor) < 128 * 1024
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - ours_before < 64 * 1024
    ticker.assert_responsive()
    qpyro.delete_vm(vm_id)
    assert_no_vmm_left(state_dir)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param("trap '' TERM; sleep 100", id="ignores-sigterm"),
        pytest.param("while :; do :; done", id="never-ends"),
    ],
)
def test_command_is_killed_at_its_timeout(
    qpyro: Pyro, vm_environment: str, state_dir: Path, command: str
) -> None:
    with Ticker() as ticker:
        started = time.monotonic()
        result = qpyro.run_in_vm(vm_environment, command, timeout_seconds=3)
        elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code == 137
    assert result.duration_ms >= 3000
    assert elapsed < 3 + SLACK_S
    assert result.cleanup is not None and result.cleanup.deleted
    assert_no_vmm_left(state_dir)
    ticker.assert_responsive()


# ------------------------------------------------------------------ network


def test_no_network_but_loopback(qpyro: Pyro, vm_environment: str) -> None:
    """With networking off the guest has only ``lo``, and 127.0.0.1 in the guest is the
    guest's own: a listener on the host's loopback sees no connection. Nothing else is
    probed."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        result = qpyro.run_in_vm(
            vm_environment,
            "ls /sys/class/net; "
            f"if bash -c 'echo hello > /dev/tcp/127.0.0.1/{port}' 2>/dev/null; "
            "then echo CONNECTED; else echo refused; fi",
            timeout_seconds=30,
        )
        listener.settimeout(0.5)
        with pytest.raises(TimeoutError):
            conn, _ = listener.accept()
            conn.close()
    finally:
        listener.close()
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "lo\nrefused\n"


def test_asking_for_a_network_is_refused(qpyro: Pyro, vm_environment: str) -> None:
    """Networking is not silently ignored: the request is refused, nothing is created."""
    with pytest.raises(InvalidInputError, match="networking"):
        qpyro.create_vm(vm_environment, network=True)
    with pytest.raises(InvalidInputError, match="networking"):
        qpyro.run_in_vm(vm_environment, "true", network=True)
    assert qpyro.list_vms() == []


# ------------------------------------------------------------- host limits


def _start_vm_in_other_process(state_dir: Path, environment: str) -> str:
    """A VM started by another (finished) process: no owner, so it keeps running."""
    code = (
        "import sys; from pyro_mcp.api import Pyro\n"
        "p = Pyro(state_dir=sys.argv[1], backend='qemu')\n"
        "info = p.create_vm(sys.argv[2]); p.start_vm(info.vm_id); print(info.vm_id)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(state_dir), environment],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_cap_on_running_vms_counts_other_processes(
    qpyro: Pyro, vm_environment: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(limits.MAX_VMS_ENV, "1")
    first = _start_vm_in_other_process(state_dir, vm_environment)
    assert qpyro.status_vm(first).status == "running"

    second = qpyro.create_vm(vm_environment)
    with pytest.raises(LimitError) as caught:
        qpyro.start_vm(second.vm_id)
    assert "the limit is 1" in caught.value.message
    assert caught.value.hint is not None and limits.MAX_VMS_ENV in caught.value.hint
    assert qpyro.status_vm(second.vm_id).status == "created"  # untouched, startable later

    with pytest.raises(LimitError):
        qpyro.run_in_vm(vm_environment, "true")
    # The refused one-shot left nothing behind.
    assert {v.vm_id for v in qpyro.list_vms()} == {first, second.vm_id}

    qpyro.delete_vm(first)
    assert qpyro.start_vm(second.vm_id).status == "running"
    assert qpyro.manager.running_count() == 1


def test_a_warm_pool_refused_by_the_cap_leaves_no_records(
    vm_environment: str, state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(limits.MAX_VMS_ENV, "1")
    first = _start_vm_in_other_process(state_dir, vm_environment)
    with Pyro(
        state_dir=state_dir, backend="qemu", pool_size=1, pool_environment=vm_environment
    ) as pooled:
        pool = pooled.pool
        assert pool is not None
        wait_until(lambda: "limit" in (pool.last_error or ""), 60, "the pool to hit the cap")
        assert [v.vm_id for v in pooled.list_vms()] == [first]
    Pyro(state_dir=state_dir).delete_vm(first)


def test_cap_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in ("zero", "0", "-3", "1e3"):
        monkeypatch.setenv(limits.MAX_VMS_ENV, bad)
        with pytest.raises(InvalidInputError, match=limits.MAX_VMS_ENV):
            limits.max_vms()
    monkeypatch.setenv(limits.MAX_VMS_ENV, " 12 ")
    assert limits.max_vms() == 12
    monkeypatch.delenv(limits.MAX_VMS_ENV)
    assert 4 <= limits.max_vms() == limits.default_max_vms() <= 256


# ------------------------------------------------- the agent channel, hijacked

# Root in the guest can unbind and rebind the virtio console driver: the agent's
# open port goes stale and the port reappears free, so a guest process can write
# whatever it likes to the host end of the agent channel. (The port cannot be
# opened while the agent holds it: EBUSY, checked first.)
HIJACK = """
echo x > /dev/vport0p1 2>/dev/null && echo OPENED-WHILE-AGENT-HOLDS-IT
for dev in /sys/bus/virtio/devices/*; do
  [ "$(cat $dev/device)" = 0x0003 ] && port=${dev##*/}
done
echo $port > /sys/bus/virtio/drivers/virtio_console/unbind
echo $port > /sys/bus/virtio/drivers/virtio_console/bind
for i in $(seq 100); do [ -e /dev/vport0p1 ] && break; sleep 0.1; done
sleep 0.5
"""


def test_garbage_on_the_agent_channel_fails_that_vm_only(
    qpyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    m = qpyro.manager
    victim = started_vm(qpyro, vm_environment)
    bystander = started_vm(qpyro, vm_environment)
    victim_vmm = int(record(state_dir, victim)["vmm"]["pid"])
    started = time.monotonic()
    with pytest.raises(GuestProtocolError) as caught:
        m.exec(
            victim,
            HIJACK + "while :; do head -c 4096 /dev/urandom; sleep 0.2; done > /dev/vport0p1",
            ExecOptions.checked(timeout_seconds=20),
        )
    assert time.monotonic() - started < 20 + SLACK_S
    assert "protocol" in caught.value.message or "did not finish" in caught.value.message
    # The supervisor gives the VM up and says why; the VMM goes with it.
    wait_until(lambda: m.status(victim).status == "stopped", 30, "the broken VM to stop")
    assert "agent_channel_closed" in (m.status(victim).detail or "")
    wait_until(lambda: not Path(f"/proc/{victim_vmm}").exists(), 15, "the victim's VMM to exit")
    with pytest.raises(VMStateError):
        m.exec(victim, "true")
    # The other VM never noticed.
    ok = m.exec(bystander, "echo unaffected")
    assert (ok.exit_code, ok.stdout) == (0, b"unaffected\n")
    qpyro.delete_vm(victim)
    assert not (state_dir / "vms" / victim).exists()
    qpyro.delete_vm(bystander)
    assert_no_vmm_left(state_dir)


def test_forged_frames_cannot_exceed_the_host_side_caps(
    qpyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    """A guest that speaks the protocol itself: stray frames for unknown ids, a second
    HELLO, an INIT_OK out of place, then 1.5 MiB of OUTPUT for the running exec and a
    forged EXIT. The host keeps the cap (1 MiB), in what it streams as well, and stays
    small."""
    m = qpyro.manager
    vm_id = started_vm(qpyro, vm_environment)
    supervisor = int(record(state_dir, vm_id)["supervisor"]["pid"])
    rid = 2  # the supervisor's first request is INIT (id 1); this exec is the next one
    stray = b"".join(
        [
            p.encode(0, p.Hello(1, "forged", 1)),
            p.encode(999, p.Output(p.STDOUT, b"stray")),
            p.encode(4242, p.Exit(0, 0, False, False, False, 1)),
            p.encode(rid, p.InitOk()),
            p.encode(rid, p.Pong()),
        ]
    )
    chunk = p.encode(rid, p.Output(p.STDOUT, b"A" * p.MAX_OUTPUT_CHUNK))
    forged_exit = p.encode(rid, p.Exit(7, 0, False, False, False, 5))

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    script = HIJACK + (
        f"echo {b64(stray)} | base64 -d > /tmp/s\n"
        f"echo {b64(chunk)} | base64 -d > /tmp/c\n"
        f"echo {b64(forged_exit)} | base64 -d > /tmp/e\n"
        "{ cat /tmp/s; for i in $(seq 48); do cat /tmp/c; done; cat /tmp/e; } > /dev/vport0p1\n"
        "sleep 60\n"
    )
    cap = 1 << 20
    streamed: list[bytes] = []  # streamed output events: the supervisor cuts them too
    with Ticker() as ticker:
        out = m.exec(
            vm_id,
            script,
            ExecOptions.checked(timeout_seconds=30, stdout_cap=cap, on_stdout=streamed.append),
        )
    assert out.exit_code == 7  # the forged EXIT: the guest owns its own results
    assert out.stdout_truncated and out.stdout == b"A" * cap
    assert b"".join(streamed) == out.stdout
    assert peak_rss_kib(supervisor) < 128 * 1024
    ticker.assert_responsive()
    qpyro.delete_vm(vm_id)
    assert_no_vmm_left(state_dir)


def test_each_exec_runs_in_its_own_bounded_cgroup(qpyro: Pyro, vm_environment: str) -> None:
    """Every command runs in an exec cgroup with a pids limit (what stops a fork bomb);
    empty ones are reused, so their number stays small however many commands ran."""
    m = qpyro.manager
    vm_id = started_vm(qpyro, vm_environment)
    for _ in range(20):
        assert m.exec(vm_id, ["true"]).exit_code == 0
    own = m.exec(
        vm_id,
        [
            "sh",
            "-c",
            'g=$(cut -d: -f3 /proc/self/cgroup); echo "$g"; cat /sys/fs/cgroup$g/pids.max',
        ],
    )
    where, limit = own.stdout.decode().split()
    assert where.startswith("/exec/") and int(limit) >= 256, own
    listed = m.exec(vm_id, ["ls", "/sys/fs/cgroup/exec"]).stdout.decode().split()
    assert 1 <= len([name for name in listed if name.isdigit()]) <= 8, listed
    qpyro.delete_vm(vm_id)
