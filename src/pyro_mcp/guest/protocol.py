"""Host-side codec of the guest agent's wire protocol (version 1).

The format is specified in ``docs/protocol.md``; the guest side is ``agent.c``.
A stream of frames, each a 12-byte header and a payload::

    magic b"PY" | version u8 | type u8 | request_id u32 | payload_len u32   (big-endian)

:func:`encode` turns a message into one frame and validates every value
(raising :class:`~pyro_mcp.errors.InvalidInputError`). :class:`FrameDecoder`
parses a byte stream incrementally. The decoder is what a compromised guest
talks to, so on any malformed input it raises
:class:`~pyro_mcp.errors.GuestProtocolError` and nothing else, and it never
buffers more than one maximum-size frame. The encoding is canonical: a frame
the decoder accepts re-encodes to exactly the same bytes.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from pyro_mcp.errors import GuestProtocolError, InvalidInputError

__all__ = [
    "GUEST_TO_HOST",
    "HEADER_LEN",
    "HOST_TO_GUEST",
    "MAGIC",
    "MAX_ENTROPY",
    "MAX_OUTPUT_CHUNK",
    "MAX_PAYLOAD",
    "PROTOCOL_VERSION",
    "STDERR",
    "STDOUT",
    "Error",
    "Exec",
    "Exit",
    "FrameDecoder",
    "Hello",
    "Init",
    "InitOk",
    "Message",
    "Mount",
    "MsgType",
    "Output",
    "Ping",
    "Pong",
    "Signal",
    "encode",
]

PROTOCOL_VERSION: int = 1
MAX_PAYLOAD: int = 262144
MAGIC = b"PY"
HEADER_LEN = 12
MAX_OUTPUT_CHUNK = 32768  # data bytes in one OUTPUT frame
MAX_ENTROPY = 4096  # entropy bytes in one INIT frame
STDOUT = 1
STDERR = 2
MAX_SIGNAL = 64

_U32_MAX = 0xFFFF_FFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_I32_MIN = -(2**31)
_I32_MAX = 2**31 - 1

_HEADER = struct.Struct(">2sBBII")


class MsgType(enum.IntEnum):
    HELLO = 1
    INIT_OK = 2
    OUTPUT = 3
    EXIT = 4
    ERROR = 5
    PONG = 6
    INIT = 16
    EXEC = 17
    SIGNAL = 18
    PING = 19


GUEST_TO_HOST: frozenset[MsgType] = frozenset(
    {MsgType.HELLO, MsgType.INIT_OK, MsgType.OUTPUT, MsgType.EXIT, MsgType.ERROR, MsgType.PONG}
)
HOST_TO_GUEST: frozenset[MsgType] = frozenset(
    {MsgType.INIT, MsgType.EXEC, MsgType.SIGNAL, MsgType.PING}
)


@dataclass(frozen=True)
class Hello:
    """Guest→host, once the agent is ready (request_id 0)."""

    protocol_version: int
    agent_version: str
    uptime_ms: int


@dataclass(frozen=True)
class InitOk:
    """Guest→host: the INIT with this request id was applied."""


@dataclass(frozen=True)
class Output:
    """Guest→host: a chunk of an exec's stdout (stream 1) or stderr (stream 2)."""

    stream: int
    data: bytes


@dataclass(frozen=True)
class Exit:
    """Guest→host: the exec finished; always the last frame for its request id."""

    exit_code: int
    signal: int
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: int


@dataclass(frozen=True)
class Error:
    """Guest→host: the request failed (for an EXEC: it never ran; no EXIT follows)."""

    errno_code: int
    message: str


@dataclass(frozen=True)
class Pong:
    """Guest→host: answer to PING."""


@dataclass(frozen=True)
class Mount:
    """One mount done by INIT (``mkdir -p target`` then mount)."""

    source: str
    target: str
    fstype: str
    readonly: bool = False


