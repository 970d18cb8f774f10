"""Version 2 of the guest wire protocol: the codec of the new message types (no agent)."""

from __future__ import annotations

import contextlib
import ipaddress
import struct
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_mcp.errors import GuestProtocolError, InvalidInputError
from pyro_mcp.guest.channel import AgentChannel
from pyro_mcp.guest.protocol import (
    GUEST_TO_HOST,
    HOST_TO_GUEST,
    MAX_DATA_CHUNK,
    MAX_LIST_ENTRIES,
    MAX_PATH,
    Cancel,
    Credit,
    Data,
    DirEntry,
    Entries,
    Eof,
    Error,
    Exec2,
    FileKind,
    FileStat,
    FrameDecoder,
    Grant,
    HostEntry,
    Init2,
    Interface,
    ListDir,
    ListEnd,
    Message,
    Mount,
    MsgType,
    NetConfig,
    ReadData,
    ReadEnd,
    ReadFile,
    Stat,
    StatResult,
    WriteEnd,
    WriteFile,
    encode,
)
from test_protocol import _only_protocol_errors, mutate

FILE = FileStat(FileKind.FILE, 0o644, 1000, 1000, 5, 1_700_000_000_123_456_789)
LINK = FileStat(FileKind.SYMLINK, 0o777, 0, 0, 11, -1, b"/etc/passwd")
NET = NetConfig(
    interfaces=(Interface("eth0", "10.0.2.15", 24, "10.0.2.2", 1500),),
    nameservers=("10.0.2.3", "2001:db8::1"),
    search=("example.test",),
    hosts=(HostEntry("10.0.2.2", "proxy.pyro"),),
)

SAMPLES: list[tuple[int, Message]] = [
    (1, Credit(0)),
    (1, Credit(2**32 - 1)),
    (2, ReadData(b"")),
    (2, ReadData(b"\xff" * MAX_DATA_CHUNK)),
    (2, ReadEnd(FILE, 5, False)),
    (2, ReadEnd(LINK, 0, True)),
    (3, WriteEnd(FILE, 2**64 - 1)),
    (4, StatResult(FileStat(FileKind.DIR, 0o7777, 2**32 - 1, 0, 4096, -(2**63)))),
    (5, Entries(())),
    (5, Entries((DirEntry(b"a", FILE), DirEntry(b"sub/\xff\xfe name\n", LINK)))),
    (5, ListEnd(0, False)),
    (5, ListEnd(2**32 - 1, True)),
    (6, Exec2(("sh", "-c", "cat"), "", ("PATH=/bin",), 5000, 1024, 512)),
    (6, Exec2(("id",), "/w", (), 0, 0, 0, 1000, 1000, (4, 27), True, 64)),
    (7, Data(b"stdin bytes")),
    (7, Eof()),
    (8, Grant(65536)),
    (9, ReadFile(b"/etc/hostname")),
    (9, ReadFile(b"rel\xff", 7, 0, 0)),
    (10, WriteFile(b"/workspace/a/b.txt")),
    (10, WriteFile(b"/x", 0o4755, False, True, 0, 2**32 - 2)),
    (11, Stat(b"/")),
    (12, ListDir(b"/workspace")),
    (12, ListDir(b"/", True, MAX_LIST_ENTRIES, 1)),
    (13, Cancel()),
    (14, Init2(0, b"")),
    (14, Init2(2**64 - 1, b"e" * 32, (Mount("/dev/vdb", "/w", "ext4"),), "/workspace", NET)),
    (14, Init2(1, b"", (), "", NetConfig())),
]

V2_TYPES = {t for t in MsgType if t not in (1, 2, 3, 4, 5, 6, 16, 17, 18, 19)}


def frame(mtype: int, payload: bytes, request_id: int = 1) -> bytes:
    return struct.pack(">2sBBII", b"PY", 1, mtype, request_id, len(payload)) + payload


