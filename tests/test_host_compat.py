"""host_compat: tasks on the host, confined by bubblewrap, only when opted in.

Real bwrap sandboxes over the environment's unpacked root filesystem; no VM.
Skips only where bubblewrap is missing or cannot make namespaces here, or the
environment cannot be built on this machine.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from helpers import Ticker, wait_until
from pyro_mcp.api import Pyro
from pyro_mcp.errors import BackendUnavailableError, InvalidInputError
from pyro_mcp.records import TaskRecord
from pyro_mcp.state import read_json, write_json_atomic
from pyro_mcp.vmm import pids
from pyro_mcp.workspace.archive import UnsafeSeedError

pytestmark = pytest.mark.vm

NOTE = "host compat note\n"


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"pyro {args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def project(root: Path) -> Path:
    root.mkdir()
    (root / "note.txt").write_text(NOTE)
    (root / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (root / "run.sh").chmod(0o755)
    (root / "link").symlink_to("note.txt")
    return root


@pytest.mark.parametrize("kind", ["folder", "tar.gz"])
def test_cli_smoke_in_host_compat(
    hc_environment: str, state_dir: Path, tmp_path: Path, kind: str
) -> None:
    folder = project(tmp_path / "p")
    source = folder
    if kind == "tar.gz":
        source = tmp_path / "p.tar.gz"
        with tarfile.open(source, "w:gz") as tf:
            tf.add(folder, arcname=".")
    created = cli(
        "--backend", "host_compat", "task", "create", hc_environment, "--source-path", str(source)
    )
    task_id = created.stdout.strip()
    assert "host_compat" in created.stderr
    assert cli("task", "exec", task_id, "--", "cat", "note.txt").stdout == NOTE
    ab = cli("task", "exec", task_id, "--", "sh", "-lc", "echo a && echo b")
    assert ab.stdout == "a\nb\n"
    result = json.loads(cli("task", "exec", task_id, "--json", "--", "./run.sh").stdout)
    assert (result["stdout"], result["execution_mode"], result["backend"]) == (
        "ran\n",
        "host_compat",
        "host_compat",
    )
    assert result["vm_id"] is None
    status = json.loads(cli("task", "status", task_id, "--json").stdout)
    assert status["status"] == "ready"
    assert status["workspace_seed"]["mode"] == ("directory" if kind == "folder" else "tar_archive")
    assert cli("task", "delete", task_id).stdout.strip() == f"deleted {task_id}"
    assert cli("task", "delete", task_id, check=False).returncode == 125
    assert not any((state_dir / "tasks").glob("task-*"))


def test_workspace_persists_and_keeps_modes_and_links(hc: Pyro, tmp_path: Path) -> None:
    info = hc.create_task("debian:12-base", source_path=project(tmp_path / "p"))
    assert (info.execution_mode, info.acceleration, info.vm_id) == ("host_compat", "none", None)
    tid = info.task_id
    assert hc.exec_task(tid, "./run.sh && cat link").stdout == "ran\n" + NOTE
    hc.exec_task(tid, "mkdir -p out && echo made > out/f")
    assert hc.exec_task(tid, ["cat", "out/f"]).stdout == "made\n"
    host_copy = Path(os.environ["PYRO_STATE_DIR"]) / "tasks" / tid / "workspace" / "out" / "f"
    assert host_copy.read_text() == "made\n"
    assert hc.exec_task(tid, "pwd", cwd="/tmp").stdout == "/tmp\n"
    env = hc.exec_task(tid, ["sh", "-c", 'echo "$GREETING"'], env={"GREETING": "hi there"})
    assert env.stdout == "hi there\n"


def test_commands_are_confined(hc: Pyro, tmp_path: Path) -> None:
    secret = tmp_path / "host-secret.txt"
    secret.write_text("do not read")
    tid = hc.create_task("debian:12-base").task_id

    def run(cmd: str) -> str:
        return hc.exec_task(tid, cmd).stdout

    # No network but loopback.
    assert run("tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '") == "lo\n"
    # The environment's own root filesystem, read-only; the host's files are not there.
    assert run("test -e /.pyro-hostfs-ready && echo env-root") == "env-root\n"
    assert run(f"test -e {secret} || echo hidden") == "hidden\n"
    assert run("ls -A /root | wc -l") == "0\n"
    denied = hc.exec_task(tid, "echo x > /etc/pyro-test")
    assert denied.exit_code != 0 and "Read-only" in denied.stderr
    assert run("echo w > /workspace/w && cat /workspace/w") == "w\n"
    # No capabilities, own PID namespace.
    assert run("grep CapEff /proc/self/status").split()[1] == "0000000000000000"
    assert run("grep NoNewPrivs /proc/self/status").split()[1] == "1"
    assert run(f"test -d /proc/{os.getpid()} || echo other-pids") == "other-pids\n"


def _host_sleepers(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def test_timeout_kills_the_whole_sandbox_and_keeps_the_task(hc: Pyro) -> None:
    tid = hc.create_task("debian:12-base").task_id
    r = hc.exec_task(tid, "sleep 301 & sleep 302", timeout_seconds=1)
    assert r.timed_out and r.exit_code == 137
    deadline = time.monotonic() + 10
    while (_host_sleepers("301") or _host_sleepers("302")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _host_sleepers("sleep\x00301") and not _host_sleepers("sleep\x00302")
    assert hc.exec_task(tid, "echo still here").stdout == "still here\n"
    assert hc.status_task(tid).status == "ready"


def test_cancelled_exec_kills_the_sandbox(hc: Pyro, state_dir: Path) -> None:
    tid = hc.create_task("debian:12-base").task_id
    started = state_dir / "tasks" / tid / "workspace" / "started"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyro_mcp.cli", "task", "exec", tid, "--",
         "sh", "-c", "touch started; exec sleep 303"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _host_sleepers("sleep\x00303")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 130
    deadline = time.monotonic() + 10
    while _host_sleepers("sleep\x00303") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _host_sleepers("sleep\x00303")
    assert hc.exec_task(tid, ["ls", "started"]).exit_code == 0


def test_stdin_is_streamed_into_the_sandbox(hc: Pyro) -> None:
    tid = hc.create_task("debian:12-base").task_id
    data = os.urandom(300_000)
    digest = hc.exec_task(tid, "sha256sum", stdin=data)
    assert digest.stdout.split()[0] == hashlib.sha256(data).hexdigest()

    def endless() -> Iterator[bytes]:
        while True:
            yield b"y" * 65536

    assert hc.exec_task(tid, "head -c1", stdin=endless()).stdout == "y"
    late = hc.exec_task(tid, "sleep 60", stdin=endless(), timeout_seconds=1)
    assert late.timed_out

    def broken() -> Iterator[bytes]:
        yield b"partial"
        raise OSError("the source broke")

    with pytest.raises(InvalidInputError, match="the source broke"):
        hc.exec_task(tid, "cat; sleep 60", stdin=broken())
    assert hc.exec_task(tid, "wc -c").stdout.strip() == "0"  # no stdin: an empty one
    ran = hc.run_in_vm("debian:12-base", "tr a-z A-Z", stdin="abc")
    assert (ran.stdout, ran.execution_mode) == ("ABC", "host_compat")


def test_output_caps(hc: Pyro) -> None:
    tid = hc.create_task("debian:12-base").task_id
    r = hc.exec_task(tid, "head -c 100000 /dev/zero; echo err >&2", stdout_cap=1024)
    assert r.stdout_truncated and len(r.stdout) == 1024
    assert r.stderr == "err\n" and not r.stderr_truncated


def test_same_extraction_rules(hc: Pyro, state_dir: Path, tmp_path: Path) -> None:
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tf:
        link = tarfile.TarInfo("out")
        link.type = tarfile.SYMTYPE
        link.linkname = str(tmp_path)
        tf.addfile(link)
    with pytest.raises(UnsafeSeedError, match="symlink_escape"):
        hc.create_task("debian:12-base", source_path=evil)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "up").symlink_to("../../")
    with pytest.raises(UnsafeSeedError, match="up"):
        hc.create_task("debian:12-base", source_path=folder)
    assert not any((state_dir / "tasks").glob("task-*"))


def test_expired_host_compat_tasks_are_reaped(hc: Pyro, state_dir: Path) -> None:
    tid = hc.create_task("debian:12-base").task_id
    path = state_dir / "tasks" / tid / "task.json"
    record = TaskRecord.from_dict(read_json(path))
    expired = TaskRecord(replace(record.config, expires_at=time.time() - 1), record.runtime)
    write_json_atomic(path, expired.to_dict())
    assert hc.reap_expired().reasons == {tid: "ttl_expired"}
    assert not (state_dir / "tasks" / tid).exists()


@pytest.fixture
def no_vm_backend(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Make every VM backend unusable, as on a host without QEMU or gVisor."""
    missing = str(tmp_path / "not-installed")
    monkeypatch.setenv("PYRO_QEMU", missing)
    monkeypatch.setenv("PYRO_RUNSC", missing)
    monkeypatch.delenv("PYRO_BACKEND", raising=False)


