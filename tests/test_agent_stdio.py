"""The real guest agent, compiled on this host and driven in --stdio mode (no VM)."""

from __future__ import annotations

import errno
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from agent_driver import (  # noqa: F401 (fixtures)
    Agent,
    agent_binary_fixture,
    agent_fixture,
    make_exec,
    wait_dead,
)
from pyro_mcp.guest import build
from pyro_mcp.guest.protocol import (
    MAX_OUTPUT_CHUNK,
    PROTOCOL_VERSION,
    Error,
    Hello,
    Init,
    InitOk,
    Mount,
    Output,
    Ping,
    Pong,
    Signal,
)

# --------------------------------------------------------------------- tests


def test_hello(agent: Agent) -> None:
    rid, hello = agent.hello
    assert rid == 0
    assert isinstance(hello, Hello)
    assert hello.protocol_version == PROTOCOL_VERSION
    assert hello.agent_version == build.agent_version()


def test_echo_stdout_stderr_and_exit_code(agent: Agent) -> None:
    r = agent.run(("sh", "-c", "echo out; echo err >&2; exit 7"))
    assert r.stdout == b"out\n"
    assert r.stderr == b"err\n"
    assert r.exit.exit_code == 7
    assert r.exit.signal == 0
    assert not r.exit.timed_out
    assert not r.exit.stdout_truncated and not r.exit.stderr_truncated
    assert r.exit.duration_ms < 5000


def test_cwd_and_exact_environment(agent: Agent, tmp_path: Path) -> None:
    env = ("PATH=/usr/bin:/bin", "FOO=bar baz", "EMPTY=")
    r = agent.run(("env",), cwd=str(tmp_path), env=env)
    assert sorted(r.stdout.decode().splitlines()) == sorted(env)
    r = agent.run(("pwd",), cwd=str(tmp_path))
    assert r.stdout.decode().strip() == str(tmp_path)


def test_path_from_given_env_is_used(agent: Agent, tmp_path: Path) -> None:
    tool = tmp_path / "mytool"
    tool.write_text("#!/bin/sh\necho from-mytool\n")
    tool.chmod(0o755)
    r = agent.run(("mytool",), env=(f"PATH={tmp_path}:/usr/bin:/bin",))
    assert r.stdout == b"from-mytool\n"
    assert r.exit.exit_code == 0


def test_exec_failure_127_and_126(agent: Agent, tmp_path: Path) -> None:
    r = agent.run(("pyro-no-such-command",))
    assert r.exit.exit_code == 127
    assert r.stderr == b"pyro-agent: pyro-no-such-command: No such file or directory\n"
    not_exec = tmp_path / "data.txt"
    not_exec.write_text("x")
    r = agent.run((str(not_exec),), request_id=2)
    assert r.exit.exit_code == 126
    assert b"Permission denied" in r.stderr


def test_missing_cwd_is_an_error_without_exit(agent: Agent) -> None:
    r = agent.run(("true",), cwd="/pyro-no-such-dir")
    assert r.frames == [Error(errno.ENOENT, "cwd /pyro-no-such-dir: No such file or directory")]
    agent.send(2, Ping())
    assert agent.next_frame() == (2, Pong())  # nothing else was queued for request 1


def test_timeout_kills_the_process_group(agent: Agent) -> None:
    started = time.monotonic()
    r = agent.run(("sh", "-c", "sleep 30 & echo $!; sleep 30"), timeout_ms=300)
    assert time.monotonic() - started < 5
    assert r.exit.timed_out
    assert r.exit.signal == signal.SIGKILL
    assert r.exit.exit_code == 128 + signal.SIGKILL
    assert 250 <= r.exit.duration_ms < 5000
    background = int(r.stdout.decode().split()[0])
    assert wait_dead(background), f"backgrounded sleep {background} survived the timeout"


def test_background_child_holding_pipe_does_not_hang(agent: Agent) -> None:
    started = time.monotonic()
    r = agent.run(("sh", "-c", "sleep 30 & echo $!"))
    elapsed = time.monotonic() - started
    assert r.exit.exit_code == 0
    assert not r.exit.timed_out
    assert elapsed < 3, elapsed
    background = int(r.stdout.decode().split()[0])
    os.kill(background, signal.SIGKILL)