def b(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def stat_bytes(kind: int = 1, mode: int = 0o644, target: bytes = b"") -> bytes:
    return bytes([kind]) + struct.pack(">IIIQq", mode, 0, 0, 0, 0) + b(target)


@pytest.mark.parametrize(("request_id", "message"), SAMPLES)
def test_round_trip(request_id: int, message: Message) -> None:
    data = encode(request_id, message)
    assert FrameDecoder().feed(data) == [(request_id, message)]


def test_every_v2_type_is_sampled_and_directions_split() -> None:
    assert {encode(r, m)[3] for r, m in SAMPLES} == {int(t) for t in V2_TYPES}
    assert GUEST_TO_HOST.isdisjoint(HOST_TO_GUEST)
    assert set(MsgType) == GUEST_TO_HOST | HOST_TO_GUEST
    assert all(t < 16 for t in GUEST_TO_HOST)


# Frozen wire format of one frame of each new type: changing any is a protocol change.
FROZEN: list[tuple[int, Message, str]] = [
    (1, Credit(65536), "505901070000000100000004" + "00010000"),
    (1, ReadData(b"hi"), "505901080000000100000006" + "0000000268" + "69"),
    (
        1,
        ReadEnd(FileStat(FileKind.FILE, 0o644, 1, 2, 3, 4), 3, True),
        "50590109000000010000002a"
        "01"
        "000001a4"
        "00000001"
        "00000002"
        "0000000000000003"
        "0000000000000004"
        "00000000"
        "0000000000000003"
        "01",
    ),
    (
        1,
        WriteEnd(FileStat(FileKind.FILE, 0o600, 0, 0, 1, -1), 1),
        "5059010a0000000100000029"
        "01"
        "00000180"
        "00000000"
        "00000000"
        "0000000000000001"
        "ffffffffffffffff"
        "00000000"
        "0000000000000001",
    ),
    (
        1,
        StatResult(FileStat(FileKind.SYMLINK, 0o777, 0, 0, 1, 0, b"x")),
        "5059010b000000010000002203000001ff0000000000000000000000000000000100000000000000"
        "000000000178",
    ),
    (
        1,
        Entries((DirEntry(b"a", FileStat(FileKind.DIR, 0o755, 0, 0, 0, 0)),)),
        "5059010c000000010000002a00000001000000016102000001ed000000000000000000000000000000"
        "00000000000000000000000000",
    ),
    (1, ListEnd(3, False), "5059010d0000000100000005" + "00000003" + "00"),
    (
        2,
        Exec2(("cat",), "", (), 1000, 10, 20, 1000, 100, (5,), True, 64),
        "505901140000000200000034000003e80000000a00000014000003e8000000640000004001000000"
        "000000000100000003636174000000000000000100000005",
    ),
    (2, Data(b"x"), "505901150000000200000005" + "00000001" + "78"),
    (2, Eof(), "505901160000000200000000"),
    (3, Grant(1), "505901170000000300000004" + "00000001"),
    (
        3,
        ReadFile(b"/f", 1, 2, 3),
        "50590118000000030000001a000000022f6600000000000000010000000000000002" + "00000003",
    ),
    (
        3,
        WriteFile(b"/f", 0o640, True, False, None, 7),
        "50590119000000030000001400000002" + "2f66000001a00100ffffffff00000007",
    ),
    (3, Stat(b"/"), "5059011a0000000300000005000000012f"),
    (3, ListDir(b"/", True, 10, 20), "5059011b000000030000000e000000012f010000000a00000014"),
    (3, Cancel(), "5059011c0000000300000000"),
    (
        4,
        Init2(
            5,
            b"",
            (),
            "/w",
            NetConfig(
                (Interface("eth0", "10.0.2.15", 24, "10.0.2.2"),),
                ("10.0.2.3",),
                ("t",),
                (HostEntry("10.0.2.2", "h"),),
            ),
        ),
        "5059011d000000040000005e"
        "0000000000000005"
        "00000000"
        "00000000"
        "000000022f77"
        "01"
        "00000001"
        "0000000465746830"
        "000000040a00020f"
        "18"
        "000000040a000202"
        "00000000"
        "00000001"
        "000000040a000203"
        "00000001"
        "0000000174"
        "00000001"
        "000000040a000202"
        "0000000168",
    ),
]


def test_frozen_covers_every_v2_type() -> None:
    assert {encode(r, m)[3] for r, m, _ in FROZEN} == {int(t) for t in V2_TYPES}


@pytest.mark.parametrize(("request_id", "message", "hexed"), FROZEN)
def test_frozen_wire_format(request_id: int, message: Message, hexed: str) -> None:
    assert encode(request_id, message).hex() == hexed
    assert FrameDecoder().feed(bytes.fromhex(hexed)) == [(request_id, message)]


MALFORMED: list[tuple[bytes, str]] = [
    (frame(7, b"\x00\x00\x00"), "truncated"),
    (frame(8, b(b"x" * (MAX_DATA_CHUNK + 1))), "limit"),
    (frame(21, b(b"x" * (MAX_DATA_CHUNK + 1))), "limit"),
    (frame(9, stat_bytes(kind=0) + b"\x00" * 9), "file type"),
    (frame(9, stat_bytes(kind=8) + b"\x00" * 9), "file type"),
    (frame(9, stat_bytes(mode=0o10000) + b"\x00" * 9), "mode"),
    (frame(9, stat_bytes(kind=3) + b"\x00" * 9), "link_target"),  # symlink without target
    (frame(9, stat_bytes(kind=1, target=b"x") + b"\x00" * 9), "link_target"),
    (frame(9, stat_bytes(kind=3, target=b"a\x00b") + b"\x00" * 9), "NUL"),
    (frame(9, stat_bytes(kind=3, target=b"x" * (MAX_PATH + 1)) + b"\x00" * 9), "limit"),
    (frame(9, stat_bytes() + b"\x00" * 8 + b"\x02"), "0 or 1"),
    (frame(11, stat_bytes() + b"\x00"), "trailing"),
    (frame(12, struct.pack(">I", 1) + b(b"a/../b") + stat_bytes()), "relative"),
    (frame(12, struct.pack(">I", 1) + b(b"/abs") + stat_bytes()), "relative"),
    (frame(12, struct.pack(">I", 1) + b(b"a//b") + stat_bytes()), "relative"),
    (frame(12, struct.pack(">I", 1) + b(b"..") + stat_bytes()), "relative"),
    (frame(12, struct.pack(">I", 1) + b(b"a/") + stat_bytes()), "relative"),
    (frame(12, struct.pack(">I", 1) + b(b"") + stat_bytes() + b"\x00"), "empty"),
    (frame(12, struct.pack(">I", 1) + b(b"a\x00") + stat_bytes()), "NUL"),
    (frame(12, struct.pack(">I", 1) + b(b"x" * (MAX_PATH + 1)) + stat_bytes()), "bytes"),
    (frame(12, struct.pack(">I", 2**32 - 1)), "count"),
    (frame(13, b"\x00" * 4 + b"\x05"), "0 or 1"),
    (frame(20, b"\x00" * 12 + b"\xff" * 8 + b"\x00" * 5), "real ids"),
    (frame(20, b"\x00" * 24 + b"\x00" + b(b"/") + b"\x00" * 8), "empty"),
    (frame(20, b"\x00" * 24 + b"\x02"), "0 or 1"),
    (frame(24, b(b"") + b"\x00" * 20), "empty"),
    (frame(24, b(b"/a\x00") + b"\x00" * 20), "NUL"),
    (frame(25, b(b"/a") + struct.pack(">I", 0o10000) + b"\x00" * 10), "mode"),
    (frame(27, b(b"/") + b"\x00" + struct.pack(">I", MAX_LIST_ENTRIES + 1) + b"\x00" * 4), "limit"),
    (frame(29, b"\x00" * 8 + b(b"") + b"\x00" * 4 + b(b"") + b"\x02"), "0 or 1"),
    (
        frame(29, b"\x00" * 8 + b(b"") + b"\x00" * 4 + b(b"") + b"\x01" + b"\x00" * 12 + b"\x00"),
        "truncated",
    ),
]


def _net(
    iface: bytes = b"", servers: bytes = b"", search: bytes = b"", hosts: bytes = b""
) -> bytes:
    head = b"\x00" * 8 + b(b"") + b"\x00" * 4 + b(b"") + b"\x01"
    parts = [iface, servers, search, hosts]
    return frame(29, head + b"".join(p if p else struct.pack(">I", 0) for p in parts))


def _iface(name: bytes, addr: bytes, prefix: int, gw: bytes) -> bytes:
    return struct.pack(">I", 1) + b(name) + b(addr) + bytes([prefix]) + b(gw) + b"\x00" * 4


MALFORMED += [
    (_net(iface=_iface(b"", b"\x0a\x00\x00\x01", 8, b"")), "interface name"),
    (_net(iface=_iface(b"a/b", b"\x0a\x00\x00\x01", 8, b"")), "interface name"),
    (_net(iface=_iface(b"x" * 16, b"\x0a\x00\x00\x01", 8, b"")), "interface name"),
    (_net(iface=_iface(b"eth0", b"\x0a\x00\x00", 8, b"")), "IP address"),
    (_net(iface=_iface(b"eth0", b"\x00" * 16, 8, b"")), "IP address"),
    (_net(iface=_iface(b"eth0", b"\x0a\x00\x00\x01", 33, b"")), "limit"),
    (_net(iface=_iface(b"eth0", b"\x0a\x00\x00\x01", 8, b"\x0a\x00")), "IPv4"),
    (_net(servers=struct.pack(">I", 1) + b(b"\x01" * 5)), "IP address"),
    (_net(search=struct.pack(">I", 1) + b(b"a b")), "host name"),
    (_net(search=struct.pack(">I", 7) + b(b"a") * 7), "limit is 6"),
    (_net(hosts=struct.pack(">I", 65) + (b(b"\x01" * 4) + b(b"h")) * 65), "limit is 64"),
    (_net(hosts=struct.pack(">I", 1) + b(b"\x01" * 4) + b(b"evil\nline")), "host name"),
]


@pytest.mark.parametrize(("data", "needle"), MALFORMED)
def test_malformed_input_raises_protocol_error(data: bytes, needle: str) -> None:
    decoder = FrameDecoder()
    with pytest.raises(GuestProtocolError, match=needle):
        decoder.feed(data)


BAD_ENCODE: list[Message] = [
    Credit(-1),
    Grant(2**32),
    ReadData(b"x" * (MAX_DATA_CHUNK + 1)),
    Data("text"),  # type: ignore[arg-type]
    ReadEnd(FileStat(FileKind.FILE, 0o644, 0, 0, 0, 0, b"t"), 0, False),
    ReadEnd(FileStat(FileKind.SYMLINK, 0o777, 0, 0, 0, 0), 0, False),
    StatResult(FileStat(9, 0, 0, 0, 0, 0)),  # type: ignore[arg-type]
    StatResult(FileStat(FileKind.FILE, 0o10000, 0, 0, 0, 0)),
    StatResult(FileStat(FileKind.FILE, 0, 0, 0, 0, 2**63)),
    Entries((DirEntry(b"../x", FILE),)),
    Entries((DirEntry(b"/x", FILE),)),
    Entries(("x",)),  # type: ignore[arg-type]
    Exec2((), "/", (), 0, 0, 0),
    Exec2(("ls",), "/", (), 0, 0, 0, uid=2**32 - 1),
    Exec2(("ls",), "/", (), 0, 0, 0, groups=(-1,)),
    Exec2(("ls",), "/", (), 0, 0, 0, stdin=1),  # type: ignore[arg-type]
    ReadFile(b""),
    ReadFile(b"/a\x00b"),
    ReadFile("/etc/passwd"),  # type: ignore[arg-type]
    ReadFile(b"/" * (MAX_PATH + 1)),
    WriteFile(b"/x", mode=0o10000),
    WriteFile(b"/x", uid=2**32 - 1),
    ListDir(b"/", max_entries=MAX_LIST_ENTRIES + 1),
    Stat(b""),
    Init2(0, b"", network="eth0"),  # type: ignore[arg-type]
    Init2(0, b"", network=NetConfig((Interface("eth0", "2001:db8::1", 64),))),
    Init2(0, b"", network=NetConfig((Interface("eth0", "10.0.0.1", 33),))),
    Init2(0, b"", network=NetConfig((Interface("a-very-long-ifname", "10.0.0.1", 8),))),
    Init2(0, b"", network=NetConfig((Interface("eth0", "10.0.0.1", 8, "nope"),))),
    Init2(0, b"", network=NetConfig(nameservers=("1.2.3",))),
    Init2(0, b"", network=NetConfig(search=("a b",))),
    Init2(0, b"", network=NetConfig(nameservers=("10.0.0.1",) * 17)),
    Init2(0, b"", network=NetConfig(search=("a",) * 7)),
    Init2(0, b"", network=NetConfig(search="example.test")),  # type: ignore[arg-type]
    Init2(0, b"", network=NetConfig(hosts=(HostEntry("1.2.3.4", "x\n1.1.1.1 y"),))),
]


@pytest.mark.parametrize("message", BAD_ENCODE)
def test_encode_rejects_bad_values(message: Message) -> None:
    with pytest.raises(InvalidInputError):
        encode(1, message)


# ------------------------------------------------------------------ fuzzing

_u32 = st.integers(0, 2**32 - 1)
_u64 = st.integers(0, 2**64 - 1)
_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=6)
_path = st.binary(min_size=1, max_size=12).filter(lambda p: b"\x00" not in p)
_name = (
    st.lists(
        st.binary(min_size=1, max_size=5).filter(lambda p: b"\x00" not in p and b"/" not in p),
        min_size=1,
        max_size=3,
    )
    .map(b"/".join)
    .filter(lambda n: all(c not in (b".", b"..") for c in n.split(b"/")))
)
_ipv4 = st.integers(0, 2**32 - 1).map(lambda n: ".".join(str(b) for b in n.to_bytes(4, "big")))
_ip = st.one_of(
    _ipv4, st.binary(min_size=16, max_size=16).map(lambda raw: ipaddress.ip_address(raw).compressed)
)
_host = st.text("abcXYZ019.-_", min_size=1, max_size=8)


