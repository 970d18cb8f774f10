"""The ``pyro`` command line, run as a real subprocess on a private state folder.

Exit codes of ``pyro run``: the guest command's own; 124 on timeout; 125 for pyro's
own errors. Only the guest command's output goes to stdout.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from helpers import state_leftovers, vm_record_fields, vmm_pids, wait_until
from pyro_mcp._version import __version__
from pyro_mcp.api import Pyro
from pyro_mcp.models import ExecResult

EXIT_TIMEOUT = 124
EXIT_PYRO_ERROR = 125


@pytest.fixture(autouse=True)
def _qemu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """These are microVM tests: pin the QEMU backend whatever `auto` would choose here
    (CLI subprocesses inherit it)."""
    monkeypatch.setenv("PYRO_BACKEND", "qemu")


def pyro_argv() -> list[str]:
    """The installed ``pyro`` script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("pyro")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "pyro_mcp.cli"]


def cli(
    state_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYRO_STATE_DIR": str(state_dir), **(env or {})}
    return subprocess.run(
        [*pyro_argv(), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def assert_clean(state_dir: Path) -> None:
    assert vmm_pids(state_dir) == []
    assert state_leftovers(state_dir) == []


# --------------------------------------------------------------------------- no VM needed


def test_version(state_dir: Path) -> None:
    proc = cli(state_dir, "--version")
    assert proc.returncode == 0
    assert __version__ in proc.stdout
    assert proc.stdout.startswith("pyro")


@pytest.mark.parametrize(
    ("args", "in_stderr"),
    [
        (["run", "nosuch:1", "--", "true"], "unknown environment"),
        (["run", "../x", "--", "true"], "invalid environment name"),
        (["run", "debian:12-base", "--mem-mib", "1", "--", "true"], "--mem-mib"),
        (["run", "debian:12-base", "--mem-mib", "lots", "--", "true"], "--mem-mib"),
        (["run", "debian:12-base", "--timeout-seconds", "0", "--", "true"], "--timeout-seconds"),
        (["run", "debian:12-base", "--vcpu-count", "99", "--", "true"], "--vcpu-count"),
        (["run", "debian:12-base", "--"], "COMMAND"),
        (["run", "debian:12-base", "--", ""], "program name"),
        (["run", "debian:12-base", "--network", "--", "true"], "networking"),
    ],
    ids=[
        "unknown-env",
        "malformed-env",
        "mem-1",
        "mem-not-int",
        "timeout-0",
        "vcpu-99",
        "no-command",
        "empty-command",
        "network",
    ],
)
def test_run_pyro_errors_exit_125(state_dir: Path, args: list[str], in_stderr: str) -> None:
    proc = cli(state_dir, *args)
    assert proc.returncode == EXIT_PYRO_ERROR, proc.stderr
    assert proc.stdout == ""
    assert in_stderr in proc.stderr
    assert_clean(state_dir)


def test_run_error_as_json(state_dir: Path) -> None:
    proc = cli(state_dir, "run", "--json", "nosuch:1", "--", "true")
    assert proc.returncode == EXIT_PYRO_ERROR
    error = json.loads(proc.stdout)["error"]
    assert error["code"] == "not_found"
    assert error["message"] and error["hint"]


def test_doctor_never_crashes(state_dir: Path) -> None:
    text = cli(state_dir, "doctor")
    assert text.returncode == 0, text.stderr
    assert "qemu" in text.stdout
    assert "backend:" in text.stdout
    as_json = cli(state_dir, "doctor", "--json")
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert {c["name"] for c in data["checks"]} >= {"python", "qemu", "acceleration"}


def test_doctor_without_qemu_on_path(state_dir: Path) -> None:
    # The script is started by absolute path; PATH holds only an empty folder.
    empty = state_dir / "empty-bin"
    empty.mkdir()
    env = {"PATH": str(empty), "PYRO_QEMU": ""}
    text = cli(state_dir, "doctor", env=env)
    assert text.returncode == 0, text.stderr
    assert "[FAIL] qemu" in text.stdout
    assert "apt-get install qemu-system-x86" in text.stdout
    as_json = cli(state_dir, "doctor", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    qemu = next(c for c in data["checks"] if c["name"] == "qemu")
    assert qemu["status"] == "fail"
    assert "apt-get install" in qemu["advice"]
    assert data["ok"] is False


def test_vm_list_empty(state_dir: Path) -> None:
    text = cli(state_dir, "vm", "list")
    assert (text.returncode, text.stdout, text.stderr) == (0, "", "no VMs\n")
    as_json = cli(state_dir, "vm", "list", "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout) == {"vms": []}


def test_vm_commands_with_bad_ids(state_dir: Path) -> None:
    for args in (["vm", "status", "../../etc"], ["vm", "delete", "vm-0123456789ab"]):
        proc = cli(state_dir, *args)
        assert proc.returncode == EXIT_PYRO_ERROR
        assert "pyro: error:" in proc.stderr
        assert "pyro: hint:" in proc.stderr
    assert_clean(state_dir)


# --------------------------------------------------------------------------- real VMs


@pytest.mark.vm
def test_env_list_json(vm_environment: str, state_dir: Path) -> None:
    proc = cli(state_dir, "env", "list", "--json")
    assert proc.returncode == 0, proc.stderr
    envs = {e["name"]: e for e in json.loads(proc.stdout)["environments"]}
    assert vm_environment in envs
    assert envs[vm_environment]["installed"] is True
    assert {"name", "version", "description", "installed"} <= set(envs[vm_environment])


@pytest.mark.vm
def test_run_exit_code_and_clean_stdout(vm_environment: str, state_dir: Path) -> None:
    proc = cli(
        state_dir, "run", vm_environment, "--", "sh", "-c", "echo only; echo err >&2; exit 7"
    )
    assert proc.returncode == 7
    assert proc.stdout == "only\n"  # nothing but the command's output
    assert "err\n" in proc.stderr
    assert "pyro: " in proc.stderr  # progress went to stderr
    assert_clean(state_dir)


@pytest.mark.vm
def test_run_argv_is_exact(vm_environment: str, state_dir: Path) -> None:
    proc = cli(state_dir, "run", vm_environment, "--", "sh", "-lc", "echo a && echo b")
    assert (proc.returncode, proc.stdout) == (0, "a\nb\n")
    proc = cli(state_dir, "run", vm_environment, "--", "echo", "$HOME", "--json")
    assert (proc.returncode, proc.stdout) == (0, "$HOME --json\n")


@pytest.mark.vm
def test_run_passes_its_stdin_through(vm_environment: str, state_dir: Path, tmp_path: Path) -> None:
    """`cat data | pyro run ...` with real pipes and files; -n and /dev/null are empty."""
    env = {**os.environ, "PYRO_STATE_DIR": str(state_dir)}
    run = [*pyro_argv(), "run", vm_environment]
    csv = b"".join(b"%d,row\n" % i for i in range(1000))
    cat = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert cat.stdin is not None
    piped = subprocess.Popen(
        [*run, "--", "wc", "-l"], stdin=cat.stdout, stdout=subprocess.PIPE, env=env
    )
    assert cat.stdout is not None
    cat.stdout.close()
    cat.stdin.write(csv)
    cat.stdin.close()
    stdout, _ = piped.communicate(timeout=300)
    assert (piped.returncode, stdout) == (0, b"1000\n")
    blob = tmp_path / "blob"
    blob.write_bytes(os.urandom(200_000) + b"\x00\xff")
    with blob.open("rb") as f:
        digest = subprocess.run(
            [*run, "--", "sha256sum"], stdin=f, capture_output=True, env=env, timeout=300,
            check=False,
        )  # fmt: skip
    assert digest.stdout.split()[0].decode() == hashlib.sha256(blob.read_bytes()).hexdigest()
    ignored = subprocess.run(
        [*run, "-n", "--", "wc", "-c"], input=b"ignored", capture_output=True, env=env,
        timeout=300, check=False,
    )  # fmt: skip
    assert (ignored.returncode, ignored.stdout) == (0, b"0\n")
    devnull = subprocess.run(
        [*run, "--", "wc", "-c"], stdin=subprocess.DEVNULL, capture_output=True, env=env,
        timeout=300, check=False,
    )  # fmt: skip
    assert (devnull.returncode, devnull.stdout) == (0, b"0\n")
    assert_clean(state_dir)


@pytest.mark.vm
def test_run_timeout_exits_124(vm_environment: str, state_dir: Path) -> None:
    proc = cli(state_dir, "run", vm_environment, "--timeout-seconds", "1", "--", "sleep", "30")
    assert proc.returncode == EXIT_TIMEOUT
    assert "timed out" in proc.stderr
    assert_clean(state_dir)


@pytest.mark.vm
def test_run_json_has_every_result_field(vm_environment: str, state_dir: Path) -> None:
    proc = cli(state_dir, "run", "--json", vm_environment, "--", "sh", "-c", "echo hi; exit 3")
    assert proc.returncode == 3
    data = json.loads(proc.stdout)  # stdout is only the JSON document
    assert set(data) == set(ExecResult.model_fields)
    result = ExecResult.model_validate(data)
    assert result.stdout == "hi\n"
    assert result.exit_code == 3
    assert result.command == ["sh", "-c", "echo hi; exit 3"]
    assert result.cleanup is not None and result.cleanup.deleted
    assert_clean(state_dir)


@pytest.mark.vm
def test_vm_list_shows_sdk_vms(vm_environment: str, state_dir: Path) -> None:
    pyro = Pyro(state_dir=state_dir)
    vm = pyro.create_vm(vm_environment).vm_id
    try:
        text = cli(state_dir, "vm", "list")
        assert text.returncode == 0
        assert vm in text.stdout and "created" in text.stdout
        listed = json.loads(cli(state_dir, "vm", "list", "--json").stdout)
        assert [v["vm_id"] for v in listed["vms"]] == [vm]
        deleted = cli(state_dir, "vm", "delete", vm)
        assert deleted.returncode == 0
    finally:
        for info in pyro.list_vms():
            pyro.delete_vm(info.vm_id)
    assert_clean(state_dir)


def _spawn_run(state_dir: Path, environment: str, command: Sequence[str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*pyro_argv(), "run", environment, "--", *command],
        env={**os.environ, "PYRO_STATE_DIR": str(state_dir)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _vm_running(state_dir: Path) -> bool:
    for record in (state_dir / "vms").glob("vm-*/vm.json"):
        try:
            if vm_record_fields(record).get("status") == "running":
                return True
        except (OSError, ValueError, KeyError):
            continue
    return False


@pytest.mark.vm
@pytest.mark.parametrize(
    ("sig", "returncode"),
    [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)],
    ids=["SIGKILL", "SIGTERM", "SIGINT"],
)
def test_signalled_run_mid_command_is_reaped(
    vm_environment: str, state_dir: Path, sig: signal.Signals, returncode: int
) -> None:
    """Ctrl-C deletes the VM on the way out; after SIGTERM or SIGKILL the supervisor
    notices its owner died and removes QEMU and the VM folder."""
    proc = _spawn_run(state_dir, vm_environment, ["sleep", "60"])
    try:
        wait_until(lambda: _vm_running(state_dir), 120, "the VM to run")
        assert len(vmm_pids(state_dir)) == 1
        time.sleep(0.5)  # the command is running now
    finally:
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == returncode
    wait_until(lambda: not vmm_pids(state_dir), 15, "QEMU to exit")
    wait_until(lambda: not state_leftovers(state_dir), 15, "the VM folder to go")
    listed = cli(state_dir, "vm", "list", "--json")
    assert json.loads(listed.stdout) == {"vms": []}


@pytest.mark.vm
def test_sigkilled_run_during_boot_is_reaped(vm_environment: str, state_dir: Path) -> None:
    """Killed before the VM was ready: the supervisor reaps it once it finds nobody
    waiting for it, or else the next invocation does."""
    proc = _spawn_run(state_dir, vm_environment, ["true"])
    try:
        wait_until(
            lambda: any((state_dir / "vms").glob("vm-*/launch.json")), 120, "the VM to launch"
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    def clean() -> bool:
        return not vmm_pids(state_dir) and not state_leftovers(state_dir)

    deadline = time.monotonic() + 20
    while not clean() and time.monotonic() < deadline:
        time.sleep(0.1)
    if not clean():  # killed before the supervisor started: the next invocation reaps
        listed = cli(state_dir, "vm", "list", "--json")
        assert json.loads(listed.stdout) == {"vms": []}
        wait_until(clean, 30, "QEMU and the VM folder to go")
