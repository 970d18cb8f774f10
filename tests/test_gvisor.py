"""The gvisor backend: what is specific to it (the shared runtime and task suites run
on it through the ``backend`` parameter in conftest).

The first tests need no runsc (version parsing, the OCI config, a missing runsc);
the rest start real sandboxes and are skipped on machines where runsc does not run.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from helpers import Ticker
from pyro_mcp.api import Pyro
from pyro_mcp.errors import BackendUnavailableError, GuestProtocolError
from pyro_mcp.manager import VMManager
from pyro_mcp.records import VMRecord
from pyro_mcp.state import read_json
from pyro_mcp.vmm import execution_mode, gvisor_bundle
from pyro_mcp.vmm import gvisor as g

# --------------------------------------------------------------------------- no runsc needed


def test_version_dates_decide_the_statx_shim() -> None:
    assert g.version_date("0.0~20221219.0") == 20221219  # Debian 12's runsc
    assert g.version_date("release-20240401.0") == 20240401  # gvisor.dev releases
    assert g.version_date("custom") is None
    assert g.needs_statx_compat("0.0~20221219.0")
    assert not g.needs_statx_compat("release-20240401.0")
    assert g.needs_statx_compat(None)  # undated builds get the (harmless) shim


def test_oci_config_isolates_and_limits(tmp_path: Path) -> None:
    agent, lib, preload, ws = (tmp_path / n for n in ("agent", "lib.so", "preload", "ws"))
    config = gvisor_bundle.oci_config(
        rootfs=tmp_path / "rootfs",
        agent=agent,
        mem_mib=256,
        vcpu_count=2,
        container_id="vm-0123456789ab",
        compat=(lib, preload),
        workspace=ws,
    )
    assert config["process"]["args"] == [gvisor_bundle.AGENT_PATH, "--stdio"]
    assert config["process"]["user"] == {"uid": 0, "gid": 0}
    assert config["root"] == {"path": str(tmp_path / "rootfs"), "readonly": False}
    linux = config["linux"]
    # Its own network namespace (and runsc runs with --network=none: loopback only).
    assert {"type": "network"} in linux["namespaces"]
    assert {"type": "pid"} in linux["namespaces"]
    assert linux["resources"]["memory"] == {"limit": 256 << 20}
    assert linux["resources"]["pids"] == {"limit": gvisor_bundle.PIDS_LIMIT}
    assert linux["resources"]["cpu"] == {"quota": 200_000, "period": 100_000}
    assert linux["cgroupsPath"] == "/pyro/vm-0123456789ab"
    mounts = {m["destination"]: m for m in config["mounts"]}
    assert mounts[gvisor_bundle.AGENT_PATH]["source"] == str(agent)
    assert "ro" in mounts[gvisor_bundle.AGENT_PATH]["options"]
    assert mounts["/etc/ld.so.preload"]["source"] == str(preload)
    assert "ro" in mounts[gvisor_bundle.COMPAT_SHIM_PATH]["options"]
    assert mounts["/workspace"]["source"] == str(ws)
    assert "rw" in mounts["/workspace"]["options"]
    # Without a workspace or the shim there is no such mount; rootless has no cgroup.
    bare = gvisor_bundle.oci_config(
        rootfs=tmp_path, agent=agent, mem_mib=128, vcpu_count=1, container_id="x", rootless=True
    )
    destinations = {m["destination"] for m in bare["mounts"]}
    assert "/workspace" not in destinations and "/etc/ld.so.preload" not in destinations
    assert "cgroupsPath" not in bare["linux"]


def test_global_flags_have_no_network_and_a_private_state_root(tmp_path: Path) -> None:
    flags = gvisor_bundle.global_flags(
        root=tmp_path / "r", overlay_dir=tmp_path, platform="ptrace", rootless=False
    )
    assert "--network=none" in flags
    assert f"--root={tmp_path / 'r'}" in flags
    assert f"--overlay2=root:{tmp_path}" in flags
    assert "--platform=ptrace" in flags
    rootless = gvisor_bundle.global_flags(
        root=tmp_path, overlay_dir=tmp_path, platform="ptrace", rootless=True
    )
    assert "--rootless" in rootless and "--ignore-cgroups" in rootless


def test_execution_mode_names_the_isolation() -> None:
    assert execution_mode("qemu") == "microvm"
    assert execution_mode("gvisor") == "gvisor_sandbox"
    assert execution_mode("host_compat") == "host_compat"


def test_runsc_override_that_does_not_exist(
    monkeypatch: pytest.MonkeyPatch, state_dir: Path
) -> None:
    monkeypatch.setenv(g.RUNSC_ENV, str(state_dir / "no-such-runsc"))
    probe = g.probe_backend()
    assert not probe.available
    assert g.RUNSC_ENV in probe.reason
    assert probe.advice
    with pytest.raises(BackendUnavailableError) as err:
        VMManager(state_root=state_dir, backend="gvisor").create("debian:12-base")
    assert "gvisor" in err.value.message
    assert err.value.hint


# --------------------------------------------------------------------------- real sandboxes

gvisor_only = pytest.mark.backends("gvisor")


def sandbox_pids(needle: str | Path) -> list[int]:
    """Live (not zombie) runsc processes whose command line mentions ``needle``: a
    VM's ``runsc run``, gofer, sandbox and, on ptrace, its stub processes (the VM's
    supervisor, a Python process, may still be finishing its exit)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[0]
        except OSError:
            continue
        if state != "Z" and b"runsc" in cmdline and str(needle).encode() in cmdline:
            found.append(int(entry))
    return found


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def require_cgroup_limits() -> None:
    info = g.runsc_info()
    if info is None or info.rootless:
        pytest.skip("runsc runs rootless here (not root): no cgroup limits to test")


