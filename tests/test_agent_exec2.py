"""EXEC2 and INIT2 (protocol version 2) against the real agent in --stdio mode (no VM).

The tests run as root (the suite's CI does): credentials are switched for real, and
the network tests run the agent in its own network and mount namespaces (``unshare``)
with a tmpfs over ``/etc``, so nothing of the host is touched.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent_driver import (  # noqa: F401 (fixtures)
    ENV,
    Agent,
    Result,
    agent_binary_fixture,
    agent_fixture,
    vm_rss_kib,
)
from pyro_mcp.guest.protocol import (
    MAX_DATA_CHUNK,
    Credit,
    Data,
    Eof,
    Error,
    Exec2,
    Exit,
    HostEntry,
    Init2,
    InitOk,
    Interface,
    NetConfig,
    Output,
    Ping,
    Pong,
    Signal,
)

STDIN_WINDOW = 256 * 1024  # the agent's stdin buffer per exec (docs/protocol.md)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching credentials needs root")


def exec2(argv: tuple[str, ...], **kw: object) -> Exec2:
    fields: dict[str, object] = {
        "cwd": "",
        "env": ENV,
        "timeout_ms": 60_000,
        "stdout_cap": 1 << 20,
        "stderr_cap": 1 << 20,
    }
    fields.update(kw)
    return Exec2(argv, **fields)  # type: ignore[arg-type]


def feed_stdin(
    agent: Agent, rid: int, data: bytes, *, watch_rss: bool = False
) -> tuple[Result, int]:
    """Send ``data`` as stdin within the agent's credit, then EOF; collect until EXIT.

    Returns the result and the agent's peak VmRSS (KiB) seen while streaming. The
    command must write little output: this driver is single-threaded.
    """
    result = Result()
    credit, pos, eof_sent, peak = 0, 0, False, 0
    while True:
        while credit and pos < len(data):
            n = min(MAX_DATA_CHUNK, credit, len(data) - pos)
            agent.send(rid, Data(data[pos : pos + n]))
            pos, credit = pos + n, credit - n
        if pos == len(data) and not eof_sent:
            agent.send(rid, Eof())
            eof_sent = True
        if watch_rss:
            peak = max(peak, vm_rss_kib(agent.proc.pid))
        got, msg = agent.next_frame(30)
        assert got == rid, (got, msg)
        result.frames.append(msg)
        if isinstance(msg, Credit):
            credit += msg.bytes
            assert credit <= STDIN_WINDOW
        elif isinstance(msg, Output):
            if msg.stream == 1:
                result.stdout += msg.data
            else:
                result.stderr += msg.data
        elif isinstance(msg, Exit | Error):
            return result, peak


def test_cwd_defaults_to_slash_then_to_init2_workdir(agent: Agent, tmp_path: Path) -> None:
    agent.send(1, exec2(("pwd",)))
    assert agent.collect(1).stdout == b"/\n"
    agent.send(2, Init2(time.time_ns(), b"", (), str(tmp_path)))
    assert agent.next_frame() == (2, InitOk())
    agent.send(3, exec2(("pwd",)))
    assert agent.collect(3).stdout == f"{tmp_path}\n".encode()
    agent.send(4, exec2(("pwd",), cwd="/tmp"))  # an explicit cwd still wins
    assert agent.collect(4).stdout == b"/tmp\n"


def test_without_stdin_the_command_reads_dev_null(agent: Agent) -> None:
    agent.send(1, exec2(("sh", "-c", "cat; readlink /proc/self/fd/0")))
    r = agent.collect(1)
    assert r.stdout == b"/dev/null\n"
    assert not any(isinstance(f, Credit) for f in r.frames)


def test_small_stdin_round_trip(agent: Agent) -> None:
    agent.send(1, exec2(("cat",), stdin=True))
    r, _ = feed_stdin(agent, 1, b"hello\x00world\n")
    assert r.stdout == b"hello\x00world\n"
    assert r.exit.exit_code == 0
    assert r.frames[0] == Credit(STDIN_WINDOW)  # the first frame offers the window


def test_empty_stdin_is_eof_at_once(agent: Agent) -> None:
    agent.send(1, exec2(("wc", "-c"), stdin=True))
    r, _ = feed_stdin(agent, 1, b"")
    assert r.stdout.strip() == b"0"


def test_50_mib_through_stdin_with_bounded_agent_memory(agent: Agent) -> None:
    data = os.urandom(1 << 20) * 50
    agent.send(1, exec2(("sha256sum",), stdin=True))
    baseline = vm_rss_kib(agent.proc.pid)
    started = time.monotonic()
    r, peak = feed_stdin(agent, 1, data, watch_rss=True)
    elapsed = time.monotonic() - started
    assert r.exit.exit_code == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    # the agent holds at most its 256 KiB window (plus its fixed frame buffers)
    assert peak - baseline < 2048, (baseline, peak)
    assert peak < 8192, peak
    print(f"50 MiB through stdin in {elapsed:.2f} s; agent VmRSS {baseline} -> {peak} KiB")


def test_a_command_that_does_not_read_stops_the_credit(agent: Agent) -> None:
    """The agent buffers at most its window; PING is answered while the buffer is full."""
    agent.send(1, exec2(("sleep", "30"), stdin=True))
    assert agent.next_frame() == (1, Credit(STDIN_WINDOW))
    for _ in range(0, STDIN_WINDOW, MAX_DATA_CHUNK):
        agent.send(1, Data(b"x" * MAX_DATA_CHUNK))
    extra = 0
    agent.send(2, Ping())
    deadline = time.monotonic() + 1.0
    pong = False
    while time.monotonic() < deadline:
        try:
            rid, msg = agent.next_frame(max(0.01, deadline - time.monotonic()))
        except AssertionError:
            break
        if (rid, msg) == (2, Pong()):
            pong = True
        elif isinstance(msg, Credit):
            extra += msg.bytes  # what the pipe itself absorbed (64 KiB here)
    assert pong
    assert extra <= 1 << 20  # never more than the pipe's capacity (pipe-max-size)
    assert extra < STDIN_WINDOW  # the rest waits in the agent's window
    agent.send(1, Signal(signal.SIGKILL))
    r = agent.collect(1)
    assert r.exit.signal == signal.SIGKILL


def test_stdin_closed_by_the_command_drops_the_rest(agent: Agent) -> None:
    agent.send(1, exec2(("head", "-c", "5"), stdin=True))
    r, _ = feed_stdin(agent, 1, b"0123456789" * 100_000)
    assert r.stdout == b"01234"
    assert r.exit.exit_code == 0


def test_credit_overrun_closes_stdin_and_is_logged(agent: Agent) -> None:
    # The command reads nothing for a while: the window plus the pipe (64 KiB) fill up,
    # and twice the window is well past any credit the agent handed out.
    agent.send(1, exec2(("sh", "-c", "sleep 1; wc -c"), stdin=True))
    for _ in range(2 * STDIN_WINDOW // MAX_DATA_CHUNK):
        agent.send(1, Data(b"y" * MAX_DATA_CHUNK))
    r = agent.collect(1)
    assert r.exit.exit_code == 0
    assert int(r.stdout) < 2 * STDIN_WINDOW
    assert b"past its credit" in agent.stderr_path.read_bytes()


def test_stream_frames_for_unknown_ids_are_dropped(agent: Agent) -> None:
    agent.send(40, Data(b"x"))
    agent.send(40, Eof())
    agent.send(41, Ping())
    assert agent.next_frame() == (41, Pong())


@needs_root
def test_uid_gid_and_groups(agent: Agent) -> None:
    agent.send(1, exec2(("sh", "-c", "id -u; id -g; id -G"), uid=65534, gid=65533, groups=(4, 27)))
    r = agent.collect(1)
    uid, gid, groups = r.stdout.decode().splitlines()
    assert (uid, gid) == ("65534", "65533")
    assert set(groups.split()) == {"65533", "4", "27"}
    # the agent's own ids (root) and no groups: credentials are left alone
    agent.send(2, exec2(("id", "-u")))
    assert agent.collect(2).stdout == b"0\n"


@pytest.fixture
def world_readable_agent(agent_binary: Path) -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="pyro-agent-"))
    try:
        folder.chmod(0o755)
        copy = folder / "pyro-agent"
        shutil.copy2(agent_binary, copy)
        copy.chmod(0o755)
        yield copy
    finally:
        shutil.rmtree(folder)


@needs_root
def test_credentials_the_agent_cannot_take_are_an_error(
    world_readable_agent: Path, tmp_path: Path
) -> None:
    nobody = Agent(
        world_readable_agent,
        tmp_path / "agent.stderr",
        prefix=("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"),
    )
    try:
        nobody.send(1, exec2(("true",), uid=0, gid=0))
        assert nobody.next_frame() == (
            1,
            Error(errno.EPERM, "credentials 0:0: Operation not permitted"),
        )
        nobody.send(2, exec2(("id", "-u"), uid=65534, gid=65534))  # its own: fine
        assert nobody.collect(2).stdout == b"65534\n"
    finally:
        nobody.close()


# ------------------------------------------------------------------ network


NETNS_PREFIX = (
    "unshare",
    "--net",
    "--mount",
    "sh",
    "-c",
    'mount -t tmpfs tmpfs /etc && exec "$@"',
    "sh",
)


@pytest.fixture
def netns_agent(agent_binary: Path, tmp_path: Path) -> Iterator[Agent]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    a = Agent(agent_binary, tmp_path / "agent.stderr", prefix=NETNS_PREFIX)
    try:
        yield a
    finally:
        a.close()


def test_init2_network_configures_interface_route_resolver_and_hosts(netns_agent: Agent) -> None:
    agent = netns_agent
    net = NetConfig(
        interfaces=(Interface("lo", "10.9.8.7", 8, "10.1.2.3", 16384),),
        nameservers=("10.0.2.3", "2001:db8::53"),
        search=("example.test", "pyro.test"),
        hosts=(HostEntry("10.0.2.2", "proxy.pyro"), HostEntry("2001:db8::2", "v6.pyro")),
    )
    agent.send(1, Init2(time.time_ns(), b"", (), "", net))
    assert agent.next_frame() == (1, InitOk())
    env = ("PATH=/usr/sbin:/usr/bin:/sbin:/bin",)
    agent.send(2, exec2(("sh", "-c", "cat /etc/resolv.conf /etc/hosts"), env=env))
    assert agent.collect(2).stdout.decode() == (
        "nameserver 10.0.2.3\n"
        "nameserver 2001:db8::53\n"
        "search example.test pyro.test\n"
        "127.0.0.1\tlocalhost\n"
        "::1\tlocalhost\n"
        "127.0.1.1\tpyro\n"
        "10.0.2.2\tproxy.pyro\n"
        "2001:db8::2\tv6.pyro\n"
    )
    agent.send(3, exec2(("ip", "-4", "-o", "addr", "show", "lo"), env=env))
    assert "inet 10.9.8.7/8" in agent.collect(3).stdout.decode()
    # (not /sys/class/net: that sysfs was mounted in the host's network namespace)
    agent.send(4, exec2(("ip", "-o", "link", "show", "lo"), env=env))
    assert " mtu 16384 " in agent.collect(4).stdout.decode()
    agent.send(5, exec2(("cat", "/proc/net/route"), env=env))
    out = agent.collect(5).stdout.decode().splitlines()
    # /proc/net/route: Iface Destination Gateway ... (hex, little-endian)
    default = [line.split() for line in out[1:] if line.split()[1] == "00000000"]
    assert default and default[0][0] == "lo" and default[0][2] == "0302010A"
    # INIT2 comes again after every restore: the same configuration again is fine
    agent.send(6, Init2(time.time_ns(), b"", (), "", net))
    assert agent.next_frame() == (6, InitOk())


def test_init2_without_network_touches_nothing(netns_agent: Agent) -> None:
    netns_agent.send(1, Init2(time.time_ns(), b"", (), "/"))
    assert netns_agent.next_frame() == (1, InitOk())
    netns_agent.send(2, exec2(("ls", "-A", "/etc")))
    assert netns_agent.collect(2).stdout == b""


def test_init2_unknown_interface_is_an_error(netns_agent: Agent) -> None:
    net = NetConfig(interfaces=(Interface("pyro-nope0", "10.0.0.1", 24),))
    netns_agent.send(1, Init2(time.time_ns(), b"", (), "", net))
    assert netns_agent.next_frame() == (
        1,
        Error(errno.ENODEV, "SIOCSIFADDR pyro-nope0: No such device"),
    )


def test_init2_at_its_limits_writes_every_hosts_line(netns_agent: Agent) -> None:
    names = [f"{i:02}" + "h" * 251 for i in range(64)]  # 64 names of 253 characters
    net = NetConfig(
        nameservers=tuple(f"10.0.0.{i}" for i in range(1, 17)),
        search=tuple("d" * 253 for _ in range(6)),
        hosts=tuple(HostEntry(f"2001:db8::{i:x}", n) for i, n in enumerate(names)),
    )
    netns_agent.send(1, Init2(time.time_ns(), b"", (), "", net))
    assert netns_agent.next_frame() == (1, InitOk())
    netns_agent.send(2, exec2(("cat", "/etc/hosts", "/etc/resolv.conf")))
    lines = netns_agent.collect(2).stdout.decode().splitlines()
    assert [line.split("\t")[1] for line in lines[3:67]] == names
    assert len([line for line in lines if line.startswith("nameserver ")]) == 16
    assert lines[-1] == "search " + " ".join("d" * 253 for _ in range(6))
