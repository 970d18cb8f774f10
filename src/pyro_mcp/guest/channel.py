"""Host side of the agent channel: one reader thread, requests multiplexed by id.

Besides the request plumbing (``open``/``send``/``call``), the protocol version 2
streams have helpers here that keep the flow-control rules of docs/protocol.md:
:class:`InboundCredit` (a guest→host stream must stay within what was granted),
:class:`OutboundCredit` (send only what the agent offered), and the file helpers
:meth:`AgentChannel.read_file`, :meth:`~AgentChannel.write_file`,
:meth:`~AgentChannel.list_dir` and :meth:`~AgentChannel.stat`. They return the
agent's ``Error`` as a value (its errno says what went wrong in the guest) and raise
:class:`GuestProtocolError` when the guest breaks the protocol or goes quiet. A stream
the host leaves early (its sink or chunk source raised, the agent went quiet) is
CANCELled and its final frame awaited briefly, so the agent drops a half-written
temporary file and frees its file-operation slot before the exception reaches the caller.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import queue
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from pyro_mcp.errors import BootError, GuestProtocolError
from pyro_mcp.guest.protocol import (
    DEFAULT_WINDOW,
    GUEST_TO_HOST,
    MAX_DATA_CHUNK,
    PROTOCOL_VERSION,
    Cancel,
    Credit,
    Data,
    DirEntry,
    Entries,
    Eof,
    Error,
    FileStat,
    FrameDecoder,
    Grant,
    Hello,
    ListDir,
    ListEnd,
    Message,
    ReadData,
    ReadEnd,
    ReadFile,
    Stat,
    StatResult,
    WriteEnd,
    WriteFile,
    encode,
)


class ByteChannel(Protocol):
    def read(self, size: int) -> bytes: ...
    def write(self, data: bytes) -> None: ...


class SocketIO:
    """A connected stream socket as a :class:`ByteChannel` (a supervisor's tunnel)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        try:
            return self.sock.recv(size)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        self.sock.sendall(data)


class PipeIO:
    """A child process's stdin and stdout as a :class:`ByteChannel` (the agent in
    ``--stdio`` mode)."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._in = proc.stdin.fileno()
        self._out = proc.stdout.fileno()

    def read(self, size: int) -> bytes:
        try:
            return os.read(self._out, size)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._in, view) :]


class ChannelClosed:
    """Delivered to every waiting request when the channel dies."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


Delivery = Message | ChannelClosed


class AgentChannel:
    def __init__(self, io: ByteChannel) -> None:
        self._io = io
        self._decoder = FrameDecoder(GUEST_TO_HOST)
        self._write_lock = threading.Lock()
        self._lock = threading.Lock()
        self._pending: dict[int, queue.Queue[Delivery]] = {}
        self._ids = itertools.count(1)
        self._hello: queue.Queue[Hello | ChannelClosed] = queue.Queue()
        self.closed_reason: str | None = None
        self._thread = threading.Thread(target=self._reader, name="agent-reader", daemon=True)
        self._thread.start()

    def _reader(self) -> None:
        reason = "the guest agent channel closed"
        hello_seen = False
        try:
            while True:
                data = self._io.read(65536)
                if not data:
                    break
                for request_id, message in self._decoder.feed(data):
                    if isinstance(message, Hello):
                        if not hello_seen:  # more HELLOs must not queue up without bound
                            hello_seen = True
                            self._hello.put(message)
                        continue
                    with self._lock:
                        target = self._pending.get(request_id)
                    if target is not None:
                        target.put(message)
        except GuestProtocolError as exc:
            reason = f"the guest agent broke the protocol: {exc}"
        except Exception as exc:  # the reader must never die silently
            reason = f"the guest agent channel failed: {exc!r}"
        self.closed_reason = reason
        closed = ChannelClosed(reason)
        self._hello.put(closed)
        with self._lock:
            for target in self._pending.values():
                target.put(closed)

    def wait_hello(self, timeout: float) -> Hello:
        try:
            item = self._hello.get(timeout=timeout)
        except queue.Empty:
            raise BootError(f"the guest agent did not start within {timeout:.0f} s") from None
        if isinstance(item, ChannelClosed):
            raise BootError(f"the guest stopped before its agent started: {item.reason}")
        if item.protocol_version != PROTOCOL_VERSION:
            raise GuestProtocolError(
                f"the guest agent speaks protocol {item.protocol_version}, "
                f"this host speaks {PROTOCOL_VERSION}: the initramfs or agent binary is stale",
                hint="remove the agent, initramfs and snapshots folders in the pyro cache "
                "(they are rebuilt from this version's agent.c on the next run)",
            )
        return item

    def open(self) -> tuple[int, queue.Queue[Delivery]]:
        q: queue.Queue[Delivery] = queue.Queue()
        with self._lock:
            request_id = next(self._ids)
            self._pending[request_id] = q
            if self.closed_reason is not None:
                q.put(ChannelClosed(self.closed_reason))
        return request_id, q

    def close_request(self, request_id: int) -> None:
        with self._lock:
            self._pending.pop(request_id, None)

    def send(self, request_id: int, message: Message) -> None:
        data = encode(request_id, message)
        with self._write_lock:
            self._io.write(data)

    def call(self, message: Message, timeout: float) -> Message:
        """Send one request and wait for its single reply."""
        request_id, q = self.open()
        try:
            self.send(request_id, message)
            deadline = time.monotonic() + timeout
            try:
                reply = q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise GuestProtocolError(
                    f"the guest agent did not answer {type(message).__name__} in {timeout:.0f} s"
                ) from None
            if isinstance(reply, ChannelClosed):
                raise GuestProtocolError(reply.reason)
            return reply
        finally:
            self.close_request(request_id)

    # ------------------------------------------------------- version 2 streams

    def _next(self, q: queue.Queue[Delivery], timeout: float, what: str) -> Message:
        try:
            item = q.get(timeout=timeout)
        except queue.Empty:
            raise GuestProtocolError(f"the guest agent went quiet during {what}") from None
        if isinstance(item, ChannelClosed):
            raise GuestProtocolError(item.reason)
        return item

    def read_file(
        self, request: ReadFile, sink: Callable[[bytes], None], timeout: float
    ) -> ReadEnd | Error:
        """Stream a guest file into ``sink``; ``timeout`` bounds each wait for the agent."""
        credit = InboundCredit(request.window)
        request_id, q = self.open()
        done = False
        try:
            self.send(request_id, request)
            while True:
                reply = self._next(q, timeout, "a file read")
                if isinstance(reply, ReadData):
                    credit.received(len(reply.data))
                    sink(reply.data)
                    grant = credit.grant_due()
                    if grant:
                        self.send(request_id, Grant(grant))
                elif isinstance(reply, ReadEnd | Error):
                    done = True
                    return reply
                else:
                    raise GuestProtocolError(f"unexpected {type(reply).__name__} in a file read")
        finally:
            self._abandon(request_id, q, done, timeout)

    def write_file(
        self, request: WriteFile, chunks: Iterable[bytes], timeout: float
    ) -> WriteEnd | Error:
        """Write ``chunks`` (any sizes) to a guest file, atomically, within the agent's credit."""
        credit = OutboundCredit()
        request_id, q = self.open()
        done = False
        try:
            self.send(request_id, request)
            for chunk in _split(chunks):
                while credit.available < len(chunk):
                    reply = self._next(q, timeout, "a file write")
                    if isinstance(reply, Credit):
                        credit.credit(reply.bytes)
                    elif isinstance(reply, Error):
                        done = True
                        return reply
                    else:
                        raise GuestProtocolError(
                            f"unexpected {type(reply).__name__} in a file write"
                        )
                credit.take(len(chunk))
                self.send(request_id, Data(chunk))
            self.send(request_id, Eof())
            while True:
                reply = self._next(q, timeout, "a file write")
                if isinstance(reply, WriteEnd | Error):
                    done = True
                    return reply
                if not isinstance(reply, Credit):
                    raise GuestProtocolError(f"unexpected {type(reply).__name__} in a file write")
        finally:
            self._abandon(request_id, q, done, timeout)

    def list_dir(self, request: ListDir, timeout: float) -> tuple[list[DirEntry], ListEnd | Error]:
        """All entries of a LIST (at most ``request.max_entries``) and its final frame."""
        credit = InboundCredit(request.window)
        entries: list[DirEntry] = []
        request_id, q = self.open()
        done = False
        try:
            self.send(request_id, request)
            while True:
                reply = self._next(q, timeout, "a listing")
                if isinstance(reply, Entries):
                    credit.received(len(encode(0, reply)) - 12)
                    entries.extend(reply.entries)
                    if len(entries) > request.max_entries:
                        raise GuestProtocolError("the guest listed more entries than asked for")
                    grant = credit.grant_due()
                    if grant:
                        self.send(request_id, Grant(grant))
                elif isinstance(reply, ListEnd | Error):
                    done = True
                    if isinstance(reply, ListEnd) and reply.count != len(entries):
                        raise GuestProtocolError("LIST_END.count does not match the entries")
                    return entries, reply
                else:
                    raise GuestProtocolError(f"unexpected {type(reply).__name__} in a listing")
        finally:
            self._abandon(request_id, q, done, timeout)

    def _abandon(
        self, request_id: int, q: queue.Queue[Delivery], done: bool, timeout: float
    ) -> None:
        """End a stream's request. One left before its final frame (a sink or a chunk
        source raised, the agent went quiet) is CANCELled and its final frame awaited (at
        most ``timeout``, 5 s), so the agent has dropped its temporary file and freed its
        file-operation slot by the time the caller sees the exception."""
        try:
            if not done and self.closed_reason is None:
                with contextlib.suppress(OSError, ValueError):  # the channel is going away
                    self.send(request_id, Cancel())
                    deadline = time.monotonic() + min(timeout, 5.0)
                    while (left := deadline - time.monotonic()) > 0:
                        item = q.get(timeout=left)
                        if isinstance(item, ChannelClosed | Error | ReadEnd | WriteEnd | ListEnd):
                            break
        except queue.Empty:
            pass
        finally:
            self.close_request(request_id)

    def stat(self, path: bytes, timeout: float) -> FileStat | Error:
        """``lstat`` of a guest path."""
        reply = self.call(Stat(path), timeout)
        if isinstance(reply, StatResult):
            return reply.stat
        if isinstance(reply, Error):
            return reply
        raise GuestProtocolError(f"unexpected {type(reply).__name__} answering STAT")


def _split(chunks: Iterable[bytes]) -> Iterable[bytes]:
    for chunk in chunks:
        for i in range(0, len(chunk), MAX_DATA_CHUNK):
            yield chunk[i : i + MAX_DATA_CHUNK]


class InboundCredit:
    """A guest→host stream's credit: what the host granted, and when to grant more.

    The agent may send at most ``window`` bytes beyond what the host has consumed; a
    guest that sends more breaks the protocol. More credit is due once half the
    window has been consumed (fewer, larger GRANTs).
    """

    def __init__(self, window: int = DEFAULT_WINDOW) -> None:
        self.window = window
        self.left = window
        self._consumed = 0

    def received(self, n: int) -> None:
        if n > self.left:
            raise GuestProtocolError(
                f"the guest sent {n} bytes with a credit of {self.left}: it ignores flow control"
            )
        self.left -= n
        self._consumed += n

    def grant_due(self) -> int:
        """Bytes to GRANT now (0: not yet); the caller has consumed what it received."""
        if self._consumed < max(1, self.window // 2):
            return 0
        grant, self._consumed = self._consumed, 0
        self.left += grant
        return grant


class OutboundCredit:
    """A host→guest stream's credit: the sum of the agent's CREDITs minus what was sent."""

    _LIMIT = 1 << 40  # a guest cannot make the host buffer more than it offers anyway

    def __init__(self) -> None:
        self.available = 0

    def credit(self, n: int) -> None:
        self.available += n
        if self.available > self._LIMIT:
            raise GuestProtocolError("the guest granted an absurd amount of credit")

    def take(self, n: int) -> None:
        if n > self.available:
            raise ValueError(f"{n} bytes exceed the credit of {self.available}")
        self.available -= n
