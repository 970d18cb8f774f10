"""The host-side codec of the guest wire protocol (no VM, no agent binary)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_mcp.errors import GuestProtocolError, InvalidInputError
from pyro_mcp.guest.protocol import (
    FRAME_VERSION,
    GUEST_TO_HOST,
    HEADER_LEN,
    MAX_ENTROPY,
    MAX_OUTPUT_CHUNK,
    MAX_PAYLOAD,
    PROTOCOL_VERSION,
    Error,
    Exec,
    Exit,
    FrameDecoder,
    Hello,
    Init,
    InitOk,
    Message,
    Mount,
    MsgType,
    Output,
    Ping,
    Pong,
    Signal,
    encode,
)

SAMPLES: list[tuple[int, Message]] = [
    (0, Hello(1, "1.0123456789ab", 1234)),
    (1, InitOk()),
    (2, Output(1, b"hello\n")),
    (2, Output(2, b"")),
    (2, Output(2, b"\xff" * MAX_OUTPUT_CHUNK)),
    (3, Exit(0, 0, False, False, False, 0)),
    (3, Exit(-(2**31), 2**31 - 1, True, True, True, 2**64 - 1)),
    (4, Error(2, "cwd /x: No such file or directory")),
    (4, Error(0, "")),
    (5, Pong()),
    (6, Init(0, b"")),
    (6, Init(2**64 - 1, b"\x00" * MAX_ENTROPY, (Mount("tmpfs", "/mnt/a", "tmpfs", True),))),
    (
        7,
        Exec(("sh", "-c", "echo hi"), "/tmp", ("PATH=/bin", "LANG=C.UTF-8"), 5000, 1024, 512),
    ),
    (7, Exec(("päth ünïcode ✓",), "/", (), 0, 0, 2**32 - 1)),
    (2**32 - 1, Signal(15)),
    (8, Ping()),
]


def decode_all(data: bytes) -> list[tuple[int, Message]]:
    return FrameDecoder().feed(data)


def frame(mtype: int, payload: bytes, request_id: int = 1, version: int = 1) -> bytes:
    return struct.pack(">2sBBII", b"PY", version, mtype, request_id, len(payload)) + payload


@pytest.mark.parametrize(("request_id", "message"), SAMPLES)
def test_round_trip(request_id: int, message: Message) -> None:
    data = encode(request_id, message)
    assert decode_all(data) == [(request_id, message)]


def test_every_v1_message_type_is_sampled() -> None:
    sampled = {type(m) for _, m in SAMPLES}
    assert sampled == {Hello, InitOk, Output, Exit, Error, Pong, Init, Exec, Signal, Ping}
    v1 = {1, 2, 3, 4, 5, 6, 16, 17, 18, 19}
    assert v1 <= {int(t) for t in MsgType}  # version 2 adds types (tests/test_protocol_v2.py)


# Frozen wire format: changing any of these is a protocol change (bump PROTOCOL_VERSION
# and docs/protocol.md, and rebuild the agent).
FROZEN: list[tuple[int, Message, str]] = [
    (
        0,
        Hello(1, "1.abc", 1234),
        "5059010100000000000000150000000100000005312e61626300000000000004d2",
    ),
    (7, Output(1, b"hi\n"), "505901030000000700000008010000000368690a"),
    (
        7,
        Exit(-1, 9, True, False, True, 1500),
        "505901040000000700000013ffffffff0000000901000100000000000005dc",
    ),
    (
        42,
        Exec(("sh", "-c", "echo hi"), "/tmp", ("PATH=/bin",), 5000, 1024, 512),
        "505901110000002a00000040000013880000040000000200000000042f746d70000000030000"
        "00027368000000022d63000000076563686f2068690000000100000009504154483d2f62696e",
    ),
    (
        3,
        Init(10**18, b"\x01\x02", (Mount("tmpfs", "/mnt", "tmpfs", True),)),
        "50590110000000030000002d0de0b6b3a76400000000000201020000000100000005746d7066"
        "73000000042f6d6e7400000005746d70667301",
    ),
    (
        5,
        Error(2, "cwd /x: No such file or directory"),
        "5059010500000005000000290000000200000021637764202f783a204e6f2073756368206669"
        "6c65206f72206469726563746f7279",
    ),
    (9, Ping(), "505901130000000900000000"),
    (9, Pong(), "505901060000000900000000"),
    (1, InitOk(), "505901020000000100000000"),
    (42, Signal(15), "505901120000002a000000040000000f"),
]


@pytest.mark.parametrize(("request_id", "message", "hexed"), FROZEN)
def test_frozen_wire_format(request_id: int, message: Message, hexed: str) -> None:
    assert FRAME_VERSION == 1  # the header byte; HELLO announces PROTOCOL_VERSION
    assert PROTOCOL_VERSION == 2
    assert MAX_PAYLOAD == 262144
    assert encode(request_id, message).hex() == hexed
    assert decode_all(bytes.fromhex(hexed)) == [(request_id, message)]


def test_decoder_byte_by_byte() -> None:
    stream = b"".join(encode(rid, m) for rid, m in SAMPLES)
    decoder = FrameDecoder()
    got: list[tuple[int, Message]] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
        assert decoder.buffered <= HEADER_LEN + MAX_PAYLOAD
    assert got == SAMPLES
    assert decoder.buffered == 0


@pytest.mark.parametrize("size", [1, 5, 11, 12, 13, 100, 4096, 70000])
def test_decoder_arbitrary_splits(size: int) -> None:
    stream = b"".join(encode(rid, m) for rid, m in SAMPLES)
    decoder = FrameDecoder()
    got: list[tuple[int, Message]] = []
    for i in range(0, len(stream), size):
        got += decoder.feed(stream[i : i + size])
    assert got == SAMPLES


def test_decoder_many_frames_in_one_feed() -> None:
    stream = encode(1, Ping()) * 1000
    assert len(FrameDecoder().feed(stream)) == 1000


def test_decoder_accept_filter() -> None:
    decoder = FrameDecoder(GUEST_TO_HOST)
    assert decoder.feed(encode(1, Pong())) == [(1, Pong())]
    with pytest.raises(GuestProtocolError, match="unexpected message type EXEC"):
        decoder.feed(encode(1, Exec(("true",), "/", (), 0, 0, 0)))


def s(text: bytes) -> bytes:
    return struct.pack(">I", len(text)) + text


MALFORMED: list[tuple[bytes, str]] = [
    (b"XY" + encode(1, Ping())[2:], "magic"),
    (frame(19, b"", version=2), "version"),
    (frame(14, b""), "unknown message type 14"),
    (frame(30, b""), "unknown message type 30"),
    (frame(0, b""), "unknown message type 0"),
    (struct.pack(">2sBBII", b"PY", 1, 3, 1, MAX_PAYLOAD + 1), "exceeds"),
    (struct.pack(">2sBBII", b"PY", 1, 3, 1, 2**32 - 1), "exceeds"),
    (frame(6, b"\x00"), "trailing"),
    (frame(2, b"junk"), "trailing"),
    (frame(3, b"\x03" + s(b"x")), "stream"),
    (frame(3, b"\x00" + s(b"x")), "stream"),
    (frame(3, b"\x01" + s(b"x" * (MAX_OUTPUT_CHUNK + 1))), "limit"),
    (frame(3, b"\x01" + struct.pack(">I", 10) + b"abc"), "truncated"),
    (frame(3, b"\x01" + s(b"x") + b"\x00"), "trailing"),
    (frame(4, b"\x00" * 8 + b"\x02\x00\x00" + b"\x00" * 8), "0 or 1"),
    (frame(4, b"\x00" * 18), "truncated"),
    (frame(5, struct.pack(">I", 1) + s(b"\xff\xfe")), "UTF-8"),
    (frame(5, struct.pack(">I", 1) + s(b"a\x00b")), "NUL"),
    (frame(1, struct.pack(">I", 1) + s(b"v") + b"\x00" * 8, request_id=3), "request_id"),
    (frame(1, struct.pack(">I", 1) + s(b"v") + b"\x00" * 7, request_id=0), "truncated"),
    (frame(16, b"\x00" * 8 + s(b"\x00" * (MAX_ENTROPY + 1)) + b"\x00" * 4), "limit"),
    (frame(16, b"\x00" * 8 + s(b"") + struct.pack(">I", 2**32 - 1)), "count"),
    (
        frame(16, b"\x00" * 8 + s(b"") + struct.pack(">I", 1) + s(b"a") + s(b"b") + s(b"c")),
        "truncated",
    ),
    (
        frame(
            16,
            b"\x00" * 8 + s(b"") + struct.pack(">I", 1) + s(b"a") + s(b"b") + s(b"c") + b"\x07",
        ),
        "0 or 1",
    ),
    (frame(17, b"\x00" * 12 + s(b"/") + struct.pack(">I", 0) + struct.pack(">I", 0)), "empty"),
    (frame(17, b"\x00" * 12 + s(b"/") + struct.pack(">I", 100_000)), "count"),
    (frame(17, b"\x00" * 12 + s(b"/") + struct.pack(">I", 1) + s(b"ls")), "truncated"),
    (frame(18, struct.pack(">I", 0)), "signo"),
    (frame(18, struct.pack(">I", 65)), "signo"),
    (frame(18, b"\x00\x00"), "truncated"),
]


@pytest.mark.parametrize(("data", "needle"), MALFORMED)
def test_malformed_input_raises_protocol_error(data: bytes, needle: str) -> None:
    decoder = FrameDecoder()
    with pytest.raises(GuestProtocolError, match=needle):
        decoder.feed(data)
    # the stream has no resync point: a failed decoder stays failed
    with pytest.raises(GuestProtocolError, match="already failed"):
        decoder.feed(encode(1, Ping()))


def test_oversize_header_rejected_before_payload_arrives() -> None:
    decoder = FrameDecoder()
    with pytest.raises(GuestProtocolError):
        decoder.feed(struct.pack(">2sBBII", b"PY", 1, 3, 1, MAX_PAYLOAD + 1))
    assert decoder.buffered == 0


def test_decoder_buffers_at_most_one_frame() -> None:
    decoder = FrameDecoder()
    header = struct.pack(">2sBBII", b"PY", 1, MsgType.ERROR, 1, MAX_PAYLOAD)
    decoder.feed(header)
    for _ in range(MAX_PAYLOAD // 65536 - 1):
        decoder.feed(b"\x00" * 65536)
        assert decoder.buffered <= HEADER_LEN + MAX_PAYLOAD
    # the payload is complete but malformed (error message length 0 then trailing bytes)
    with pytest.raises(GuestProtocolError):
        decoder.feed(b"\x00" * 65536 + b"PY")
    assert decoder.buffered == 0


BAD_ENCODE: list[tuple[int, object]] = [
    (-1, Ping()),
    (2**32, Ping()),
    (1, Hello(1, "v", 0)),  # HELLO must use request id 0
    (0, Hello(-1, "v", 0)),
    (0, Hello(1, "v", 2**64)),
    (0, Hello(1, "a\x00b", 0)),
    (0, Hello(1, "\ud800", 0)),
    (1, Output(3, b"")),
    (1, Output(1, b"x" * (MAX_OUTPUT_CHUNK + 1))),
    (1, Exit(2**31, 0, False, False, False, 0)),
    (1, Exit(0, 0, 1, False, False, 0)),  # type: ignore[arg-type]
    (1, Error(-1, "x")),
    (1, Init(-1, b"")),
    (1, Init(0, b"x" * (MAX_ENTROPY + 1))),
    (1, Init(0, b"", ("tmpfs",))),  # type: ignore[arg-type]
    (1, Exec((), "/", (), 0, 0, 0)),
    (1, Exec("ls", "/", (), 0, 0, 0)),  # type: ignore[arg-type]
    (1, Exec(("ls",), "/", (), 2**32, 0, 0)),
    (1, Exec(("ls",), "/", ("A=\x00",), 0, 0, 0)),
    (1, Exec(("x" * MAX_PAYLOAD,), "/", (), 0, 0, 0)),
    (1, Signal(0)),
    (1, Signal(65)),
    (1, Signal(True)),
    (1, "not a message"),
    (True, Ping()),
]


@pytest.mark.parametrize(("request_id", "message"), BAD_ENCODE)
def test_encode_rejects_bad_values(request_id: int, message: object) -> None:
    with pytest.raises(InvalidInputError):
        encode(request_id, message)  # type: ignore[arg-type]


# ------------------------------------------------------------------ fuzzing

_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))
_u32 = st.integers(0, 2**32 - 1)
_messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, _u32, _text, st.integers(0, 2**64 - 1)),
    st.just(InitOk()),
    st.builds(Output, st.sampled_from([1, 2]), st.binary(max_size=300)),
    st.builds(
        Exit,
        st.integers(-(2**31), 2**31 - 1),
        st.integers(-(2**31), 2**31 - 1),
        st.booleans(),
        st.booleans(),
        st.booleans(),
        st.integers(0, 2**64 - 1),
    ),
    st.builds(Error, _u32, _text),
    st.just(Pong()),
    st.builds(
        Init,
        st.integers(0, 2**64 - 1),
        st.binary(max_size=64),
        st.lists(st.builds(Mount, _text, _text, _text, st.booleans()), max_size=3).map(tuple),
    ),
    st.builds(
        Exec,
        st.lists(_text, min_size=1, max_size=4).map(tuple),
        _text,
        st.lists(_text, max_size=4).map(tuple),
        _u32,
        _u32,
        _u32,
    ),
    st.builds(Signal, st.integers(1, 64)),
    st.just(Ping()),
)


@given(st.lists(st.tuples(_u32, _messages), max_size=5), st.integers(1, 64))
@settings(max_examples=500, deadline=None)
def test_fuzz_round_trip(items: list[tuple[int, Message]], chunk: int) -> None:
    items = [(0 if isinstance(m, Hello) else rid, m) for rid, m in items]
    stream = b"".join(encode(rid, m) for rid, m in items)
    decoder = FrameDecoder()
    got: list[tuple[int, Message]] = []
    for i in range(0, len(stream), chunk):
        got += decoder.feed(stream[i : i + chunk])
    assert got == items


def mutate(original: bytes, flips: list[tuple[int, int]], cut: int) -> bytes:
    """``original`` with bytes overwritten at ``flips`` and ``cut`` bytes cut or added."""
    data = bytearray(original)
    for pos, value in flips:
        data[pos % len(data)] = value
    if cut < 0:
        del data[cut:]
    else:
        data += b"\x00" * cut
    return bytes(data)


def _only_protocol_errors(data: bytes) -> None:
    decoder = FrameDecoder()
    try:
        decoded = decoder.feed(data)
    except GuestProtocolError as exc:
        # the decoder's catch-all for unexpected exceptions must never be what fired
        assert "undecodable" not in exc.message
        return
    # canonical encoding: whatever the decoder accepts re-encodes to the same bytes
    reencoded = b"".join(encode(rid, m) for rid, m in decoded)
    assert data.startswith(reencoded)
    assert len(data) - len(reencoded) == decoder.buffered


@given(st.binary(max_size=200))
@settings(max_examples=3000, deadline=None)
def test_fuzz_random_bytes(data: bytes) -> None:
    _only_protocol_errors(data)


@given(st.binary(max_size=40))
@settings(max_examples=2000, deadline=None)
def test_fuzz_random_payloads_behind_valid_headers(payload: bytes) -> None:
    for mtype in MsgType:
        _only_protocol_errors(frame(int(mtype), payload, request_id=0))


@given(
    st.sampled_from([encode(rid, m) for rid, m in SAMPLES if len(encode(rid, m)) < 2000]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
    st.integers(-3, 3),
)
@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_frames(original: bytes, flips: list[tuple[int, int]], cut: int) -> None:
    _only_protocol_errors(mutate(original, flips, cut))