@dataclass(frozen=True)
class Init:
    """Host→guest: set the clock, seed the entropy pool, mount filesystems."""

    unix_time_ns: int
    entropy: bytes
    mounts: tuple[Mount, ...] = ()


@dataclass(frozen=True)
class Exec:
    """Host→guest: run ``argv`` in ``cwd`` with exactly ``env`` ("KEY=VALUE" items)."""

    argv: tuple[str, ...]
    cwd: str
    env: tuple[str, ...]
    timeout_ms: int
    stdout_cap: int
    stderr_cap: int


@dataclass(frozen=True)
class Signal:
    """Host→guest, with the request id of a running EXEC: signal its process group."""

    signo: int


@dataclass(frozen=True)
class Ping:
    """Host→guest: liveness check; answered by PONG with the same request id."""


Message: TypeAlias = Hello | InitOk | Output | Exit | Error | Pong | Init | Exec | Signal | Ping


# ---------------------------------------------------------------- encoding


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def _int(self, fmt: str, value: object, lo: int, hi: int, what: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InvalidInputError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
        self.parts.append(struct.pack(fmt, value))

    def u8(self, value: object, what: str) -> None:
        self._int(">B", value, 0, 0xFF, what)

    def u32(self, value: object, what: str) -> None:
        self._int(">I", value, 0, _U32_MAX, what)

    def i32(self, value: object, what: str) -> None:
        self._int(">i", value, _I32_MIN, _I32_MAX, what)

    def u64(self, value: object, what: str) -> None:
        self._int(">Q", value, 0, _U64_MAX, what)

    def flag(self, value: object, what: str) -> None:
        if not isinstance(value, bool):
            raise InvalidInputError(f"{what} must be a bool, got {value!r}")
        self.parts.append(b"\x01" if value else b"\x00")

    def bytes_(self, value: object, what: str, limit: int = MAX_PAYLOAD) -> None:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise InvalidInputError(f"{what} must be bytes, got {type(value).__name__}")
        data = bytes(value)
        if len(data) > limit:
            raise InvalidInputError(f"{what} is {len(data)} bytes; the limit is {limit}")
        self.parts.append(struct.pack(">I", len(data)))
        self.parts.append(data)

    def str_(self, value: object, what: str) -> None:
        if not isinstance(value, str):
            raise InvalidInputError(f"{what} must be a str, got {type(value).__name__}")
        if "\x00" in value:
            raise InvalidInputError(f"{what} must not contain a NUL character")
        try:
            data = value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidInputError(f"{what} is not encodable as UTF-8: {exc}") from None
        self.parts.append(struct.pack(">I", len(data)))
        self.parts.append(data)

    def str_list(self, value: object, what: str) -> None:
        if isinstance(value, str | bytes) or not isinstance(value, Iterable):
            raise InvalidInputError(f"{what} must be a sequence of str")
        items = list(value)
        self.u32(len(items), f"{what} count")
        for i, item in enumerate(items):
            self.str_(item, f"{what}[{i}]")

    def payload(self) -> bytes:
        return b"".join(self.parts)


def _message_type(message: object) -> MsgType:
    mtype = _TYPES.get(type(message))
    if mtype is None:
        raise InvalidInputError(f"not a protocol message: {type(message).__name__}")
    return mtype


def _encode_payload(w: _Writer, m: Message) -> None:
    if isinstance(m, Hello):
        w.u32(m.protocol_version, "Hello.protocol_version")
        w.str_(m.agent_version, "Hello.agent_version")
        w.u64(m.uptime_ms, "Hello.uptime_ms")
    elif isinstance(m, Output):
        if m.stream not in (STDOUT, STDERR):
            raise InvalidInputError(f"Output.stream must be 1 or 2, got {m.stream!r}")
        w.u8(m.stream, "Output.stream")
        w.bytes_(m.data, "Output.data", MAX_OUTPUT_CHUNK)
    elif isinstance(m, Exit):
        w.i32(m.exit_code, "Exit.exit_code")
        w.i32(m.signal, "Exit.signal")
        w.flag(m.timed_out, "Exit.timed_out")
        w.flag(m.stdout_truncated, "Exit.stdout_truncated")
        w.flag(m.stderr_truncated, "Exit.stderr_truncated")
        w.u64(m.duration_ms, "Exit.duration_ms")
    elif isinstance(m, Error):
        w.u32(m.errno_code, "Error.errno_code")
        w.str_(m.message, "Error.message")
    elif isinstance(m, Init):
        w.u64(m.unix_time_ns, "Init.unix_time_ns")
        w.bytes_(m.entropy, "Init.entropy", MAX_ENTROPY)
        if not isinstance(m.mounts, tuple | list):
            raise InvalidInputError("Init.mounts must be a sequence of Mount")
        w.u32(len(m.mounts), "Init.mounts count")
        for i, mount in enumerate(m.mounts):
            if not isinstance(mount, Mount):
                raise InvalidInputError(f"Init.mounts[{i}] must be a Mount")
            w.str_(mount.source, f"Init.mounts[{i}].source")
            w.str_(mount.target, f"Init.mounts[{i}].target")
            w.str_(mount.fstype, f"Init.mounts[{i}].fstype")
            w.flag(mount.readonly, f"Init.mounts[{i}].readonly")
    elif isinstance(m, Exec):
        w.u32(m.timeout_ms, "Exec.timeout_ms")
        w.u32(m.stdout_cap, "Exec.stdout_cap")
        w.u32(m.stderr_cap, "Exec.stderr_cap")
        w.str_(m.cwd, "Exec.cwd")
        if isinstance(m.argv, str | bytes) or not m.argv:
            raise InvalidInputError("Exec.argv must be a non-empty sequence of str")
        w.str_list(m.argv, "Exec.argv")
        w.str_list(m.env, "Exec.env")
    elif isinstance(m, Signal):
        if isinstance(m.signo, bool) or not isinstance(m.signo, int):
            raise InvalidInputError(f"Signal.signo must be an int, got {m.signo!r}")
        if not 1 <= m.signo <= MAX_SIGNAL:
            raise InvalidInputError(f"Signal.signo must be in [1, {MAX_SIGNAL}], got {m.signo}")
        w.u32(m.signo, "Signal.signo")
    # InitOk, Pong, Ping: empty payload


def encode(request_id: int, message: Message) -> bytes:
    """One complete frame for ``message``; raises InvalidInputError on bad values."""
    if isinstance(request_id, bool) or not isinstance(request_id, int):
        raise InvalidInputError(f"request_id must be an int, got {request_id!r}")
    if not 0 <= request_id <= _U32_MAX:
        raise InvalidInputError(f"request_id must be in [0, {_U32_MAX}], got {request_id}")
    mtype = _message_type(message)
    if mtype is MsgType.HELLO and request_id != 0:
        raise InvalidInputError("HELLO is always sent with request_id 0")
    w = _Writer()
    _encode_payload(w, message)
    payload = w.payload()
    if len(payload) > MAX_PAYLOAD:
        raise InvalidInputError(
            f"{mtype.name} payload is {len(payload)} bytes; the limit is {MAX_PAYLOAD}"
        )
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, mtype, request_id, len(payload)) + payload


