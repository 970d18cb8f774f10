"""The per-VM supervisor: one small process that owns one VM.

The manager starts it detached (``python -m pyro_mcp.supervisor VM_DIR``). It
starts the VMM, waits for the guest agent's readiness signal (never a fixed
sleep), then serves clients on ``VM_DIR/ctl.sock`` with the control protocol
of :mod:`pyro_mcp.control`, so a VM outlives the ``pyro`` process that created
it and can be used from several processes. It enforces the TTL and, for
ephemeral VMs, dies with its owner; the VMM dies with it (PR_SET_PDEATHSIG),
so nothing outlives both. Closing a connection while an exec runs kills that
command.

An exec with stdin runs as the agent's EXEC2 with a stdin pipe: a relay thread
(:class:`_StdinRelay`) owns the connection's reading side and hands the client's
``stdin`` chunks on as DATA only within the agent's CREDIT, so this process holds
at most one chunk and the socket's buffer holds the client back. A command that
stops reading (or exits) early ends the relay; what the client still sends is
dropped with the connection.

An exec that asks for ``stream`` gets its output as it comes: the agent's OUTPUT
frames, cut to the caps here, go out as control ``output`` events, coalesced by
:class:`_OutputRelay` (a 50 ms / 64 KiB window, arrival order kept across both
streams); nothing of it is held once sent.

After a command's timeout (or a cancel) the agent gets :data:`HOST_GRACE_S` to
report the command's end, and more while it keeps answering PING (a guest
under heavy load is slow, not dead), up to :data:`MAX_GRACE_S`.
"""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import select
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from pyro_mcp import control as c
from pyro_mcp.errors import BootError, GuestProtocolError, InvalidInputError, PyroError
from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.channel import AgentChannel, ChannelClosed, OutboundCredit
from pyro_mcp.state import ProcessId, write_json_atomic
from pyro_mcp.vmm.base import VMPaths

HOST_GRACE_S = 10.0  # time the agent gets to report a command's end after its timeout
LIVENESS_PING_S = 2.0  # past the grace: how often the agent is asked whether it is alive
LIVENESS_ANSWER_S = 10.0  # ...and how long it may take to answer before it counts as hung
MAX_GRACE_S = 120.0  # never wait longer than this past the timeout, alive or not


def _send(conn: socket.socket, message: c.Message) -> bool:
    try:
        conn.sendall(c.encode(message))
        return True
    except OSError:
        return False