@st.composite
def _stats(draw: st.DrawFn) -> FileStat:
    kind = draw(st.sampled_from(list(FileKind)))
    target = draw(_path) if kind == FileKind.SYMLINK else b""
    return FileStat(
        kind,
        draw(st.integers(0, 0o7777)),
        draw(_u32),
        draw(_u32),
        draw(_u64),
        draw(st.integers(-(2**63), 2**63 - 1)),
        target,
    )


_netconfigs = st.builds(
    NetConfig,
    st.lists(
        st.builds(
            Interface,
            st.text("abcdef0123", min_size=1, max_size=15),
            _ipv4,
            st.integers(0, 32),
            st.one_of(st.none(), _ipv4),
            _u32,
        ),
        max_size=2,
    ).map(tuple),
    st.lists(_ip, max_size=2).map(tuple),
    st.lists(_host, max_size=2).map(tuple),
    st.lists(st.builds(HostEntry, _ip, _host), max_size=2).map(tuple),
)

_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Credit, _u32),
    st.builds(Grant, _u32),
    st.builds(ReadData, st.binary(max_size=64)),
    st.builds(Data, st.binary(max_size=64)),
    st.builds(ReadEnd, _stats(), _u64, st.booleans()),
    st.builds(WriteEnd, _stats(), _u64),
    st.builds(StatResult, _stats()),
    st.builds(Entries, st.lists(st.builds(DirEntry, _name, _stats()), max_size=3).map(tuple)),
    st.builds(ListEnd, _u32, st.booleans()),
    st.builds(
        Exec2,
        st.lists(_text, min_size=1, max_size=3).map(tuple),
        _text,
        st.lists(_text, max_size=3).map(tuple),
        _u32,
        _u32,
        _u32,
        st.integers(0, 2**32 - 2),
        st.integers(0, 2**32 - 2),
        st.lists(_u32, max_size=3).map(tuple),
        st.booleans(),
        _u32,
    ),
    st.just(Eof()),
    st.just(Cancel()),
    st.builds(ReadFile, _path, _u64, _u64, _u32),
    st.builds(
        WriteFile,
        _path,
        st.integers(0, 0o7777),
        st.booleans(),
        st.booleans(),
        st.one_of(st.none(), st.integers(0, 2**32 - 2)),
        st.one_of(st.none(), st.integers(0, 2**32 - 2)),
    ),
    st.builds(Stat, _path),
    st.builds(ListDir, _path, st.booleans(), st.integers(0, MAX_LIST_ENTRIES), _u32),
    st.builds(
        Init2,
        _u64,
        st.binary(max_size=16),
        st.lists(st.builds(Mount, _text, _text, _text, st.booleans()), max_size=2).map(tuple),
        _text,
        st.one_of(st.none(), _netconfigs),
    ),
)


