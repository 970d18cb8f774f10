"""Host side of the agent channel: one reader thread, requests multiplexed by id."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from typing import Protocol

from pyro_mcp.errors import BootError, GuestProtocolError
from pyro_mcp.guest.protocol import (
    GUEST_TO_HOST,
    PROTOCOL_VERSION,
    FrameDecoder,
    Hello,
    Message,
    encode,
)


class ByteChannel(Protocol):
    def read(self, size: int) -> bytes: ...
    def write(self, data: bytes) -> None: ...


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