def vm_cgroups(vm_id: str) -> list[Path]:
    return [
        parent / vm_id for parent in gvisor_bundle._cgroup_parents() if (parent / vm_id).exists()
    ]


@pytest.mark.vm
@gvisor_only
def test_run_says_gvisor_and_sees_the_environments_userland(
    pyro: Pyro, vm_environment: str, backend: str
) -> None:
    result = pyro.run_in_vm(
        vm_environment,
        # coreutils' ls/stat use statx(AT_NO_AUTOMOUNT): the compat shim on old runsc
        "ls -la / >/dev/null && stat -c %a /etc/passwd && . /etc/os-release && "
        'echo "$ID $VERSION_ID" && hostname && id -u',
    )
    assert (result.exit_code, result.stderr) == (0, "")
    assert result.stdout == "644\ndebian 12\npyro\n0\n"
    assert result.backend == "gvisor"
    assert result.execution_mode == "gvisor_sandbox"
    info = g.runsc_info()
    assert info is not None and result.acceleration == info.platform


@pytest.mark.vm
@gvisor_only
def test_no_network_only_loopback(pyro: Pyro, vm_environment: str, backend: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        script = (
            "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; "
            f"if (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null; then echo connected; "
            "else echo refused; fi"
        )
        result = pyro.run_in_vm(vm_environment, ["bash", "-c", script])
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing from the sandbox reached the host's loopback
    assert result.exit_code == 0, result.stderr
    # Only the sandbox's own loopback; its 127.0.0.1 is not the host's.
    assert result.stdout == "lo\nrefused\n"


@pytest.mark.vm
@gvisor_only
def test_memory_limit_ends_the_sandbox_with_a_clear_error(
    pyro: Pyro, vm_environment: str, backend: str, state_dir: Path
) -> None:
    require_cgroup_limits()
    fits = pyro.run_in_vm(
        vm_environment, "dd if=/dev/zero of=/dev/shm/f bs=1M count=32 2>&1 | tail -1", mem_mib=256
    )
    assert fits.exit_code == 0 and "33554432 bytes" in fits.stdout
    with pytest.raises(GuestProtocolError) as err:
        pyro.run_in_vm(vm_environment, "dd if=/dev/zero of=/dev/shm/f bs=1M count=400", mem_mib=128)
    assert "memory limit of 128 MiB" in err.value.message
    assert err.value.hint and "mem_mib" in err.value.hint
    # The kernel may take a moment to finish off the killed sandbox's stub processes.
    wait_for(lambda: sandbox_pids(state_dir) == [], 10, "the sandbox's processes to exit")
    assert pyro.list_vms() == []


@pytest.mark.vm
@gvisor_only
def test_limits_stop_a_fork_bomb(
    pyro: Pyro, vm_environment: str, backend: str, state_dir: Path
) -> None:
    require_cgroup_limits()
    with pytest.raises(GuestProtocolError) as err:
        pyro.run_in_vm(vm_environment, "b() { b | b & }; b; sleep 60", timeout_seconds=120)
    # Whichever limit it reaches first (host tasks or memory) ends the whole sandbox.
    message = err.value.message
    assert str(gvisor_bundle.PIDS_LIMIT) in message or "memory limit" in message, message
    wait_for(lambda: sandbox_pids(state_dir) == [], 10, "the sandbox's processes to exit")
    # The host and the backend are fine afterwards.
    assert pyro.run_in_vm(vm_environment, "echo ok").stdout == "ok\n"


@pytest.mark.vm
@gvisor_only
@pytest.mark.timeout(180)
def test_fork_bomb_one_shot_returns_within_its_timeout_and_leaves_nothing(
    pyro: Pyro, vm_environment: str, backend: str, state_dir: Path
) -> None:
    """A bomb whose main process keeps running: the run ends by its timeout or, first,
    by the sandbox's pids limit (which ends the whole sandbox); either way it returns
    in time, no runsc process or VM is left, and the host stays responsive."""
    require_cgroup_limits()
    timeout = 10
    with Ticker() as ticker:
        started = time.monotonic()
        try:
            result = pyro.run_in_vm(
                vm_environment, "bash -c ':(){ :|:& };:; sleep 100'", timeout_seconds=timeout
            )
            assert result.timed_out and result.exit_code == 137
        except GuestProtocolError as err:
            assert str(gvisor_bundle.PIDS_LIMIT) in err.message or "memory limit" in err.message, (
                err
            )
        elapsed = time.monotonic() - started
    assert elapsed < timeout + 30  # the host's grace and a loaded 2-core host
    wait_for(lambda: sandbox_pids(state_dir) == [], 15, "the sandbox's processes to exit")
    assert pyro.list_vms() == []
    # Nothing of the VM is left, also when the sandbox died mid-run (the supervisor
    # writes no exit.json into a folder that is being deleted).
    wait_for(lambda: list((state_dir / "vms").glob("vm-*")) == [], 15, "the VM folder to go")
    ticker.assert_responsive()


@pytest.mark.vm
@gvisor_only
def test_delete_leaves_no_runsc_process_state_or_cgroup(
    pyro: Pyro, vm_environment: str, backend: str, state_dir: Path
) -> None:
    vm = pyro.create_vm(vm_environment).vm_id
    pyro.start_vm(vm)
    vm_dir = state_dir / "vms" / vm
    assert len(sandbox_pids(vm_dir)) >= 3  # runsc run, gofer, sandbox
    assert pyro.manager.exec(vm, "sleep 30 & echo started").exit_code == 0
    pyro.delete_vm(vm)
    assert sandbox_pids(vm_dir) == []
    assert not vm_dir.exists()
    assert vm_cgroups(vm) == []


@pytest.mark.vm
@gvisor_only
def test_supervisor_crash_takes_the_sandbox_down_and_is_reaped(
    pyro: Pyro, vm_environment: str, backend: str, state_dir: Path
) -> None:
    vm = pyro.create_vm(vm_environment).vm_id
    pyro.start_vm(vm)
    vm_dir = state_dir / "vms" / vm
    assert pyro.manager.exec(vm, "sleep 300 &").exit_code == 0
    supervisor = VMRecord.from_dict(read_json(vm_dir / "vm.json")).runtime.supervisor
    assert supervisor is not None
    os.kill(supervisor.pid, signal.SIGKILL)
    # runsc run dies with its supervisor; the --attached sandbox and its gofer with it.
    wait_for(lambda: sandbox_pids(vm_dir) == [], 15, "the sandbox to exit with its supervisor")
    assert pyro.status_vm(vm).status == "stopped"
    # A killed `runsc run` cannot remove its cgroups: the next start sweeps empty ones.
    # (ptrace stub processes may take a moment longer to exit than the processes above.)
    wait_for(
        lambda: all(not (c / "cgroup.procs").read_text().strip() for c in vm_cgroups(vm)),
        15,
        "the sandbox's cgroups to empty",
    )
    gvisor_bundle.sweep_stale_cgroups(min_age_s=0, only=vm)
    assert vm_cgroups(vm) == []
    pyro.delete_vm(vm)
    assert not vm_dir.exists()


@pytest.mark.vm
@gvisor_only
def test_writes_stay_in_the_vms_private_layer(
    pyro: Pyro, vm_environment: str, backend: str
) -> None:
    m = pyro.manager
    first, second = (pyro.create_vm(vm_environment).vm_id for _ in "ab")
    for vm in (first, second):
        pyro.start_vm(vm)
    wrote = m.exec(first, "echo private > /usr/local/bin/mine && rm /etc/hostname && echo ok")
    assert wrote.stdout == b"ok\n", wrote.stderr
    seen = m.exec(second, "cat /usr/local/bin/mine; test -e /etc/hostname && echo intact")
    assert seen.stdout == b"intact\n"
    # The shared unpacked tree on the host is untouched.
    launch = read_json(pyro.manager.vms_dir / first / "launch.json")
    tree = Path(launch["rootfs"])
    assert not (tree / "usr/local/bin/mine").exists()
    assert (tree / "etc/hostname").exists()


@pytest.mark.vm
@gvisor_only
def test_workspace_folder_is_bind_mounted_and_outlives_a_restart(
    pyro: Pyro, vm_environment: str, backend: str, state_dir: Path, tmp_path: Path
) -> None:
    """How tasks give a gvisor VM its /workspace: a ``workspace`` folder (or symlink
    to one) in the VM's folder. The rest of the root filesystem starts fresh after a
    stop/start (the sandbox's writable layer goes with it)."""
    m = pyro.manager
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "seed.txt").write_text("seeded\n")
    vm = pyro.create_vm(vm_environment).vm_id
    (state_dir / "vms" / vm / g.WORKSPACE_DIRNAME).symlink_to(workspace)
    pyro.start_vm(vm)
    got = m.exec(vm, "cat /workspace/seed.txt && echo made > /workspace/made.txt && "
                     "echo gone > /root/scratch")  # fmt: skip
    assert got.stdout == b"seeded\n", got.stderr
    assert (workspace / "made.txt").read_text() == "made\n"
    pyro.stop_vm(vm)
    pyro.start_vm(vm)
    again = m.exec(vm, "cat /workspace/made.txt; test -e /root/scratch || echo fresh")
    assert again.stdout == b"made\nfresh\n"