def test_host_compat_is_never_chosen_silently(
    hc_environment: str, state_dir: Path, no_vm_backend: None
) -> None:
    with pytest.raises(BackendUnavailableError) as info:
        Pyro(state_dir=state_dir).create_task(hc_environment)
    assert "host_compat" in (info.value.hint or "")
    assert "allow_host_compat=True" in (info.value.hint or "")
    assert not any((state_dir / "tasks").glob("task-*"))
    refused = cli("task", "create", hc_environment, check=False)
    assert refused.returncode == 125 and "--backend host_compat" in refused.stderr
    # Opting in, in the SDK and on the command line.
    opted = Pyro(state_dir=state_dir, allow_host_compat=True)
    task = opted.create_task(hc_environment)
    assert task.execution_mode == "host_compat"
    assert opted.exec_task(task.task_id, ["echo", "ok"]).stdout == "ok\n"
    opted.delete_task(task.task_id)
    run = json.loads(
        cli("--backend", "host_compat", "run", hc_environment, "--json", "--", "pwd").stdout
    )
    assert (run["stdout"], run["execution_mode"]) == ("/root\n", "host_compat")
    assert run["cleanup"]["deleted"] is True
    assert not any((state_dir / "tasks").glob("task-*"))


def test_host_compat_is_not_a_vm_backend(hc_environment: str, state_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="tasks and one-shot runs only"):
        Pyro(state_dir=state_dir, backend="host_compat").create_vm(hc_environment)