def _client_gone(conn: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


def _hung_up(conn: socket.socket) -> bool:
    """The client closed its end (seen even while unread data waits in the socket)."""
    poller = select.poll()
    poller.register(conn, select.POLLHUP | select.POLLRDHUP)
    try:
        return any(events & (select.POLLHUP | select.POLLRDHUP) for _, events in poller.poll(0))
    except OSError:
        return True


class _StdinRelay:
    """An exec's stdin: control ``stdin`` messages from the client's connection to the
    agent as DATA within its CREDIT, then EOF.

    Its thread owns the connection's reading side, so it is also what notices the
    client going away: the connection's end (before or after ``stdin_eof``) sets
    :attr:`gone`; a malformed message sets :attr:`error` as well (the exec is killed
    and the client gets that error instead of a result).
    """

    def __init__(
        self, conn: socket.socket, channel: AgentChannel, request_id: int, pending: bytes
    ) -> None:
        self._conn = conn
        self._channel = channel
        self._id = request_id
        self._buf = bytearray(pending)
        self._credit = OutboundCredit()
        self._cond = threading.Condition()
        self._done = False
        self.gone = False
        self.error: PyroError | None = None
        self._thread = threading.Thread(target=self._run, name="stdin-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def credit(self, n: int) -> None:
        """The agent's CREDIT for this exec (from the exec loop)."""
        with self._cond:
            self._credit.credit(n)
            self._cond.notify_all()

    def stop(self) -> None:
        """The exec is over: drop the rest of the stdin and end the thread."""
        with self._cond:
            self._done = True
            self._cond.notify_all()
        with contextlib.suppress(OSError):
            self._conn.shutdown(socket.SHUT_RD)  # wakes the thread's recv
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _line(self) -> bytes | None:
        while b"\n" not in self._buf:
            if len(self._buf) > c.MAX_LINE_BYTES:
                raise InvalidInputError("control stdin message too large")
            chunk = self._conn.recv(65536)
            if not chunk:
                return None
            self._buf += chunk
        end = self._buf.index(b"\n")
        line = bytes(self._buf[:end])
        del self._buf[: end + 1]
        return line

    def _run(self) -> None:
        eof_sent = False
        try:
            while (line := self._line()) is not None:
                if eof_sent:
                    raise InvalidInputError("bad control stdin message: data after stdin_eof")
                message = c.decode_stdin(line)
                if isinstance(message, c.StdinEof):
                    self._channel.send(self._id, p.Eof())
                    eof_sent = True
                    continue
                data = memoryview(message.data)
                while data:
                    with self._cond:
                        while not self._done and self._credit.available == 0:
                            # A command that does not read leaves no credit: notice a
                            # client that goes away meanwhile (its unread lines wait
                            # in the socket, so only the hang-up can tell).
                            if not self._cond.wait(0.1) and _hung_up(self._conn):
                                raise ConnectionResetError
                        if self._done:
                            return
                        n = min(len(data), self._credit.available)
                        self._credit.take(n)
                    self._channel.send(self._id, p.Data(bytes(data[:n])))
                    data = data[n:]
        except PyroError as exc:
            self.error = exc
        except OSError:
            pass
        with self._cond:
            if not self._done:
                self.gone = True


class _OutputRelay:
    """A streaming exec's output on its way to the client: the agent's OUTPUT frames,
    kept in arrival order across both streams, a chunk of the same stream as the last
    one joined to it, and sent as ``output`` events once the oldest waiting byte is
    :data:`~pyro_mcp.control.OUTPUT_FLUSH_S` old or :data:`~pyro_mcp.control.MAX_OUTPUT_CHUNK`
    bytes wait (so a flood is a few large events and a trickle is not held back).

    Sending blocks while the client does not read: the exec waits with it (the
    agent's own caps bound what an honest agent sends meanwhile)."""

    def __init__(self, conn: socket.socket) -> None:
        self._conn = conn
        self._pending: list[tuple[int, bytearray]] = []
        self._size = 0
        self._since = 0.0

    def add(self, stream: int, data: bytes, now: float) -> None:
        if not data:
            return
        if not self._pending:
            self._since = now
        if self._pending and self._pending[-1][0] == stream:
            self._pending[-1][1].extend(data)
        else:
            self._pending.append((stream, bytearray(data)))
        self._size += len(data)
        if self._size >= c.MAX_OUTPUT_CHUNK:
            self.flush()

    @property
    def waiting(self) -> bool:
        return bool(self._pending)

    def due(self, now: float) -> bool:
        return bool(self._pending) and now - self._since >= c.OUTPUT_FLUSH_S

    def flush(self) -> None:
        for stream, data in self._pending:
            for i in range(0, len(data), c.MAX_OUTPUT_CHUNK):
                _send(self._conn, c.Output(stream, bytes(data[i : i + c.MAX_OUTPUT_CHUNK])))
        self._pending.clear()
        self._size = 0


class _Grace:
    """When to give up on a command whose timeout (or cancel) has passed.

    Before ``start + timeout + HOST_GRACE_S`` nothing happens. After it, the agent is
    pinged every :data:`LIVENESS_PING_S`; while it answers within
    :data:`LIVENESS_ANSWER_S` the wait goes on, up to :data:`MAX_GRACE_S` past the
    moment the command should have ended.
    """

    def __init__(self, channel: AgentChannel, end: float | None) -> None:
        self.channel = channel
        self.end = end  # when the command should be over (monotonic), None: no timeout
        self._ping: tuple[int, queue.Queue[p.Message | ChannelClosed], float] | None = None
        self._last_answer = 0.0

    def restart(self, end: float) -> None:
        """The command was cancelled at ``end``: the grace counts from there."""
        self.end = end if self.end is None else min(self.end, end)

    def check(self, now: float) -> None:
        """Raise GuestProtocolError once the agent counts as hung or the bound is hit."""
        if self.end is None or now < self.end + HOST_GRACE_S:
            return
        if now > self.end + MAX_GRACE_S:
            self.close()
            raise GuestProtocolError(
                f"the guest agent did not finish the command {MAX_GRACE_S:.0f} s after its timeout",
                hint="the VM is overloaded or broken; delete it",
            )
        if self._ping is not None:
            request_id, answers, sent = self._ping
            try:
                answers.get_nowait()
                answered = True
            except queue.Empty:
                answered = False
            if answered:
                self.channel.close_request(request_id)
                self._ping = None
                self._last_answer = now
            elif now - sent > LIVENESS_ANSWER_S:
                self.close()
                raise GuestProtocolError(
                    "the guest agent stopped answering after the command's timeout",
                    hint="the VM is overloaded or broken; delete it",
                )
        if self._ping is None and now - self._last_answer >= LIVENESS_PING_S:
            request_id, answers = self.channel.open()
            self.channel.send(request_id, p.Ping())
            self._ping = (request_id, answers, now)

    def close(self) -> None:
        if self._ping is not None:
            self.channel.close_request(self._ping[0])
            self._ping = None


class Supervisor:
    def __init__(self, vm_dir: Path) -> None:
        self.vm_dir = vm_dir
        self.paths = VMPaths(vm_dir)
        self.launch = c.Launch.read(vm_dir / "launch.json")
        self.ctl_path = vm_dir / "ctl.sock"
        self.stop_event = threading.Event()
        self._stop_lock = threading.Lock()
        self.stop_reason = "stopped"
        self._wake_r, self._wake_w = os.pipe()
        self.channel: AgentChannel | None = None

    # -- boot ---------------------------------------------------------------
    def boot(self) -> c.Ready:
        from pyro_mcp.vmm import get_backend

        launch = self.launch
        restore = launch.snapshot()
        backend = get_backend(launch.backend)
        started = time.monotonic()
        boot_timeout = launch.boot_timeout
        self.handle = backend.start(
            launch.spec(), self.paths, restore=restore, timeout=boot_timeout
        )
        try:
            self.channel = AgentChannel(self.handle)
            remaining = boot_timeout - (time.monotonic() - started)
            if restore is None:
                self.channel.wait_hello(timeout=max(1.0, remaining))
            mounts = tuple(p.Mount(m.source, m.target, m.fstype, m.readonly) for m in launch.mounts)
            reply = self.channel.call(
                p.Init(time.time_ns(), secrets.token_bytes(256), mounts),
                timeout=max(1.0, boot_timeout - (time.monotonic() - started)),
            )
            if isinstance(reply, p.Error):
                raise BootError(f"guest initialisation failed: {reply.message}")
        except PyroError as exc:
            exc.details.setdefault("console_tail", self.handle.console_tail())
            self.handle.kill()
            raise
        except BaseException:
            self.handle.kill()
            raise
        return c.Ready(
            boot="restored" if restore else "cold",
            boot_ms=int((time.monotonic() - started) * 1000),
            supervisor=ProcessId.of(os.getpid()),
            vmm=ProcessId.of(self.handle.pid),
        )

    def request_stop(self, reason: str) -> None:
        """Stop serving; the first reason given wins (a VMM that exits because a
        shutdown request killed it must not turn "deleted" into "vmm_exited")."""
        with self._stop_lock:
            if self.stop_event.is_set():
                return
            self.stop_reason = reason
            self.stop_event.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _vmm_exits_within(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while self.handle.poll() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    # -- serving ------------------------------------------------------------
    def listen(self) -> socket.socket:
        """Bind and listen before readiness is announced, so no client is refused."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.ctl_path.unlink()
        listener.bind(str(self.ctl_path))
        listener.listen(128)
        listener.setblocking(False)
        return listener

    def serve(self, listener: socket.socket) -> None:
        expires_at = self.launch.expires_at
        owner = self.launch.owner
        try:
            while not self.stop_event.is_set():
                readable, _, _ = select.select([listener.fileno(), self._wake_r], [], [], 0.2)
                if listener.fileno() in readable:
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        conn, _ = listener.accept()
                        conn.setblocking(True)
                        threading.Thread(target=self._client, args=(conn,), daemon=True).start()
                if self.handle.poll() is not None:
                    self.request_stop("vmm_exited")
                elif self.channel is not None and self.channel.closed_reason is not None:
                    # A dying VMM closes the channel a moment before it can be reaped:
                    # say which of the two happened.
                    self.request_stop(
                        "vmm_exited" if self._vmm_exits_within(0.5) else "agent_channel_closed"
                    )
                elif expires_at and time.time() >= expires_at:
                    self.request_stop("ttl_expired")
                elif owner is not None and not owner.alive():
                    self.request_stop("owner_exited")
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.ctl_path.unlink()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                buf = b""
                while b"\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > c.MAX_LINE_BYTES:
                        raise InvalidInputError("control request too large")
                conn.settimeout(None)
                line, _, pending = buf.partition(b"\n")
                request = c.decode_request(line)
                if isinstance(request, c.PingRequest):
                    _send(conn, c.Ok())
                elif isinstance(request, c.ShutdownRequest):
                    # The reason first (it decides what is left in the folder), then
                    # kill the VMM before answering: once the caller hears back, the
                    # guest is gone; this process exits right after.
                    self.request_stop(request.reason or "stopped")
                    self.handle.kill()
                    _send(conn, c.Ok())
                elif isinstance(request, c.TunnelRequest):
                    self._tunnel(conn, pending)
                else:
                    self._exec(conn, request, pending)
            except PyroError as exc:
                _send(conn, c.Failed(exc))
            except OSError:
                pass

    def _exec(self, conn: socket.socket, request: c.ExecRequest, pending: bytes) -> None:
        """Run the request's command; ``pending`` is what the client sent after the
        request line (the start of its stdin)."""
        assert self.channel is not None
        message: p.Exec | p.Exec2
        if request.stdin:
            message = p.Exec2(
                argv=request.argv,
                cwd=request.cwd,
                env=request.env,
                timeout_ms=request.timeout_ms,
                stdout_cap=request.stdout_cap,
                stderr_cap=request.stderr_cap,
                stdin=True,
            )
        else:
            message = p.Exec(
                argv=request.argv,
                cwd=request.cwd,
                env=request.env,
                timeout_ms=request.timeout_ms,
                stdout_cap=request.stdout_cap,
                stderr_cap=request.stderr_cap,
            )
        request_id, q = self.channel.open()
        relay = _StdinRelay(conn, self.channel, request_id, pending) if request.stdin else None
        # The caps are enforced here too: a compromised agent must not grow this process.
        streams = {p.STDOUT: bytearray(), p.STDERR: bytearray()}
        caps = {p.STDOUT: message.stdout_cap, p.STDERR: message.stderr_cap}
        cut = {p.STDOUT: False, p.STDERR: False}
        started = time.monotonic()
        grace = _Grace(
            self.channel, started + message.timeout_ms / 1000 if message.timeout_ms else None
        )
        last_beat = last_check = started
        cancelled = False
        out = _OutputRelay(conn) if request.stream else None
        try:
            self.channel.send(request_id, message)
            if relay is not None:
                relay.start()
            while True:
                wait = c.OUTPUT_FLUSH_S / 2 if out is not None and out.waiting else 0.1
                try:
                    item = q.get(timeout=wait)
                except queue.Empty:
                    item = None
                now = time.monotonic()
                if out is not None and out.due(now):
                    out.flush()
                # Checked also while frames keep coming, so a flood cannot outlast them.
                if item is None or now - last_check >= 0.1:
                    last_check = now
                    gone = relay.gone if relay is not None else _client_gone(conn)
                    if not cancelled and gone:
                        cancelled = True
                        self.channel.send(request_id, p.Signal(signal.SIGKILL))
                        grace.restart(now)
                    grace.check(now)
                    if now - last_beat >= 1.0 and not cancelled:
                        last_beat = now
                        _send(conn, c.Heartbeat(int((now - started) * 1000)))
                if item is None:
                    continue
                if isinstance(item, p.Output):
                    buf = streams[item.stream]
                    room = max(0, caps[item.stream] - len(buf))
                    if len(item.data) > room:
                        cut[item.stream] = True
                    kept = item.data[:room]
                    if out is not None:
                        # Streamed: nothing is kept here, the room left still counts.
                        caps[item.stream] -= len(kept)
                        out.add(item.stream, kept, now)
                    else:
                        buf.extend(kept)
                elif isinstance(item, p.Credit):
                    if relay is not None:
                        relay.credit(item.bytes)
                elif isinstance(item, p.Exit):
                    if relay is not None and relay.error is not None:
                        raise relay.error
                    if out is not None:
                        out.flush()
                    _send(
                        conn,
                        c.ExecDone(
                            exit_code=item.exit_code,
                            signal=item.signal,
                            timed_out=item.timed_out,
                            stdout_truncated=item.stdout_truncated or cut[p.STDOUT],
                            stderr_truncated=item.stderr_truncated or cut[p.STDERR],
                            duration_ms=item.duration_ms,
                            stdout=bytes(streams[p.STDOUT]),
                            stderr=bytes(streams[p.STDERR]),
                        ),
                    )
                    return
                elif isinstance(item, p.Error):
                    raise InvalidInputError(item.message)
                elif isinstance(item, ChannelClosed):
                    # A backend that knows why its VMM ended (gVisor: a memory-limit kill)
                    # says so instead of the bare "channel closed".
                    explain = getattr(self.handle, "exit_reason", None)
                    why = explain() if callable(explain) else None
                    if why:
                        raise GuestProtocolError(why[0], hint=why[1])
                    raise GuestProtocolError(item.reason)
        finally:
            if relay is not None:
                relay.stop()
            grace.close()
            self.channel.close_request(request_id)

    def _tunnel(self, conn: socket.socket, first: bytes) -> None:
        from pyro_mcp.guest.relay import Relay

        assert self.channel is not None
        if _send(conn, c.Ok()):
            Relay(self.channel, conn).run(first)

    # -- teardown -----------------------------------------------------------
    def shutdown(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.kill()
        if self.stop_reason == "deleted":
            return  # the manager removes the folder; write nothing into it
        ephemeral_reasons = {"ttl_expired", "owner_exited"}
        if self.stop_reason in ephemeral_reasons:
            # Nobody may be around to clean up: reap our own folder and the manager's
            # lock file beside it (``.<vm_id>.lock``).
            shutil.rmtree(self.vm_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.vm_dir.parent / f".{self.vm_dir.name}.lock").unlink(missing_ok=True)
            return
        with contextlib.suppress(OSError):
            write_json_atomic(
                self.vm_dir / "exit.json",
                {"reason": self.stop_reason, "at": time.time()},
            )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    vm_dir = Path(args[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the creator's terminal is not ours
    ready_out = os.fdopen(os.dup(1), "wb")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    sup: Supervisor | None = None
    try:
        sup = Supervisor(vm_dir)
        signal.signal(signal.SIGTERM, lambda *_: sup.request_stop("terminated") if sup else None)
        ready = sup.boot()
    except Exception as exc:
        error = exc if isinstance(exc, PyroError) else BootError(f"VM start failed: {exc!r}")
        with contextlib.suppress(OSError):
            ready_out.write(c.encode(c.Failed(error)))
            ready_out.close()
        if sup is not None and not isinstance(exc, PyroError):
            sup.shutdown()
        return 1
    try:
        serve_thread = threading.Thread(target=sup.serve, args=(sup.listen(),), daemon=True)
        serve_thread.start()
        try:
            ready_out.write(c.encode(ready))
            ready_out.close()
        except OSError:
            # The creator died before learning the VM is ready; an ephemeral VM is
            # reaped now rather than at the next pyro invocation.
            sup.request_stop("owner_exited" if sup.launch.owner else "creator_exited")
        while serve_thread.is_alive():
            serve_thread.join(0.5)
    finally:
        sup.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