# ---------------------------------------------------------------- decoding


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.off = 0
        self.what = what

    def _take(self, n: int, field: str) -> bytes:
        if len(self.data) - self.off < n:
            raise GuestProtocolError(f"{self.what} payload truncated in {field}")
        chunk = self.data[self.off : self.off + n]
        self.off += n
        return chunk

    def u8(self, field: str) -> int:
        return self._take(1, field)[0]

    def u32(self, field: str) -> int:
        value: int = struct.unpack(">I", self._take(4, field))[0]
        return value

    def i32(self, field: str) -> int:
        value: int = struct.unpack(">i", self._take(4, field))[0]
        return value

    def u64(self, field: str) -> int:
        value: int = struct.unpack(">Q", self._take(8, field))[0]
        return value

    def flag(self, field: str) -> bool:
        value = self.u8(field)
        if value > 1:
            raise GuestProtocolError(f"{self.what}.{field} must be 0 or 1, got {value}")
        return value == 1

    def bytes_(self, field: str, limit: int = MAX_PAYLOAD) -> bytes:
        n = self.u32(f"{field} length")
        if n > limit:
            raise GuestProtocolError(f"{self.what}.{field} is {n} bytes; the limit is {limit}")
        return self._take(n, field)

    def str_(self, field: str) -> str:
        raw = self.bytes_(field)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GuestProtocolError(f"{self.what}.{field} is not valid UTF-8") from None
        if "\x00" in text:
            raise GuestProtocolError(f"{self.what}.{field} contains a NUL character")
        return text

    def count(self, field: str, min_item_size: int) -> int:
        n = self.u32(f"{field} count")
        if n * min_item_size > len(self.data) - self.off:
            raise GuestProtocolError(f"{self.what}.{field} count {n} exceeds the payload")
        return n

    def str_list(self, field: str) -> tuple[str, ...]:
        n = self.count(field, 4)
        return tuple(self.str_(f"{field}[{i}]") for i in range(n))

    def done(self) -> None:
        if self.off != len(self.data):
            raise GuestProtocolError(
                f"{self.what} payload has {len(self.data) - self.off} trailing bytes"
            )


