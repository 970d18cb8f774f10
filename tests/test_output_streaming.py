"""A command's output as it comes: ``pyro run``/``task exec`` write it live and byte
for byte, the SDK hands it to ``on_stdout``/``on_stderr`` and keeps the exact bytes,
a timeout or a Ctrl-C keeps what was already printed; ``--quiet``/``--progress`` and
the heartbeat's rate off a terminal; ``--env NAME``. Real ``pyro`` subprocesses on a
private state folder (QEMU) and real host_compat sandboxes; kept few and tiny."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import click
import pytest

from pyro_mcp.api import Pyro
from pyro_mcp.cli.common import HEARTBEAT_PLAIN_S, StderrProgress
from pyro_mcp.progress import ProgressEvent
from pyro_mcp.vmm import host_compat

ALL_BYTES = bytes(range(256))
# dash's printf: every byte as an octal escape (NUL included).
PRINT_ALL_BYTES = "printf '" + "".join(f"\\{b:03o}" for b in ALL_BYTES) + "'"


@pytest.fixture(autouse=True)
def _qemu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_BACKEND", "qemu")
    monkeypatch.delenv("PYRO_QUIET", raising=False)
    monkeypatch.delenv("PYRO_PROGRESS", raising=False)


def pyro_argv() -> list[str]:
    script = Path(sys.executable).with_name("pyro")
    return [str(script)] if script.exists() else [sys.executable, "-m", "pyro_mcp.cli"]


def spawn(
    state_dir: Path, *args: str, env: dict[str, str] | None = None, merge: bool = False
) -> subprocess.Popen[bytes]:
    """``pyro ARGS`` with its stdout (and stderr, or both merged) on pipes."""
    return subprocess.Popen(
        [*pyro_argv(), *args],
        env={**os.environ, "PYRO_STATE_DIR": str(state_dir), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge else subprocess.PIPE,
    )


def timed_lines(proc: subprocess.Popen[bytes]) -> Iterator[tuple[float, bytes]]:
    assert proc.stdout is not None
    for line in iter(proc.stdout.readline, b""):
        yield time.monotonic(), line


# ------------------------------------------------------------------ no VM needed


def _events(progress: StderrProgress, n: int) -> None:
    for i in range(n):
        progress(ProgressEvent("exec", f"command running ({i} s)", float(i), None))


def test_plain_heartbeat_is_at_most_one_line_per_period(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Off a terminal a running command's heartbeat (the supervisor sends one a
    second) is one line per HEARTBEAT_PLAIN_S, other stages are all shown."""
    with click.Context(click.Command("pyro"), obj=None) as ctx:
        ctx.params = {"progress": "plain"}
        progress = StderrProgress()
        progress(ProgressEvent("boot", "booting"))
        _events(progress, 30)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["pyro: booting", "pyro: command running (0 s)"]
    assert HEARTBEAT_PLAIN_S == 10.0


def test_progress_none_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    for params in ({"progress": "none"}, {"quiet": True, "progress": "plain"}):
        with click.Context(click.Command("pyro")) as ctx:
            ctx.params = params
            progress = StderrProgress()
            progress(ProgressEvent("boot", "booting"))
            _events(progress, 3)
    assert capsys.readouterr().err == ""


def test_a_bare_env_name_must_be_set_here(state_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYRO_UNSET_FOR_TEST"}
    proc = spawn(
        state_dir, "run", "debian:12-base", "--env", "PYRO_UNSET_FOR_TEST", "--", "true", env=env
    )
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 125
    assert b"PYRO_UNSET_FOR_TEST is not set" in err


def test_output_cap_has_a_documented_maximum(state_dir: Path) -> None:
    proc = spawn(state_dir, "run", "debian:12-base", "--output-cap", str(1 << 30), "--", "true")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 125
    assert b"--output-cap" in err


# ------------------------------------------------------------------------ QEMU


@pytest.mark.vm
def test_run_streams_in_order_quietly(vm_environment: str, state_dir: Path) -> None:
    """The first line arrives while the command still runs (the gap between the two
    lines follows the command's own sleep); stdout and stderr keep their order when
    the writes are apart in time; --progress none leaves stderr to the command."""
    proc = spawn(
        state_dir, "--progress", "none", "run", vm_environment, "--",
        "sh", "-c", "echo one; sleep 3; echo two >&2; sleep 0.5; echo three",
        merge=True,
    )  # fmt: skip
    lines = list(timed_lines(proc))
    assert proc.wait(timeout=60) == 0
    assert [line for _, line in lines] == [b"one\n", b"two\n", b"three\n"]
    # Buffered to the end, all three would come together; streamed, "one" comes
    # about the command's 3 s sleep before "two" (half of it: a noisy machine).
    assert lines[1][0] - lines[0][0] >= 1.5
    assert lines[2][0] - lines[1][0] >= 0.25


@pytest.mark.vm
def test_all_byte_values_round_trip(vm_environment: str, state_dir: Path) -> None:
    proc = subprocess.run(
        [*pyro_argv(), "-q", "run", vm_environment, "--", "sh", "-c", PRINT_ALL_BYTES],
        env={**os.environ, "PYRO_STATE_DIR": str(state_dir)},
        capture_output=True, stdin=subprocess.DEVNULL, timeout=120, check=False,
    )  # fmt: skip
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, ALL_BYTES, b"")
    chunks: list[bytes] = []
    out: list[bytes] = []
    result = Pyro(state_dir=state_dir).run_in_vm(
        vm_environment,
        ["sh", "-c", PRINT_ALL_BYTES + " >&2; head -c 5000 /dev/zero"],
        on_stderr=chunks.append,
        on_stdout=out.append,
        stdout_cap=1024,
    )
    assert result.stderr_bytes == b"".join(chunks) == ALL_BYTES
    assert result.stderr_lossy and "\ufffd" in result.stderr
    assert "stderr_bytes" not in result.model_dump()
    # The cap holds for what is streamed as well as for what is kept.
    assert result.stdout_bytes == b"".join(out) == bytes(1024)
    assert result.stdout_truncated and not result.stderr_truncated
    assert not result.stdout_lossy


