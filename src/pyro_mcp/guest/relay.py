"""The supervisor's end of a control ``tunnel``: guest file operations, relayed.

A manager that wants a VM's files (read, write, list, stat: everything in
:mod:`pyro_mcp.workspace.files`, diff and export) opens a ``tunnel`` on the
VM's control socket and runs its own :class:`~pyro_mcp.guest.channel.AgentChannel`
over it. This relay sits between that connection and the supervisor's one
channel to the agent:

* every frame the manager sends is decoded strictly (host→guest types only) and
  must be one of :data:`ALLOWED`; anything else ends the tunnel. Commands never
  go through a tunnel: ``exec`` keeps its timeout, grace and cancellation;
* each of the manager's request ids gets one of the channel's own, so a tunnel
  can neither see nor disturb another client's requests;
* the agent's answers go back under the manager's id, as they came (the
  manager's channel checks them again: sizes, credit, order);
* when the manager goes away, requests still open are CANCELled, so the agent
  frees their files.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading

from pyro_mcp.errors import GuestProtocolError
from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.channel import AgentChannel, ChannelClosed

#: What a tunnel may send: the file operations, their stream frames, and PING.
ALLOWED = (
    p.ReadFile,
    p.WriteFile,
    p.Stat,
    p.ListDir,
    p.Data,
    p.Eof,
    p.Grant,
    p.Cancel,
    p.Ping,
)
#: A request is over once the agent sends one of these for it.
FINAL = (p.Error, p.Pong, p.ReadEnd, p.WriteEnd, p.StatResult, p.ListEnd)
MAX_OPEN = 64  # requests a tunnel may have in flight


class TunnelError(Exception):
    """The manager's side broke the tunnel's rules (the connection is closed)."""


class Relay:
    def __init__(self, channel: AgentChannel, conn: socket.socket) -> None:
        self.channel = channel
        self.conn = conn
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()
        self._ids: dict[int, int] = {}  # the manager's id -> the channel's
        self._done: set[int] = set()  # the manager's ids whose request is over

    def run(self, first: bytes = b"") -> None:
        """Relay until the manager closes the connection, breaks a rule, or the
        agent channel dies."""
        decoder = p.FrameDecoder(p.HOST_TO_GUEST)
        try:
            data = first
            while True:
                for their_id, message in decoder.feed(data):
                    self._forward(their_id, message)
                data = self.conn.recv(1 << 16)
                if not data:
                    return
        except (OSError, TunnelError, GuestProtocolError):
            return
        finally:
            self._close()

    def _forward(self, their_id: int, message: p.Message) -> None:
        if not isinstance(message, ALLOWED):
            raise TunnelError(f"{type(message).__name__} is not relayed")
        with self._lock:
            ours = self._ids.get(their_id)
            if ours is None:
                if their_id in self._done:
                    return  # e.g. a GRANT that crossed the request's last frame
                if len(self._ids) >= MAX_OPEN:
                    raise TunnelError("too many requests in flight")
                ours, q = self.channel.open()
                self._ids[their_id] = ours
                threading.Thread(
                    target=self._answers, args=(their_id, ours, q), daemon=True
                ).start()
        self.channel.send(ours, message)

    def _answers(self, their_id: int, ours: int, q: queue.Queue[p.Message | ChannelClosed]) -> None:
        try:
            while True:
                item = q.get()
                if isinstance(item, ChannelClosed):
                    with contextlib.suppress(OSError):
                        self.conn.shutdown(socket.SHUT_RDWR)
                    return
                frame = p.encode(their_id, item)
                with self._send_lock:
                    self.conn.sendall(frame)
                if isinstance(item, FINAL):
                    return
        except OSError:
            return
        finally:
            self.channel.close_request(ours)
            with self._lock:
                self._ids.pop(their_id, None)
                self._done.add(their_id)

    def _close(self) -> None:
        with self._lock:
            still_open = list(self._ids.values())
        for ours in still_open:
            # ValueError: a pipe the channel writes to is already closed
            with contextlib.suppress(OSError, ValueError, GuestProtocolError):
                self.channel.send(ours, p.Cancel())