def _decode_payload(mtype: MsgType, request_id: int, payload: bytes) -> Message:
    r = _Reader(payload, mtype.name)
    message: Message
    if mtype is MsgType.HELLO:
        if request_id != 0:
            raise GuestProtocolError(f"HELLO with request_id {request_id} (must be 0)")
        message = Hello(r.u32("protocol_version"), r.str_("agent_version"), r.u64("uptime_ms"))
    elif mtype is MsgType.INIT_OK:
        message = InitOk()
    elif mtype is MsgType.OUTPUT:
        stream = r.u8("stream")
        if stream not in (STDOUT, STDERR):
            raise GuestProtocolError(f"OUTPUT.stream must be 1 or 2, got {stream}")
        message = Output(stream, r.bytes_("data", MAX_OUTPUT_CHUNK))
    elif mtype is MsgType.EXIT:
        message = Exit(
            exit_code=r.i32("exit_code"),
            signal=r.i32("signal"),
            timed_out=r.flag("timed_out"),
            stdout_truncated=r.flag("stdout_truncated"),
            stderr_truncated=r.flag("stderr_truncated"),
            duration_ms=r.u64("duration_ms"),
        )
    elif mtype is MsgType.ERROR:
        message = Error(r.u32("errno_code"), r.str_("message"))
    elif mtype is MsgType.PONG:
        message = Pong()
    elif mtype is MsgType.INIT:
        unix_time_ns = r.u64("unix_time_ns")
        entropy = r.bytes_("entropy", MAX_ENTROPY)
        n = r.count("mounts", 13)
        mounts = tuple(
            Mount(
                r.str_(f"mounts[{i}].source"),
                r.str_(f"mounts[{i}].target"),
                r.str_(f"mounts[{i}].fstype"),
                r.flag(f"mounts[{i}].readonly"),
            )
            for i in range(n)
        )
        message = Init(unix_time_ns, entropy, mounts)
    elif mtype is MsgType.EXEC:
        timeout_ms = r.u32("timeout_ms")
        stdout_cap = r.u32("stdout_cap")
        stderr_cap = r.u32("stderr_cap")
        cwd = r.str_("cwd")
        argv = r.str_list("argv")
        if not argv:
            raise GuestProtocolError("EXEC.argv is empty")
        env = r.str_list("env")
        message = Exec(argv, cwd, env, timeout_ms, stdout_cap, stderr_cap)
    elif mtype is MsgType.SIGNAL:
        signo = r.u32("signo")
        if not 1 <= signo <= MAX_SIGNAL:
            raise GuestProtocolError(f"SIGNAL.signo must be in [1, {MAX_SIGNAL}], got {signo}")
        message = Signal(signo)
    else:  # MsgType.PING
        message = Ping()
    r.done()
    return message