def test_output_cap_and_truncation(agent: Agent) -> None:
    r = agent.run(
        ("sh", "-c", "head -c 100000 /dev/zero; echo e >&2"), stdout_cap=1000, stderr_cap=100
    )
    assert r.stdout == b"\0" * 1000
    assert r.stderr == b"e\n"
    assert r.exit.stdout_truncated
    assert not r.exit.stderr_truncated
    assert r.exit.exit_code == 0

    r = agent.run(("head", "-c", "200000", "/dev/zero"), request_id=2, stdout_cap=0)
    assert r.stdout == b""
    assert r.exit.stdout_truncated


def test_large_output_is_chunked(agent: Agent) -> None:
    r = agent.run(("head", "-c", "300000", "/dev/zero"))
    assert r.stdout == b"\0" * 300_000
    assert not r.exit.stdout_truncated
    chunks = [f for f in r.frames if isinstance(f, Output)]
    assert len(chunks) >= 10
    assert all(len(c.data) <= MAX_OUTPUT_CHUNK for c in chunks)


def test_exit_by_signal(agent: Agent) -> None:
    r = agent.run(("sh", "-c", "kill -TERM $$"))
    assert r.exit.signal == signal.SIGTERM
    assert r.exit.exit_code == 128 + signal.SIGTERM
    assert not r.exit.timed_out


def test_two_concurrent_execs(agent: Agent) -> None:
    agent.send(1, make_exec(("sh", "-c", "sleep 0.5; echo slow")))
    agent.send(2, make_exec(("echo", "fast")))
    fast = agent.collect(2)
    assert fast.stdout == b"fast\n"
    slow = agent.collect(1)
    assert slow.stdout == b"slow\n"
    assert slow.exit.exit_code == 0
    assert slow.exit.duration_ms >= 400


def test_signal_running_exec(agent: Agent) -> None:
    agent.send(5, make_exec(("sleep", "30")))
    time.sleep(0.1)
    agent.send(5, Signal(signal.SIGTERM))
    r = agent.collect(5)
    assert r.exit.signal == signal.SIGTERM
    assert r.exit.exit_code == 143
    assert not r.exit.timed_out


def test_signal_unknown_request_is_an_error(agent: Agent) -> None:
    agent.send(77, Signal(signal.SIGTERM))
    rid, msg = agent.next_frame()
    assert rid == 77
    assert isinstance(msg, Error) and msg.errno_code == errno.ESRCH


def test_ping(agent: Agent) -> None:
    agent.send(123456, Ping())
    assert agent.next_frame() == (123456, Pong())


def test_exec_reusing_a_running_id_is_rejected(agent: Agent) -> None:
    agent.send(9, make_exec(("sh", "-c", "sleep 0.3; echo first")))
    agent.send(9, make_exec(("echo", "second")))
    rid, msg = agent.next_frame()
    assert rid == 9
    assert isinstance(msg, Error) and msg.errno_code == errno.EEXIST
    r = agent.collect(9)
    assert r.stdout == b"first\n"


def test_exec_limit(agent: Agent) -> None:
    for rid in range(1, 65):
        agent.send(rid, make_exec(("sleep", "30")))
    agent.send(65, make_exec(("true",)))
    rid, msg = agent.next_frame()
    assert rid == 65
    assert isinstance(msg, Error) and msg.errno_code == errno.EAGAIN
    # closing stdin ends the agent, which kills every running exec
    assert agent.close() == 0


def test_stdin_eof_kills_running_execs_and_exits(agent: Agent) -> None:
    agent.send(1, make_exec(("sh", "-c", "echo $$; exec sleep 30")))
    rid, msg = agent.next_frame()
    assert rid == 1 and isinstance(msg, Output)
    pid = int(msg.data.decode())
    assert agent.close() == 0
    assert wait_dead(pid)


def test_unknown_type_and_malformed_payload_get_eproto(agent: Agent) -> None:
    agent.send_raw(struct.pack(">2sBBII", b"PY", 1, 99, 4, 0))
    assert agent.next_frame() == (4, Error(errno.EPROTO, "unknown message type 99"))
    agent.send_raw(struct.pack(">2sBBII", b"PY", 1, 17, 5, 3) + b"abc")
    rid, msg = agent.next_frame()
    assert rid == 5 and isinstance(msg, Error) and msg.errno_code == errno.EPROTO
    agent.send_raw(struct.pack(">2sBBII", b"PY", 1, 19, 6, 1) + b"x")
    rid, msg = agent.next_frame()
    assert rid == 6 and isinstance(msg, Error) and msg.errno_code == errno.EPROTO


