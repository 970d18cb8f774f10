"""Host-side codec of the guest agent's wire protocol (version 2).

The format is specified in ``docs/protocol.md``; the guest side is ``agent.c``.
A stream of frames, each a 12-byte header and a payload::

    magic b"PY" | version u8 | type u8 | request_id u32 | payload_len u32   (big-endian)

The header's version byte is :data:`FRAME_VERSION` (1, unchanged since version 1);
:data:`PROTOCOL_VERSION` (2) is what ``HELLO`` announces. Version 2 only adds
message types: every version 1 frame keeps its exact encoding.

:func:`encode` turns a message into one frame and validates every value
(raising :class:`~pyro_mcp.errors.InvalidInputError`). :class:`FrameDecoder`
parses a byte stream incrementally. The decoder is what a compromised guest
talks to, so on any malformed input it raises
:class:`~pyro_mcp.errors.GuestProtocolError` and nothing else, and it never
buffers more than one maximum-size frame. The encoding is canonical: a frame
the decoder accepts re-encodes to exactly the same bytes.

This module is over ~600 lines on purpose: it is the whole wire format, one
dataclass, one encoder branch and one decoder branch per message, meant to be
read side by side with ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TypeAlias

from pyro_mcp.errors import GuestProtocolError, InvalidInputError

__all__ = [
    "DEFAULT_WINDOW",
    "FRAME_VERSION",
    "GUEST_TO_HOST",
    "HEADER_LEN",
    "HOST_TO_GUEST",
    "MAGIC",
    "MAX_DATA_CHUNK",
    "MAX_ENTROPY",
    "MAX_LIST_ENTRIES",
    "MAX_OUTPUT_CHUNK",
    "MAX_PATH",
    "MAX_PAYLOAD",
    "NET_LIMITS",
    "PROTOCOL_VERSION",
    "STDERR",
    "STDOUT",
    "Cancel",
    "Credit",
    "Data",
    "DirEntry",
    "Entries",
    "Eof",
    "Error",
    "Exec",
    "Exec2",
    "Exit",
    "FileKind",
    "FileStat",
    "FrameDecoder",
    "Grant",
    "Hello",
    "HostEntry",
    "Init",
    "Init2",
    "InitOk",
    "Interface",
    "ListDir",
    "ListEnd",
    "Message",
    "Mount",
    "MsgType",
    "NetConfig",
    "Output",
    "Ping",
    "Pong",
    "ReadData",
    "ReadEnd",
    "ReadFile",
    "Signal",
    "Stat",
    "StatResult",
    "WriteEnd",
    "WriteFile",
    "encode",
]

PROTOCOL_VERSION: int = 2  # announced in HELLO; checked by the host at connect
FRAME_VERSION: int = 1  # the header's version byte (unchanged by version 2)
MAX_PAYLOAD: int = 262144
MAGIC = b"PY"
HEADER_LEN = 12
MAX_OUTPUT_CHUNK = 32768  # data bytes in one OUTPUT frame
MAX_ENTROPY = 4096  # entropy bytes in one INIT frame
STDOUT = 1
STDERR = 2
MAX_SIGNAL = 64
MAX_DATA_CHUNK = 65536  # data bytes in one DATA or READ_DATA frame
MAX_PATH = 4096  # bytes in a path, an entry name or a link target
MAX_LIST_ENTRIES = 1 << 20  # LIST.max_entries
DEFAULT_WINDOW = 1 << 20  # credit a host offers for a read or a list
MAX_IFNAME = 15  # IFNAMSIZ - 1
NO_ID = 0xFFFF_FFFF  # "unchanged" for an owner uid/gid on the wire

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
    CREDIT = 7
    READ_DATA = 8
    READ_END = 9
    WRITE_END = 10
    STAT_RESULT = 11
    ENTRIES = 12
    LIST_END = 13
    INIT = 16
    EXEC = 17
    SIGNAL = 18
    PING = 19
    EXEC2 = 20
    DATA = 21
    EOF = 22
    GRANT = 23
    READ_FILE = 24
    WRITE_FILE = 25
    STAT = 26
    LIST = 27
    CANCEL = 28
    INIT2 = 29


GUEST_TO_HOST: frozenset[MsgType] = frozenset(t for t in MsgType if t < 16)
HOST_TO_GUEST: frozenset[MsgType] = frozenset(t for t in MsgType if t >= 16)


class FileKind(enum.IntEnum):
    """``FileStat.kind``: the file type, from ``st_mode``."""

    FILE = 1
    DIR = 2
    SYMLINK = 3
    FIFO = 4
    SOCKET = 5
    CHAR_DEVICE = 6
    BLOCK_DEVICE = 7


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


# ---------------------------------------------------------------- version 2


@dataclass(frozen=True)
class FileStat:
    """What ``lstat`` says of one file; ``link_target`` only for a symlink (never followed)."""

    kind: FileKind
    mode: int  # permission bits, st_mode & 0o7777
    uid: int
    gid: int
    size: int
    mtime_ns: int
    link_target: bytes = b""


@dataclass(frozen=True)
class DirEntry:
    """One LIST entry: ``name`` is the path relative to the listed folder, bytes as on disk."""

    name: bytes
    stat: FileStat


@dataclass(frozen=True)
class Credit:
    """Guest→host: the host may send ``bytes`` more DATA bytes for this request."""

    bytes: int


@dataclass(frozen=True)
class ReadData:
    """Guest→host: the next chunk of a READ_FILE (counted against the host's GRANTs)."""

    data: bytes


@dataclass(frozen=True)
class ReadEnd:
    """Guest→host: the READ_FILE is complete; ``truncated``: bytes remain past the last sent."""

    stat: FileStat
    bytes_sent: int
    truncated: bool


@dataclass(frozen=True)
class WriteEnd:
    """Guest→host: the WRITE_FILE's file is in place (renamed over its path)."""

    stat: FileStat
    bytes_written: int


@dataclass(frozen=True)
class StatResult:
    """Guest→host: answer to STAT."""

    stat: FileStat


@dataclass(frozen=True)
class Entries:
    """Guest→host: the next entries of a LIST (payload counted against the host's GRANTs)."""

    entries: tuple[DirEntry, ...]


@dataclass(frozen=True)
class ListEnd:
    """Guest→host: the LIST is complete; ``truncated``: ``max_entries`` stopped it."""

    count: int
    truncated: bool


@dataclass(frozen=True)
class Exec2:
    """Host→guest: EXEC with credentials, a default cwd, stdin and a pids limit.

    ``cwd`` empty means INIT2's ``workdir`` ("/" if none); ``stdin`` True gives the
    command a pipe fed by DATA/EOF frames (else /dev/null); ``pids_max`` 0 means the
    agent's default.
    """

    argv: tuple[str, ...]
    cwd: str
    env: tuple[str, ...]
    timeout_ms: int
    stdout_cap: int
    stderr_cap: int
    uid: int = 0
    gid: int = 0
    groups: tuple[int, ...] = ()
    stdin: bool = False
    pids_max: int = 0


@dataclass(frozen=True)
class Data:
    """Host→guest: stdin bytes for an EXEC2 or contents for a WRITE_FILE (within credit)."""

    data: bytes


@dataclass(frozen=True)
class Eof:
    """Host→guest: end of an EXEC2's stdin, or of a WRITE_FILE's data (commit it)."""


@dataclass(frozen=True)
class Grant:
    """Host→guest: the agent may send ``bytes`` more for this READ_FILE or LIST."""

    bytes: int


@dataclass(frozen=True)
class ReadFile:
    """Host→guest: stream ``max_bytes`` of the regular file at ``path`` from ``offset``."""

    path: bytes
    offset: int = 0
    max_bytes: int = 2**64 - 1
    window: int = DEFAULT_WINDOW


@dataclass(frozen=True)
class WriteFile:
    """Host→guest: write ``path`` atomically (temp file in the same folder, then rename).

    ``keep_mode``: an existing file's mode and owner win over ``mode``/``uid``/``gid``.
    ``uid``/``gid`` None: the agent's own. ``make_parents``: ``mkdir -p`` the folder
    (new folders get 0755 and the same owner).
    """

    path: bytes
    mode: int = 0o644
    keep_mode: bool = True
    make_parents: bool = False
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Stat:
    """Host→guest: ``lstat(path)``; answered by STAT_RESULT."""

    path: bytes


@dataclass(frozen=True)
class ListDir:
    """Host→guest: the entries of a folder (LIST); symlinks are listed, never followed."""

    path: bytes
    recursive: bool = False
    max_entries: int = 10000
    window: int = DEFAULT_WINDOW


@dataclass(frozen=True)
class Cancel:
    """Host→guest: abandon a running READ_FILE, WRITE_FILE or LIST (ERROR ECANCELED)."""


@dataclass(frozen=True)
class Interface:
    """One network interface INIT2 brings up: an IPv4 address and an optional gateway."""

    name: str
    address: str
    prefix_len: int
    gateway: str | None = None
    mtu: int = 0  # 0: leave it


@dataclass(frozen=True)
class HostEntry:
    """One ``/etc/hosts`` line."""

    address: str
    name: str


@dataclass(frozen=True)
class NetConfig:
    """Network set up by INIT2: interfaces, ``/etc/resolv.conf``, ``/etc/hosts``."""

    interfaces: tuple[Interface, ...] = ()
    nameservers: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    hosts: tuple[HostEntry, ...] = ()


@dataclass(frozen=True)
class Init2:
    """Host→guest: INIT plus the default working directory and the network."""

    unix_time_ns: int
    entropy: bytes
    mounts: tuple[Mount, ...] = ()
    workdir: str = ""
    network: NetConfig | None = None


Message: TypeAlias = (
    Hello
    | InitOk
    | Output
    | Exit
    | Error
    | Pong
    | Credit
    | ReadData
    | ReadEnd
    | WriteEnd
    | StatResult
    | Entries
    | ListEnd
    | Init
    | Exec
    | Signal
    | Ping
    | Exec2
    | Data
    | Eof
    | Grant
    | ReadFile
    | WriteFile
    | Stat
    | ListDir
    | Cancel
    | Init2
)


# ---------------------------------------------------------------- validation
# One rule set for both directions: the encoder raises InvalidInputError and the
# decoder GuestProtocolError with the same wording.

_I64_MIN = -(2**63)
_I64_MAX = 2**63 - 1


def _path_problem(value: bytes) -> str | None:
    if not value:
        return "is empty"
    if len(value) > MAX_PATH:
        return f"is {len(value)} bytes; the limit is {MAX_PATH}"
    if b"\x00" in value:
        return "contains a NUL byte"
    return None


def _name_problem(value: bytes) -> str | None:
    """An entry name: a relative path with no empty, ``.`` or ``..`` component."""
    problem = _path_problem(value)
    if problem:
        return problem
    if any(part in (b"", b".", b"..") for part in value.split(b"/")):
        return "is not a plain relative path"
    return None


def _stat_problem(st: FileStat) -> str | None:
    if (st.kind == FileKind.SYMLINK) != bool(st.link_target):
        return "has a link_target exactly when it is a symlink"
    if st.link_target:
        problem = _path_problem(st.link_target)
        if problem:
            return f"link_target {problem}"
    return None


def _address(value: object, what: str, v4_only: bool) -> bytes:
    try:
        packed = ipaddress.ip_address(value).packed  # type: ignore[arg-type]
    except ValueError:
        raise InvalidInputError(f"{what} is not an IP address: {value!r}") from None
    if v4_only and len(packed) != 4:
        raise InvalidInputError(f"{what} must be an IPv4 address, got {value!r}")
    return packed


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

    def i64(self, value: object, what: str) -> None:
        self._int(">q", value, _I64_MIN, _I64_MAX, what)

    def path(self, value: object, what: str, name: bool = False) -> None:
        if not isinstance(value, bytes):
            raise InvalidInputError(f"{what} must be bytes, got {type(value).__name__}")
        problem = _name_problem(value) if name else _path_problem(value)
        if problem:
            raise InvalidInputError(f"{what} {problem}")
        self.bytes_(value, what)

    def u32_list(self, value: object, what: str) -> None:
        if not isinstance(value, tuple | list):
            raise InvalidInputError(f"{what} must be a sequence of int")
        self.u32(len(value), f"{what} count")
        for i, item in enumerate(value):
            self.u32(item, f"{what}[{i}]")

    def items(self, value: object, cls: type, what: str) -> list[object]:
        if not isinstance(value, tuple | list) or not all(isinstance(v, cls) for v in value):
            raise InvalidInputError(f"{what} must be a sequence of {cls.__name__}")
        self.u32(len(value), f"{what} count")
        return list(value)

    def address(self, value: object, what: str, v4_only: bool = False) -> None:
        self.bytes_(_address(value, what, v4_only), what)

    def stat(self, st: object, what: str) -> None:
        if not isinstance(st, FileStat):
            raise InvalidInputError(f"{what} must be a FileStat")
        if isinstance(st.kind, bool) or st.kind not in tuple(FileKind):
            raise InvalidInputError(f"{what}.kind must be a FileKind, got {st.kind!r}")
        problem = _stat_problem(st)
        if problem:
            raise InvalidInputError(f"{what} {problem}")
        self.u8(int(st.kind), f"{what}.kind")
        self._int(">I", st.mode, 0, 0o7777, f"{what}.mode")
        self.u32(st.uid, f"{what}.uid")
        self.u32(st.gid, f"{what}.gid")
        self.u64(st.size, f"{what}.size")
        self.i64(st.mtime_ns, f"{what}.mtime_ns")
        self.bytes_(st.link_target, f"{what}.link_target", MAX_PATH)

    def mounts(self, value: object, what: str) -> None:
        for i, mount in enumerate(self.items(value, Mount, what)):
            assert isinstance(mount, Mount)
            self.str_(mount.source, f"{what}[{i}].source")
            self.str_(mount.target, f"{what}[{i}].target")
            self.str_(mount.fstype, f"{what}[{i}].fstype")
            self.flag(mount.readonly, f"{what}[{i}].readonly")

    def owner(self, value: object, what: str) -> None:
        if value is None:
            self.u32(NO_ID, what)
        else:
            self._int(">I", value, 0, NO_ID - 1, what)

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
        w.mounts(m.mounts, "Init.mounts")
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
    else:
        _encode_v2(w, m)
    # InitOk, Pong, Ping, Eof, Cancel: empty payload


def _encode_v2(w: _Writer, m: Message) -> None:
    if isinstance(m, Credit | Grant):
        w.u32(m.bytes, f"{type(m).__name__}.bytes")
    elif isinstance(m, ReadData | Data):
        w.bytes_(m.data, f"{type(m).__name__}.data", MAX_DATA_CHUNK)
    elif isinstance(m, ReadEnd):
        w.stat(m.stat, "ReadEnd.stat")
        w.u64(m.bytes_sent, "ReadEnd.bytes_sent")
        w.flag(m.truncated, "ReadEnd.truncated")
    elif isinstance(m, WriteEnd):
        w.stat(m.stat, "WriteEnd.stat")
        w.u64(m.bytes_written, "WriteEnd.bytes_written")
    elif isinstance(m, StatResult):
        w.stat(m.stat, "StatResult.stat")
    elif isinstance(m, Entries):
        for i, entry in enumerate(w.items(m.entries, DirEntry, "Entries.entries")):
            assert isinstance(entry, DirEntry)
            w.path(entry.name, f"Entries.entries[{i}].name", name=True)
            w.stat(entry.stat, f"Entries.entries[{i}].stat")
    elif isinstance(m, ListEnd):
        w.u32(m.count, "ListEnd.count")
        w.flag(m.truncated, "ListEnd.truncated")
    elif isinstance(m, Exec2):
        w.u32(m.timeout_ms, "Exec2.timeout_ms")
        w.u32(m.stdout_cap, "Exec2.stdout_cap")
        w.u32(m.stderr_cap, "Exec2.stderr_cap")
        w._int(">I", m.uid, 0, NO_ID - 1, "Exec2.uid")
        w._int(">I", m.gid, 0, NO_ID - 1, "Exec2.gid")
        w.u32(m.pids_max, "Exec2.pids_max")
        w.flag(m.stdin, "Exec2.stdin")
        w.str_(m.cwd, "Exec2.cwd")
        if isinstance(m.argv, str | bytes) or not m.argv:
            raise InvalidInputError("Exec2.argv must be a non-empty sequence of str")
        w.str_list(m.argv, "Exec2.argv")
        w.str_list(m.env, "Exec2.env")
        w.u32_list(m.groups, "Exec2.groups")
    elif isinstance(m, ReadFile):
        w.path(m.path, "ReadFile.path")
        w.u64(m.offset, "ReadFile.offset")
        w.u64(m.max_bytes, "ReadFile.max_bytes")
        w.u32(m.window, "ReadFile.window")
    elif isinstance(m, WriteFile):
        w.path(m.path, "WriteFile.path")
        w._int(">I", m.mode, 0, 0o7777, "WriteFile.mode")
        w.flag(m.keep_mode, "WriteFile.keep_mode")
        w.flag(m.make_parents, "WriteFile.make_parents")
        w.owner(m.uid, "WriteFile.uid")
        w.owner(m.gid, "WriteFile.gid")
    elif isinstance(m, Stat):
        w.path(m.path, "Stat.path")
    elif isinstance(m, ListDir):
        w.path(m.path, "ListDir.path")
        w.flag(m.recursive, "ListDir.recursive")
        w._int(">I", m.max_entries, 0, MAX_LIST_ENTRIES, "ListDir.max_entries")
        w.u32(m.window, "ListDir.window")
    elif isinstance(m, Init2):
        w.u64(m.unix_time_ns, "Init2.unix_time_ns")
        w.bytes_(m.entropy, "Init2.entropy", MAX_ENTROPY)
        w.mounts(m.mounts, "Init2.mounts")
        w.str_(m.workdir, "Init2.workdir")
        if m.network is not None and not isinstance(m.network, NetConfig):
            raise InvalidInputError("Init2.network must be a NetConfig or None")
        w.flag(m.network is not None, "Init2.network present")
        if m.network is not None:
            _encode_network(w, m.network)


# Most items of each NetConfig list the agent takes (it refuses more as malformed).
NET_LIMITS: dict[str, int] = {"interfaces": 16, "nameservers": 16, "search": 6, "hosts": 64}


def _encode_network(w: _Writer, net: NetConfig) -> None:
    for field, limit in NET_LIMITS.items():
        value = getattr(net, field)
        if isinstance(value, tuple | list) and len(value) > limit:
            raise InvalidInputError(
                f"NetConfig.{field} has {len(value)} items; the limit is {limit}"
            )
    for i, iface in enumerate(w.items(net.interfaces, Interface, "NetConfig.interfaces")):
        assert isinstance(iface, Interface)
        what = f"NetConfig.interfaces[{i}]"
        if not isinstance(iface.name, str) or not 0 < len(iface.name.encode()) <= MAX_IFNAME:
            raise InvalidInputError(f"{what}.name must be 1 to {MAX_IFNAME} bytes")
        if "/" in iface.name or iface.name in (".", ".."):
            raise InvalidInputError(f"{what}.name is not an interface name: {iface.name!r}")
        w.str_(iface.name, f"{what}.name")
        w.address(iface.address, f"{what}.address", v4_only=True)
        w._int(">B", iface.prefix_len, 0, 32, f"{what}.prefix_len")
        if iface.gateway is None:
            w.bytes_(b"", f"{what}.gateway")
        else:
            w.address(iface.gateway, f"{what}.gateway", v4_only=True)
        w.u32(iface.mtu, f"{what}.mtu")
    for i, server in enumerate(w.items(net.nameservers, str, "NetConfig.nameservers")):
        w.address(server, f"NetConfig.nameservers[{i}]")
    if isinstance(net.search, str | bytes):
        raise InvalidInputError("NetConfig.search must be a sequence of str")
    for i, domain in enumerate(net.search):
        _check_hostname(domain, f"NetConfig.search[{i}]")
    w.str_list(net.search, "NetConfig.search")
    for i, host in enumerate(w.items(net.hosts, HostEntry, "NetConfig.hosts")):
        assert isinstance(host, HostEntry)
        w.address(host.address, f"NetConfig.hosts[{i}].address")
        _check_hostname(host.name, f"NetConfig.hosts[{i}].name")
        w.str_(host.name, f"NetConfig.hosts[{i}].name")


_HOSTNAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-_")


def _check_hostname(value: object, what: str) -> None:
    """Names written into /etc/hosts and resolv.conf: no spaces or newlines to inject lines."""
    if not isinstance(value, str) or not 0 < len(value) <= 253 or set(value) - _HOSTNAME_CHARS:
        raise InvalidInputError(
            f"{what} must be a host name (letters, digits, . - _), got {value!r}"
        )


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
    return _HEADER.pack(MAGIC, FRAME_VERSION, mtype, request_id, len(payload)) + payload


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

    def i64(self, field: str) -> int:
        value: int = struct.unpack(">q", self._take(8, field))[0]
        return value

    def bounded(self, field: str, value: int, hi: int) -> int:
        if value > hi:
            raise GuestProtocolError(f"{self.what}.{field} is {value}; the limit is {hi}")
        return value

    def path(self, field: str, name: bool = False) -> bytes:
        value = self.bytes_(field, MAX_PATH + 1)
        problem = _name_problem(value) if name else _path_problem(value)
        if problem:
            raise GuestProtocolError(f"{self.what}.{field} {problem}")
        return value

    def stat(self, field: str) -> FileStat:
        kind = self.u8(f"{field}.kind")
        if kind not in tuple(FileKind):
            raise GuestProtocolError(f"{self.what}.{field}.kind {kind} is not a file type")
        st = FileStat(
            kind=FileKind(kind),
            mode=self.bounded(f"{field}.mode", self.u32(f"{field}.mode"), 0o7777),
            uid=self.u32(f"{field}.uid"),
            gid=self.u32(f"{field}.gid"),
            size=self.u64(f"{field}.size"),
            mtime_ns=self.i64(f"{field}.mtime_ns"),
            link_target=self.bytes_(f"{field}.link_target", MAX_PATH),
        )
        problem = _stat_problem(st)
        if problem:
            raise GuestProtocolError(f"{self.what}.{field} {problem}")
        return st

    def address(self, field: str, v4_only: bool = False) -> str:
        raw = self.bytes_(field, 16)
        if len(raw) not in ((4,) if v4_only else (4, 16)):
            raise GuestProtocolError(f"{self.what}.{field} is not an IP address")
        return str(ipaddress.ip_address(raw))

    def owner(self, field: str) -> int | None:
        value = self.u32(field)
        return None if value == NO_ID else value

    def mounts(self, field: str) -> tuple[Mount, ...]:
        n = self.count(field, 13)
        return tuple(
            Mount(
                self.str_(f"{field}[{i}].source"),
                self.str_(f"{field}[{i}].target"),
                self.str_(f"{field}[{i}].fstype"),
                self.flag(f"{field}[{i}].readonly"),
            )
            for i in range(n)
        )

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
        message = Init(unix_time_ns, entropy, r.mounts("mounts"))
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
    elif mtype is MsgType.PING:
        message = Ping()
    else:
        message = _decode_v2(mtype, r)
    r.done()
    return message


def _decode_v2(mtype: MsgType, r: _Reader) -> Message:
    if mtype is MsgType.CREDIT:
        return Credit(r.u32("bytes"))
    if mtype is MsgType.GRANT:
        return Grant(r.u32("bytes"))
    if mtype is MsgType.READ_DATA:
        return ReadData(r.bytes_("data", MAX_DATA_CHUNK))
    if mtype is MsgType.DATA:
        return Data(r.bytes_("data", MAX_DATA_CHUNK))
    if mtype is MsgType.READ_END:
        return ReadEnd(r.stat("stat"), r.u64("bytes_sent"), r.flag("truncated"))
    if mtype is MsgType.WRITE_END:
        return WriteEnd(r.stat("stat"), r.u64("bytes_written"))
    if mtype is MsgType.STAT_RESULT:
        return StatResult(r.stat("stat"))
    if mtype is MsgType.ENTRIES:
        n = r.count("entries", 4 + 1 + 4 * 3 + 8 * 2 + 4 + 1)
        return Entries(
            tuple(
                DirEntry(r.path(f"entries[{i}].name", name=True), r.stat(f"entries[{i}].stat"))
                for i in range(n)
            )
        )
    if mtype is MsgType.LIST_END:
        return ListEnd(r.u32("count"), r.flag("truncated"))
    if mtype is MsgType.EXEC2:
        timeout_ms, stdout_cap, stderr_cap = (
            r.u32("timeout_ms"),
            r.u32("stdout_cap"),
            r.u32("stderr_cap"),
        )
        uid, gid = r.owner("uid"), r.owner("gid")
        if uid is None or gid is None:
            raise GuestProtocolError("EXEC2.uid and EXEC2.gid must be real ids")
        pids_max = r.u32("pids_max")
        stdin = r.flag("stdin")
        cwd = r.str_("cwd")
        argv = r.str_list("argv")
        if not argv:
            raise GuestProtocolError("EXEC2.argv is empty")
        env = r.str_list("env")
        groups = tuple(r.u32(f"groups[{i}]") for i in range(r.count("groups", 4)))
        return Exec2(
            argv, cwd, env, timeout_ms, stdout_cap, stderr_cap, uid, gid, groups, stdin, pids_max
        )
    if mtype is MsgType.READ_FILE:
        return ReadFile(r.path("path"), r.u64("offset"), r.u64("max_bytes"), r.u32("window"))
    if mtype is MsgType.WRITE_FILE:
        return WriteFile(
            r.path("path"),
            r.bounded("mode", r.u32("mode"), 0o7777),
            r.flag("keep_mode"),
            r.flag("make_parents"),
            r.owner("uid"),
            r.owner("gid"),
        )
    if mtype is MsgType.STAT:
        return Stat(r.path("path"))
    if mtype is MsgType.LIST:
        return ListDir(
            r.path("path"),
            r.flag("recursive"),
            r.bounded("max_entries", r.u32("max_entries"), MAX_LIST_ENTRIES),
            r.u32("window"),
        )
    if mtype is MsgType.INIT2:
        unix_time_ns = r.u64("unix_time_ns")
        entropy = r.bytes_("entropy", MAX_ENTROPY)
        mounts = r.mounts("mounts")
        workdir = r.str_("workdir")
        network = _decode_network(r) if r.flag("network present") else None
        return Init2(unix_time_ns, entropy, mounts, workdir, network)
    if mtype is MsgType.EOF:
        return Eof()
    return Cancel()  # MsgType.CANCEL: every other type is decoded above


def _decode_network(r: _Reader) -> NetConfig:
    interfaces = []
    limit = NET_LIMITS
    for i in range(r.bounded("interfaces count", r.count("interfaces", 17), limit["interfaces"])):
        name = r.str_(f"interfaces[{i}].name")
        if not 0 < len(name.encode()) <= MAX_IFNAME or "/" in name or name in (".", ".."):
            raise GuestProtocolError(f"INIT2.interfaces[{i}].name is not an interface name")
        address = r.address(f"interfaces[{i}].address", v4_only=True)
        prefix_len = r.bounded(f"interfaces[{i}].prefix_len", r.u8("prefix_len"), 32)
        gateway_raw = r.bytes_(f"interfaces[{i}].gateway", 4)
        if len(gateway_raw) not in (0, 4):
            raise GuestProtocolError(f"INIT2.interfaces[{i}].gateway is not an IPv4 address")
        gateway = str(ipaddress.ip_address(gateway_raw)) if gateway_raw else None
        mtu = r.u32(f"interfaces[{i}].mtu")
        interfaces.append(Interface(name, address, prefix_len, gateway, mtu))
    n = r.bounded("nameservers count", r.count("nameservers", 4), limit["nameservers"])
    nameservers = tuple(r.address(f"nameservers[{i}]") for i in range(n))
    n = r.bounded("search count", r.count("search", 4), limit["search"])
    search = tuple(r.str_(f"search[{i}]") for i in range(n))
    hosts = tuple(
        HostEntry(r.address(f"hosts[{i}].address"), r.str_(f"hosts[{i}].name"))
        for i in range(r.bounded("hosts count", r.count("hosts", 8), limit["hosts"]))
    )
    for what, name in [("search", d) for d in search] + [("hosts", h.name) for h in hosts]:
        try:
            _check_hostname(name, what)
        except InvalidInputError as exc:
            raise GuestProtocolError(f"INIT2.{exc.message}") from None
    return NetConfig(tuple(interfaces), nameservers, search, hosts)


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
        if version != FRAME_VERSION:
            raise GuestProtocolError(
                f"unsupported protocol version {version} (expected {FRAME_VERSION})"
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
    Credit: MsgType.CREDIT,
    ReadData: MsgType.READ_DATA,
    ReadEnd: MsgType.READ_END,
    WriteEnd: MsgType.WRITE_END,
    StatResult: MsgType.STAT_RESULT,
    Entries: MsgType.ENTRIES,
    ListEnd: MsgType.LIST_END,
    Exec2: MsgType.EXEC2,
    Data: MsgType.DATA,
    Eof: MsgType.EOF,
    Grant: MsgType.GRANT,
    ReadFile: MsgType.READ_FILE,
    WriteFile: MsgType.WRITE_FILE,
    Stat: MsgType.STAT,
    ListDir: MsgType.LIST,
    Cancel: MsgType.CANCEL,
    Init2: MsgType.INIT2,
}
