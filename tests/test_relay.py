"""The supervisor's tunnel relay (:mod:`pyro_mcp.guest.relay`) between a manager's
AgentChannel and the real agent in ``--stdio`` mode (no VM): file operations pass,
anything else ends the tunnel, and a manager that goes away mid-stream leaves the
agent free for the next client."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_driver import ChannelAgent, agent_binary_fixture  # noqa: F401 (fixture)
from pyro_mcp.guest.channel import AgentChannel, SocketIO
from pyro_mcp.guest.protocol import (
    Error,
    Exec,
    FileKind,
    ListDir,
    ListEnd,
    ReadEnd,
    ReadFile,
    WriteEnd,
    WriteFile,
    encode,
)
from pyro_mcp.guest.relay import Relay

T = 10.0


class Supervised(ChannelAgent):
    """The agent behind the supervisor's channel; :meth:`tunnel` opens a relayed one."""

    def __init__(self, binary: Path, tmp_path: Path) -> None:
        super().__init__(binary, tmp_path / "agent.stderr")
        self.relays: list[threading.Thread] = []

    def raw_tunnel(self) -> socket.socket:
        ours, theirs = socket.socketpair()
        relay = threading.Thread(target=Relay(self.channel, theirs).run, daemon=True)
        relay.start()
        self.relays.append(relay)
        return ours

    def tunnel(self) -> tuple[AgentChannel, socket.socket]:
        ours = self.raw_tunnel()
        return AgentChannel(SocketIO(ours)), ours


@pytest.fixture
def sup(agent_binary: Path, tmp_path: Path) -> Iterator[Supervised]:
    s = Supervised(agent_binary, tmp_path)
    try:
        yield s
    finally:
        s.close()


def test_file_operations_pass_through(sup: Supervised, tmp_path: Path) -> None:
    channel, sock = sup.tunnel()
    data = os.urandom(3 << 20)  # several windows and credits
    target = tmp_path / "sub" / "f.bin"
    end = channel.write_file(WriteFile(bytes(target), make_parents=True), [data], T)
    assert isinstance(end, WriteEnd) and end.bytes_written == len(data)
    out = bytearray()
    read = channel.read_file(ReadFile(bytes(target)), out.extend, T)
    assert isinstance(read, ReadEnd) and bytes(out) == data
    stat = channel.stat(bytes(target), T)
    assert not isinstance(stat, Error) and stat.kind == FileKind.FILE
    entries, last = channel.list_dir(ListDir(bytes(tmp_path), recursive=True), T)
    assert isinstance(last, ListEnd)
    assert {e.name for e in entries} >= {b"sub", b"sub/f.bin"}
    missing = channel.stat(bytes(tmp_path / "nope"), T)
    assert isinstance(missing, Error)
    sock.close()


def test_two_tunnels_at_once_do_not_mix(sup: Supervised, tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"A" * 200_000)
    (tmp_path / "b").write_bytes(b"B" * 300_000)
    first, s1 = sup.tunnel()
    second, s2 = sup.tunnel()
    results: dict[str, bytes] = {}

    def read(name: str, channel: AgentChannel) -> None:
        out = bytearray()
        assert isinstance(
            channel.read_file(ReadFile(bytes(tmp_path / name)), out.extend, T), ReadEnd
        )
        results[name] = bytes(out)

    threads = [
        threading.Thread(target=read, args=("a", first)),
        threading.Thread(target=read, args=("b", second)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == {"a": b"A" * 200_000, "b": b"B" * 300_000}
    s1.close()
    s2.close()


def test_a_command_is_not_relayed(sup: Supervised) -> None:
    """EXEC through a tunnel ends it: commands keep exec's timeout and cancellation."""
    sock = sup.raw_tunnel()
    sock.sendall(encode(1, Exec(argv=("true",), cwd="/", env=(), timeout_ms=1000,
                                stdout_cap=10, stderr_cap=10)))  # fmt: skip
    sock.settimeout(T)
    assert sock.recv(100) == b""  # closed, nothing run
    sup.relays[-1].join(T)
    assert not sup.relays[-1].is_alive()
    # the agent still serves the supervisor's own channel
    assert not isinstance(sup.channel.stat(b"/", T), Error)


def test_garbage_ends_the_tunnel_only(sup: Supervised) -> None:
    sock = sup.raw_tunnel()
    sock.sendall(b"\xff" * 64)
    sock.settimeout(T)
    assert sock.recv(100) == b""
    assert not isinstance(sup.channel.stat(b"/", T), Error)


def test_a_manager_gone_mid_read_frees_the_agent(sup: Supervised, tmp_path: Path) -> None:
    """The reader stops granting and disconnects: the relay CANCELs the read, so the
    agent's next requests (from anyone) are served."""
    big = tmp_path / "big"
    big.write_bytes(os.urandom(8 << 20))
    sock = sup.raw_tunnel()
    sock.sendall(encode(7, ReadFile(bytes(big), window=65536)))
    sock.settimeout(T)
    assert sock.recv(1024)  # data started
    sock.close()
    sup.relays[-1].join(T)
    channel, s2 = sup.tunnel()
    out = bytearray()
    small = tmp_path / "small"
    small.write_bytes(b"ok")
    assert isinstance(channel.read_file(ReadFile(bytes(small)), out.extend, T), ReadEnd)
    assert bytes(out) == b"ok"
    s2.close()