def test_bad_header_is_logged_and_discarded(agent: Agent) -> None:
    agent.send_raw(b"XX\x01\x13\x00\x00\x00\x01\x00\x00\x00\x00")
    deadline = time.monotonic() + 5
    while b"bad frame header" not in agent.stderr_path.read_bytes():
        assert time.monotonic() < deadline, "agent did not log the bad header"
        time.sleep(0.02)
    agent.send(2, Ping())
    assert agent.next_frame() == (2, Pong())


def test_oversize_frame_is_discarded(agent: Agent) -> None:
    agent.send_raw(struct.pack(">2sBBII", b"PY", 1, 17, 1, 262145))
    deadline = time.monotonic() + 5
    while b"bad frame header" not in agent.stderr_path.read_bytes():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    agent.send(2, Ping())
    assert agent.next_frame() == (2, Pong())


def test_init_in_stdio_mode(agent: Agent, tmp_path: Path) -> None:
    # In --stdio mode INIT leaves the clock alone (the machine is not the agent's).
    agent.send(1, Init(0, os.urandom(32)))
    assert agent.next_frame() == (1, InitOk())
    target = tmp_path / "a" / "b"
    agent.send(2, Init(time.time_ns(), b"", (Mount("none", str(target), "pyro-no-such-fs"),)))
    rid, msg = agent.next_frame()
    assert rid == 2 and isinstance(msg, Error)
    assert msg.message.startswith(f"mount none on {target} (pyro-no-such-fs): ")
    assert target.is_dir()  # mkdir -p happened before the mount


# ------------------------------------------------------------ build artifacts


def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes, tuple[int, int]]]:
    """name -> (mode, contents, (rdevmajor, rdevminor)) of a cpio "newc" archive."""
    entries: dict[str, tuple[int, bytes, tuple[int, int]]] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = (
            fields[1],
            fields[6],
            fields[9],
            fields[10],
            fields[11],
        )
        name_end = pos + 110 + namesize
        name = data[pos + 110 : name_end - 1].decode()
        start = name_end + (-name_end % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, data[start : start + filesize], (rmaj, rmin))
        pos = start + filesize + (-(start + filesize) % 4)


def test_initramfs_layout_and_determinism(
    agent_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gzip

    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path / "cache"))
    mods = []
    for name in ("virtio_ring", "virtio_blk"):
        mod = tmp_path / f"{name}.ko"
        mod.write_bytes(f"fake {name}".encode())
        mods.append(mod)
    first = build.ensure_initramfs(mods)
    assert first.parent == tmp_path / "cache" / "initramfs"
    raw = first.read_bytes()
    if build.INITRAMFS_COMPRESSED:
        assert first.name.endswith(".cpio.gz")
        raw = gzip.decompress(raw)
    entries = _read_cpio(raw)
    assert entries["init"][0] == 0o100755
    assert entries["init"][1] == agent_binary.read_bytes()
    assert entries["modules.list"][1] == b"virtio_ring.ko\nvirtio_blk.ko\n"
    assert entries["modules/virtio_blk.ko"][1] == b"fake virtio_blk"
    assert entries["dev/console"][0] == 0o020600
    assert entries["dev/console"][2] == (5, 1)
    for d in ("dev", "proc", "sys", "newroot", "modules"):
        assert entries[d][0] == 0o040755

    # same inputs: same cached file; rebuilt from scratch: identical bytes
    assert build.ensure_initramfs(mods) == first
    before = first.read_bytes()
    first.unlink()
    assert build.ensure_initramfs(mods).read_bytes() == before
    # module order is part of the key
    assert build.ensure_initramfs(mods[::-1]) != first


def test_agent_build_is_cached_and_atomic(
    agent_binary: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import concurrent.futures

    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path / "cache"))
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: build.ensure_agent_binary(), range(3)))
    assert len(set(paths)) == 1
    path = paths[0]
    assert path == tmp_path / "cache" / "agent" / build.agent_version() / "pyro-agent"
    assert os.access(path, os.X_OK)
    leftovers = [p.name for p in path.parent.iterdir() if p.name != "pyro-agent"]
    assert leftovers == []
    version = subprocess.run([str(path), "--version"], capture_output=True, text=True, check=True)
    assert build.agent_version() in version.stdout


def test_missing_compiler_is_a_build_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pyro_mcp.errors import EnvironmentBuildError

    monkeypatch.setenv("PYRO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing on it
    monkeypatch.delenv("CC", raising=False)
    with pytest.raises(EnvironmentBuildError) as info:
        build.ensure_agent_binary()
    assert info.value.hint == "apt-get install gcc libc6-dev"