class FrameDecoder:
    """Incremental decoder: feed it bytes as they arrive, get whole messages back.

    ``accept`` limits which message types are allowed (e.g. :data:`GUEST_TO_HOST`
    on the host); by default both directions decode. After a
    :class:`GuestProtocolError` the decoder stays failed: the stream has no
    resynchronisation point, so every later :meth:`feed` raises again.
    """

    def __init__(self, accept: frozenset[MsgType] | None = None) -> None:
        self._accept = accept
        self._buf = bytearray()  # the current frame, header included; never > one frame
        self._payload_len: int | None = None  # known once the header is complete
        self._failed: str | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, Message]]:
        """Consume ``data``; return the (request_id, message) pairs it completed."""
        if self._failed is not None:
            raise GuestProtocolError(f"protocol stream already failed: {self._failed}")
        try:
            return self._feed(memoryview(data).cast("B"))
        except GuestProtocolError as exc:
            self._fail(exc.message)
            raise
        except Exception as exc:  # defensive: a bug here must still read as a protocol error
            self._fail(f"undecodable input ({type(exc).__name__}: {exc})")
            raise GuestProtocolError(f"undecodable input ({type(exc).__name__})") from exc

    def _fail(self, reason: str) -> None:
        self._failed = reason
        self._buf = bytearray()
        self._payload_len = None

    def _feed(self, view: memoryview) -> list[tuple[int, Message]]:
        out: list[tuple[int, Message]] = []
        pos = 0
        end = len(view)
        while True:
            if self._payload_len is None:
                take = min(HEADER_LEN - len(self._buf), end - pos)
                self._buf += view[pos : pos + take]
                pos += take
                if len(self._buf) < HEADER_LEN:
                    break
                self._payload_len = self._check_header(bytes(self._buf))
            need = HEADER_LEN + self._payload_len - len(self._buf)
            take = min(need, end - pos)
            self._buf += view[pos : pos + take]
            pos += take
            if take < need:
                break
            frame = bytes(self._buf)
            self._buf = bytearray()
            self._payload_len = None
            _, _, mtype, request_id, _ = _HEADER.unpack_from(frame)
            out.append(
                (request_id, _decode_payload(MsgType(mtype), request_id, frame[HEADER_LEN:]))
            )
        return out

    def _check_header(self, header: bytes) -> int:
        magic, version, mtype, _request_id, length = _HEADER.unpack(header)
        if magic != MAGIC:
            raise GuestProtocolError(f"bad frame magic {magic!r} (expected {MAGIC!r})")
        if version != PROTOCOL_VERSION:
            raise GuestProtocolError(
                f"unsupported protocol version {version} (expected {PROTOCOL_VERSION})"
            )
        try:
            known = MsgType(mtype)
        except ValueError:
            raise GuestProtocolError(f"unknown message type {mtype}") from None
        if self._accept is not None and known not in self._accept:
            raise GuestProtocolError(f"unexpected message type {known.name} on this channel")
        if length > MAX_PAYLOAD:
            raise GuestProtocolError(f"frame payload of {length} bytes exceeds {MAX_PAYLOAD}")
        return int(length)


_TYPES: dict[type, MsgType] = {
    Hello: MsgType.HELLO,
    InitOk: MsgType.INIT_OK,
    Output: MsgType.OUTPUT,
    Exit: MsgType.EXIT,
    Error: MsgType.ERROR,
    Pong: MsgType.PONG,
    Init: MsgType.INIT,
    Exec: MsgType.EXEC,
    Signal: MsgType.SIGNAL,
    Ping: MsgType.PING,
}
