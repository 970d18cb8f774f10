"""How long the supervisor waits for a command's end past its timeout: the fixed
grace, then more while the real agent (here in --stdio mode, no VM) answers PING,
and a clear error once it stops answering."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_driver import agent_binary_fixture  # noqa: F401 (fixture)
from pyro_mcp import supervisor
from pyro_mcp.errors import GuestProtocolError
from pyro_mcp.guest.channel import AgentChannel, PipeIO


@pytest.fixture
def agent(agent_binary: Path) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [str(agent_binary), "--stdio"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a test may have stopped it
        proc.kill()
    proc.wait(timeout=10)


def _check_until(grace: supervisor._Grace, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        grace.check(time.monotonic())
        time.sleep(0.05)


def test_an_agent_that_answers_ping_keeps_getting_time(
    agent: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "LIVENESS_PING_S", 0.2)
    monkeypatch.setattr(supervisor, "LIVENESS_ANSWER_S", 2.0)
    channel = AgentChannel(PipeIO(agent))
    channel.wait_hello(timeout=10)
    # The command "should have ended" a grace period ago: from here on only PING counts.
    grace = supervisor._Grace(channel, time.monotonic() - supervisor.HOST_GRACE_S)
    _check_until(grace, 3.0)  # > LIVENESS_ANSWER_S: it would have failed without answers
    grace.close()


def test_an_agent_that_stops_answering_is_given_up_on(
    agent: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "LIVENESS_PING_S", 0.2)
    monkeypatch.setattr(supervisor, "LIVENESS_ANSWER_S", 1.0)
    channel = AgentChannel(PipeIO(agent))
    channel.wait_hello(timeout=10)
    grace = supervisor._Grace(channel, time.monotonic() - supervisor.HOST_GRACE_S)
    _check_until(grace, 0.5)  # answering: fine
    agent.send_signal(signal.SIGSTOP)  # alive but hung: PING goes unanswered
    with pytest.raises(GuestProtocolError, match="stopped answering"):
        _check_until(grace, 10.0)


def test_the_wait_is_bounded_even_for_an_agent_that_answers(
    agent: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(supervisor, "LIVENESS_PING_S", 0.2)
    monkeypatch.setattr(supervisor, "MAX_GRACE_S", supervisor.HOST_GRACE_S + 1.0)
    channel = AgentChannel(PipeIO(agent))
    channel.wait_hello(timeout=10)
    grace = supervisor._Grace(channel, time.monotonic() - supervisor.HOST_GRACE_S)
    with pytest.raises(GuestProtocolError, match="did not finish the command"):
        _check_until(grace, 10.0)


def test_no_timeout_means_no_grace_checks(agent: subprocess.Popen[bytes]) -> None:
    channel = AgentChannel(PipeIO(agent))
    channel.wait_hello(timeout=10)
    grace = supervisor._Grace(channel, None)
    grace.check(time.monotonic() + 10_000)  # nothing to give up on
