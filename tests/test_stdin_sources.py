"""What the SDK takes as a command's stdin (``pyro_mcp.commands.Stdin``): every kind
of source becomes bounded chunks, read only as they are sent, once. VM-free; the
streams through real guests are in test_vm_runtime, test_tasks, test_host_compat
and test_cli."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.commands import STDIN_CHUNK, ExecOptions, Stdin
from pyro_mcp.errors import InvalidInputError


def chunks_of(source: Any) -> list[bytes]:
    stdin = Stdin.of(source)
    assert stdin is not None
    return list(stdin.chunks())


def test_every_source_becomes_bounded_chunks() -> None:
    data = bytes(range(256)) * 1000
    for source in (data, bytearray(data), memoryview(data), io.BytesIO(data), [data]):
        got = chunks_of(source)
        assert b"".join(got) == data, type(source)
        assert all(0 < len(c) <= STDIN_CHUNK for c in got)
    assert chunks_of("héllo") == ["héllo".encode()]
    assert chunks_of([b"a", b"", memoryview(b"b")]) == [b"a", b"b"]
    assert chunks_of(b"") == []
    assert Stdin.of(None) is None


def test_a_stream_is_read_only_as_it_is_consumed() -> None:
    pulled: list[int] = []

    def endless() -> Iterator[bytes]:
        n = 0
        while True:
            pulled.append(n)
            n += 1
            yield b"x"

    stdin = Stdin.of(endless())
    assert stdin is not None and pulled == []
    chunks = stdin.chunks()
    assert next(chunks) == b"x" and pulled == [0]


def test_a_stdin_is_used_once() -> None:
    stdin = Stdin.of(b"once")
    assert stdin is not None
    stdin.chunks()
    with pytest.raises(InvalidInputError, match="already used"):
        stdin.chunks()


def test_bad_sources_are_refused_with_a_hint() -> None:
    with pytest.raises(InvalidInputError) as info:
        ExecOptions.checked(stdin=42)  # type: ignore[arg-type]
    assert info.value.hint and "generator of bytes" in info.value.hint
    with pytest.raises(InvalidInputError, match="binary mode"):
        chunks_of(io.StringIO("text file"))
    with pytest.raises(InvalidInputError, match="not bytes"):
        chunks_of(["text items"])


def test_exec_options_carry_the_stdin() -> None:
    assert ExecOptions.checked().stdin is None
    opts = ExecOptions.checked(stdin="abc")
    assert opts.stdin is not None and list(opts.stdin.chunks()) == [b"abc"]


def test_stdin_goes_with_an_exec_that_asks_for_it(tmp_path: Path) -> None:
    from pyro_mcp import control, supervision

    wants = control.ExecRequest(("cat",), "/", (), 1000, 1024, 1024, stdin=True)
    for message, stdin in ((wants, None), (control.PingRequest(), [b"x"])):
        with pytest.raises(InvalidInputError, match="only with"):
            next(supervision.request(tmp_path, message, stdin))