# --------------------------------------------------------------------------- fork bombs

BOMB_TIMEOUT_S = 5
# Killing and reaping a sandbox at its pids limit on a loaded 2-core host.
BOMB_SLACK_S = 20


def _require_a_pids_bound() -> str:
    how = pids.describe()
    if how is None:
        pytest.skip(
            "nothing bounds a host_compat sandbox's processes here (host root without a "
            "usable pids cgroup): a fork bomb would take the host down"
        )
    return how


def _our_leaves() -> list[Path]:
    found = pids.pids_parent()
    if found is None:
        return []
    return list(found[0].glob(f"{pids.LEAF_PREFIX}{os.getpid()}-*"))


@pytest.mark.timeout(120)
def test_fork_bomb_one_shot_returns_at_its_timeout_and_leaves_nothing(
    hc_environment: str, state_dir: Path
) -> None:
    """The bomb's main process keeps running (``sleep``), so only the timeout ends it:
    the run returns then, every process of the sandbox is gone, the host stayed
    responsive, and the backend answers the next run."""
    _require_a_pids_bound()
    token = f"bomb-{secrets.token_hex(4)}"
    client = Pyro(state_dir=state_dir, backend="host_compat")
    with Ticker() as ticker:
        started = time.monotonic()
        result = client.run_in_vm(
            hc_environment,
            f"bash -c ':(){{ :|:& }};:; sleep 100' {token}",
            timeout_seconds=BOMB_TIMEOUT_S,
        )
        elapsed = time.monotonic() - started
    assert result.timed_out and result.exit_code == 137
    assert elapsed < BOMB_TIMEOUT_S + BOMB_SLACK_S
    wait_until(lambda: not _host_sleepers(token), 15, "every process of the bomb to exit")
    assert _our_leaves() == []
    ticker.assert_responsive()
    assert client.run_in_vm(hc_environment, "echo ok").stdout == "ok\n"
    assert not any((state_dir / "tasks").glob("task-*"))


def test_a_sandbox_cannot_start_more_processes_than_its_limit(
    hc_environment: str, state_dir: Path
) -> None:
    _require_a_pids_bound()
    token = f"many-{secrets.token_hex(4)}"
    loop = f"i=0; while [ $i -lt {2 * pids.PIDS_LIMIT} ]; do sleep 60 & i=$((i+1)); done; echo all"
    client = Pyro(state_dir=state_dir, backend="host_compat")
    result = client.run_in_vm(hc_environment, ["sh", "-c", loop, token], timeout_seconds=60)
    assert "Cannot fork" in result.stderr, result.stderr
    assert result.exit_code != 0 and "all" not in result.stdout
    wait_until(lambda: not _host_sleepers(token), 15, "the sandbox's sleepers to exit")
    assert _our_leaves() == []
