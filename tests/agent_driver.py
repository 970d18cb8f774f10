"""Drives the real guest agent binary in ``--stdio`` mode (no VM): shared by the agent tests.

Import the fixtures into a test module with
``from agent_driver import agent_binary_fixture, agent_fixture  # noqa: F401``.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.guest import build
from pyro_mcp.guest.channel import AgentChannel, PipeIO
from pyro_mcp.guest.protocol import (
    GUEST_TO_HOST,
    Error,
    Exec,
    Exit,
    FrameDecoder,
    InitOk,
    ListEnd,
    Message,
    Output,
    Pong,
    ReadEnd,
    StatResult,
    WriteEnd,
    encode,
)

ENV = ("PATH=/usr/local/bin:/usr/bin:/bin",)
# the frames that end a request (docs/protocol.md, "Every request ends with ...")
FINAL = (Exit, Error, Pong, InitOk, ReadEnd, WriteEnd, StatResult, ListEnd)


def _have_compiler() -> bool:
    names = [os.environ.get("CC"), "cc", "gcc", "clang"]
    return any(n and shutil.which(n) for n in names)


@pytest.fixture(scope="session", name="agent_binary")
def agent_binary_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent built from the shipped agent.c; ``PYRO_TEST_AGENT=PATH`` runs the tests
    against another build of it instead (e.g. one with -fsanitize=address,undefined)."""
    override = os.environ.get("PYRO_TEST_AGENT")
    if override:
        return Path(override)
    if not _have_compiler():
        pytest.skip("no C compiler installed: cannot build the guest agent")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYRO_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        return build.ensure_agent_binary()


@dataclass
class Result:
    stdout: bytes = b""
    stderr: bytes = b""
    frames: list[Message] = field(default_factory=list)

    @property
    def final(self) -> Message:
        return self.frames[-1]

    @property
    def exit(self) -> Exit:
        assert isinstance(self.final, Exit), self.frames
        return self.final


def spawn_agent(
    binary: Path, stderr_path: Path, prefix: Sequence[str] = ()
) -> subprocess.Popen[bytes]:
    """``binary --stdio`` (under ``prefix``) with pipes for its channel, stderr to a file."""
    with stderr_path.open("wb") as err:
        return subprocess.Popen(
            [*prefix, str(binary), "--stdio"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
        )


class Agent:
    """Drives one `pyro-agent --stdio` process through the protocol codec."""

    def __init__(self, binary: Path, stderr_path: Path, prefix: Sequence[str] = ()) -> None:
        """``prefix``: a wrapper command (e.g. ``unshare -n``) the agent runs under."""
        self.stderr_path = stderr_path
        self.proc = spawn_agent(binary, stderr_path, prefix)
        self.decoder = FrameDecoder(GUEST_TO_HOST)
        self.pending: list[tuple[int, Message]] = []
        self.hello = self.next_frame()

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def send(self, request_id: int, message: Message) -> None:
        self.send_raw(encode(request_id, message))

    def next_frame(self, timeout: float = 10.0) -> tuple[int, Message]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError("timed out waiting for a frame from the agent")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                data = os.read(self.proc.stdout.fileno(), 65536)
                if not data:
                    raise AssertionError("agent closed its stdout")
                self.pending += self.decoder.feed(data)
        return self.pending.pop(0)

    def collect(self, request_id: int, timeout: float = 10.0) -> Result:
        """Frames for request_id until EXIT/ERROR; frames for other ids stay queued."""
        result = Result()
        others: list[tuple[int, Message]] = []
        deadline = time.monotonic() + timeout
        while True:
            rid, msg = self.next_frame(max(0.01, deadline - time.monotonic()))
            if rid != request_id:
                others.append((rid, msg))
                continue
            result.frames.append(msg)
            if isinstance(msg, Output):
                if msg.stream == 1:
                    result.stdout += msg.data
                else:
                    result.stderr += msg.data
            elif isinstance(msg, FINAL):
                self.pending = others + self.pending
                return result

    def run(self, argv: tuple[str, ...], request_id: int = 1, **kw: Any) -> Result:
        self.send(request_id, make_exec(argv, **kw))
        return self.collect(request_id)

    def close(self) -> int:
        if self.proc.stdin and not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            return self.proc.wait(timeout=10)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stdout:
                self.proc.stdout.close()


def make_exec(
    argv: tuple[str, ...],
    *,
    cwd: str = "/",
    env: tuple[str, ...] = ENV,
    timeout_ms: int = 10_000,
    stdout_cap: int = 1 << 20,
    stderr_cap: int = 1 << 20,
) -> Exec:
    return Exec(argv, cwd, env, timeout_ms, stdout_cap, stderr_cap)


@pytest.fixture(name="agent")
def agent_fixture(agent_binary: Path, tmp_path: Path) -> Iterator[Agent]:
    a = Agent(agent_binary, tmp_path / "agent.stderr")
    try:
        yield a
    finally:
        a.close()


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_dead(pid: int, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.02)
    return False


class ChannelAgent:
    """``pyro-agent --stdio`` behind an :class:`AgentChannel` (whose reader thread
    drains the agent), for the tests of the channel's file helpers and what is built
    on them. ``channel_class`` may be a subclass that interferes on purpose."""

    def __init__(
        self, binary: Path, stderr_path: Path, channel_class: type[AgentChannel] = AgentChannel
    ) -> None:
        self.proc = spawn_agent(binary, stderr_path)
        self.channel = channel_class(PipeIO(self.proc))
        self.channel.wait_hello(10.0)

    def close(self) -> None:
        assert self.proc.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            self.proc.stdin.close()
        self.proc.wait(10)


@pytest.fixture(name="channel_agent")
def channel_agent_fixture(agent_binary: Path, tmp_path: Path) -> Iterator[ChannelAgent]:
    agent = ChannelAgent(agent_binary, tmp_path / "agent.stderr")
    try:
        yield agent
    finally:
        agent.close()


def vm_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")