@given(st.lists(st.tuples(_u32, _messages), max_size=5), st.integers(1, 64))
@settings(max_examples=800, deadline=None)
def test_fuzz_round_trip(items: list[tuple[int, Message]], chunk: int) -> None:
    stream = b"".join(encode(rid, m) for rid, m in items)
    decoder = FrameDecoder()
    got: list[tuple[int, Message]] = []
    for i in range(0, len(stream), chunk):
        got += decoder.feed(stream[i : i + chunk])
    assert got == items


@given(st.binary(max_size=80))
@settings(max_examples=1500, deadline=None)
def test_fuzz_random_payloads_behind_v2_headers(payload: bytes) -> None:
    for mtype in V2_TYPES:
        _only_protocol_errors(frame(int(mtype), payload, request_id=3))


@given(
    st.sampled_from([encode(rid, m) for rid, m in SAMPLES if len(encode(rid, m)) < 2000]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-3, 3),
)
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_frames(original: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    _only_protocol_errors(mutate(original, flips, cut))


# ------------------------------------------------- the version check at connect


class _OneHello:
    def __init__(self, hello: bytes) -> None:
        self.data = [hello]

    def read(self, size: int) -> bytes:
        return self.data.pop(0) if self.data else b""

    def write(self, data: bytes) -> None:
        pass


def test_a_version_1_agent_is_refused_with_the_fix() -> None:
    from pyro_mcp.guest.protocol import PROTOCOL_VERSION, Hello

    channel = AgentChannel(_OneHello(encode(0, Hello(1, "1.old", 5))))
    with pytest.raises(GuestProtocolError, match=r"speaks protocol 1.*stale") as info:
        channel.wait_hello(5)
    assert info.value.hint is not None and "initramfs" in info.value.hint
    ok = AgentChannel(_OneHello(encode(0, Hello(PROTOCOL_VERSION, "2.new", 5))))
    assert ok.wait_hello(5).protocol_version == 2


# ------------------------------------- the host's stream helpers against a lying guest


class _ScriptedGuest:
    """Answers the first request the host writes with prepared frames for its id."""

    def __init__(self, replies: list[Message]) -> None:
        import threading

        self.replies = replies
        self.request_id: int | None = None
        self.ready = threading.Event()
        self.written: list[bytes] = []
        self.sent = False

    def read(self, size: int) -> bytes:
        if self.sent:
            self.ready.wait(5)
            return b""  # then EOF
        self.ready.wait(5)
        self.sent = True
        assert self.request_id is not None
        return b"".join(encode(self.request_id, m) for m in self.replies)

    def write(self, data: bytes) -> None:
        self.written.append(data)
        if self.request_id is None:
            self.request_id = struct.unpack(">I", data[4:8])[0]
            self.ready.set()


def _channel(replies: list[Message]) -> tuple[AgentChannel, _ScriptedGuest]:
    guest = _ScriptedGuest(replies)
    return AgentChannel(guest), guest


def test_read_past_the_granted_window_is_a_protocol_error() -> None:
    # 400 bytes (no GRANT due yet: under half the window), then 700 with 600 left
    channel, _ = _channel([ReadData(b"x" * 400), ReadData(b"x" * 700)])
    with pytest.raises(GuestProtocolError, match="flow control"):
        channel.read_file(ReadFile(b"/f", window=1000), lambda data: None, 5)


def test_list_with_more_entries_than_asked_or_a_wrong_count_is_refused() -> None:
    entry = DirEntry(b"a", FILE)
    channel, _ = _channel([Entries((entry, entry, entry))])
    with pytest.raises(GuestProtocolError, match="more entries"):
        channel.list_dir(ListDir(b"/", max_entries=2), 5)
    channel, _ = _channel([Entries((entry,)), ListEnd(5, False)])
    with pytest.raises(GuestProtocolError, match="count"):
        channel.list_dir(ListDir(b"/"), 5)


def test_a_guest_that_answers_a_read_with_something_else_is_refused() -> None:
    channel, _ = _channel([WriteEnd(FILE, 1)])
    with pytest.raises(GuestProtocolError, match="unexpected WriteEnd"):
        channel.read_file(ReadFile(b"/f"), lambda data: None, 5)


def test_a_guest_that_goes_quiet_or_away_mid_stream_is_an_error() -> None:
    channel, _ = _channel([ReadData(b"partial")])  # then EOF: the channel closes
    with pytest.raises(GuestProtocolError):
        channel.read_file(ReadFile(b"/f"), lambda data: None, 5)


def test_write_waits_for_credit_and_sends_only_what_was_offered() -> None:
    channel, guest = _channel([Credit(10), WriteEnd(FILE, 10)])
    # 25 bytes with 10 of credit: the helper sends 10 and waits; the lying guest then
    # answers WRITE_END (no more credit), which the helper must not take as success.
    with pytest.raises(GuestProtocolError, match="unexpected WriteEnd"):
        channel.write_file(WriteFile(b"/f"), [b"y" * 10, b"z" * 15], 5)
    sent = FrameDecoder().feed(b"".join(guest.written))
    assert [m for _, m in sent] == [WriteFile(b"/f"), Data(b"y" * 10)]


_guest_replies = st.lists(
    st.one_of(
        _messages.filter(lambda m: encode(1, m)[3] in GUEST_TO_HOST),
        st.builds(ReadData, st.binary(max_size=3000)),
        st.just(Credit(100)),
    ),
    max_size=6,
)


@given(_guest_replies)
@settings(max_examples=300, deadline=None)
def test_fuzz_stream_helpers_against_any_guest_replies(replies: list[Message]) -> None:
    """Whatever a guest answers, each helper returns its final frame or raises
    GuestProtocolError; nothing else escapes, and a read never exceeds its window."""

    received = bytearray()
    calls: list[tuple[Callable[[AgentChannel], object], tuple[type, ...]]] = [
        (lambda ch: ch.read_file(ReadFile(b"/f", window=4096), received.extend, 2), (ReadEnd,)),
        (lambda ch: ch.write_file(WriteFile(b"/f"), [b"d" * 150], 2), (WriteEnd,)),
        (lambda ch: ch.list_dir(ListDir(b"/", max_entries=3, window=4096), 2)[1], (ListEnd,)),
        (lambda ch: ch.stat(b"/f", 2), (FileStat,)),
    ]
    for call, final in calls:
        channel = AgentChannel(_ScriptedGuest(list(replies)))
        with contextlib.suppress(GuestProtocolError):
            assert isinstance(call(channel), (*final, Error))
    assert len(received) <= 4096 * 2  # the window, plus one grant of half of it