@pytest.mark.vm
def test_timeout_keeps_partial_output_and_heartbeats_are_rare(
    vm_environment: str, state_dir: Path
) -> None:
    """What the command printed before its timeout is kept (and shown at once);
    off a terminal the 1/s heartbeat shows as at most a line per 10 s."""
    proc = spawn(
        state_dir, "--progress", "plain", "run", "--timeout-seconds", "6", "--env", "FOO",
        "--cwd", "/tmp", vm_environment, "--", "sh", "-c", 'echo "$FOO $(pwd)"; sleep 60',
        env={"FOO": "from host"},
    )  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 124
    assert out == b"from host /tmp\n"
    assert err.count(b"command running") <= 1
    assert b"timed out" in err


@pytest.mark.vm
def test_ctrl_c_keeps_what_was_printed(vm_environment: str, state_dir: Path) -> None:
    proc = spawn(state_dir, "-q", "run", vm_environment, "--", "sh", "-c", "echo started; sleep 60")
    lines = timed_lines(proc)
    assert next(lines)[1] == b"started\n"  # while the command still runs
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    assert list(lines) == []


# ----------------------------------------------------------------- host_compat


@pytest.mark.vm
def test_host_compat_streams(state_dir: Path) -> None:
    from conftest import TEST_ENV

    probe = host_compat.probe()
    if not probe.available:
        pytest.skip(f"host_compat cannot run here: {probe.reason}")
    seen: list[tuple[float, str, bytes]] = []

    def note(stream: str) -> Callable[[bytes], None]:
        return lambda data: seen.append((time.monotonic(), stream, data))

    result = Pyro(state_dir=state_dir, backend="host_compat").run_in_vm(
        TEST_ENV,
        "echo one; sleep 2; echo two >&2; sleep 0.3; printf '\\377three\\n'",
        on_stdout=note("out"),
        on_stderr=note("err"),
    )
    assert [(s, d) for _, s, d in seen] == [
        ("out", b"one\n"),
        ("err", b"two\n"),
        ("out", b"\xffthree\n"),
    ]
    assert seen[1][0] - seen[0][0] >= 1.0  # "one" came during the sleep
    assert result.stdout_bytes == b"one\n\xffthree\n" and result.stdout_lossy
    assert result.stderr == "two\n"


@pytest.mark.vm
def test_host_compat_task_exec_cli(state_dir: Path) -> None:
    """``pyro task exec``: byte-exact output, ``--env NAME`` from this environment,
    and a closed stdout stops the command (exit 141) instead of a traceback."""
    from conftest import TEST_ENV

    if not host_compat.probe().available:
        pytest.skip("host_compat cannot run here")
    task_id = Pyro(state_dir=state_dir, backend="host_compat").create_task(TEST_ENV).task_id
    proc = spawn(
        state_dir, "-q", "task", "exec", task_id, "--env", "FOO", "--",
        "sh", "-c", 'printf "%s\\377\\000" "$FOO"', env={"FOO": "from host"},
    )  # fmt: skip
    out, err = proc.communicate(timeout=120)
    assert (proc.returncode, out, err) == (0, b"from host\xff\x00", b"")
    proc = spawn(state_dir, "-q", "task", "exec", task_id, "--", "sh", "-c", "yes; sleep 60")
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"y\n"
    proc.stdout.close()  # like `| head -1`
    assert proc.wait(timeout=60) == 141
    assert proc.stderr is not None and proc.stderr.read() == b""
