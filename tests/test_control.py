"""The manager <-> supervisor control protocol (pyro_mcp.control): wire format,
strict decoding, error classes kept across the hop, the launch record, and the
supervisor's import budget."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_mcp import control as c
from pyro_mcp import errors
from pyro_mcp.errors import InvalidInputError, PyroError, StateError, VMStateError
from pyro_mcp.state import ProcessId, write_json_atomic

EXEC = c.ExecRequest(("sh", "-lc", "true"), "/root", ("PATH=/bin",), 30000, 1024, 2048)
MESSAGES: list[c.Message] = [
    EXEC,
    c.ExecRequest(("cat",), "/", (), 0, 1024, 1024, stdin=True),
    c.ExecRequest(("cat",), "/", (), 0, 1024, 1024, stream=True),
    c.Output(c.STDOUT, b"\xff\x00out"),
    c.Output(c.STDERR, b"e" * c.MAX_OUTPUT_CHUNK),
    c.PingRequest(),
    c.ShutdownRequest("deleted"),
    c.Heartbeat(1500),
    c.Ok(),
    c.ExecDone(0, 0, False, True, False, 12, b"\xff\x00out", b"err"),
    c.Ready("restored", 290, ProcessId(10, 20), None),
]


def test_wire_format_is_frozen() -> None:
    assert c.encode(EXEC) == (
        b'{"v":1,"type":"exec","argv":["sh","-lc","true"],"cwd":"/root","env":["PATH=/bin"],'
        b'"timeout_ms":30000,"stdout_cap":1024,"stderr_cap":2048,"stdin":false,'
        b'"stream":false}\n'
    )
    assert c.encode(c.Output(2, b"\x00hi")) == b'{"v":1,"type":"output","stream":2,"b64":"AGhp"}\n'

    assert c.encode(c.Heartbeat(7)) == b'{"v":1,"type":"heartbeat","elapsed_ms":7}\n'
    assert c.encode(c.StdinData(b"\x00hi")) == b'{"v":1,"type":"stdin","b64":"AGhp"}\n'
    assert c.encode(c.StdinEof()) == b'{"v":1,"type":"stdin_eof"}\n'


def test_an_exec_request_without_stdin_field_has_no_stdin() -> None:
    """The requests of a pyro-mcp from before stdin existed still decode."""
    line = (
        b'{"v":1,"type":"exec","argv":["x"],"cwd":"/","env":[],"timeout_ms":1,'
        b'"stdout_cap":1,"stderr_cap":1}'
    )
    assert c.decode_request(line) == c.ExecRequest(("x",), "/", (), 1, 1, 1, stdin=False)
    decoded = c.decode_request(line)
    assert isinstance(decoded, c.ExecRequest) and not decoded.stream  # output in exec_done


def test_an_output_event_out_of_bounds_is_not_encoded() -> None:
    for stream, data in ((1, b""), (1, b"x" * (c.MAX_OUTPUT_CHUNK + 1)), (3, b"x")):
        with pytest.raises(InvalidInputError):
            c.encode(c.Output(stream, data))


@pytest.mark.parametrize("message", [c.StdinData(b"\xff" * c.MAX_STDIN_CHUNK), c.StdinEof()])
def test_stdin_messages_round_trip(message: c.StdinMessage) -> None:
    line = c.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert c.decode_stdin(line) == message


def test_a_stdin_chunk_out_of_bounds_is_not_encoded() -> None:
    for data in (b"", b"x" * (c.MAX_STDIN_CHUNK + 1)):
        with pytest.raises(InvalidInputError):
            c.encode(c.StdinData(data))


@pytest.mark.parametrize(
    "line",
    [
        b'{"v":1,"type":"stdin"}',  # no data
        b'{"v":1,"type":"stdin","b64":""}',  # empty chunk
        b'{"v":1,"type":"stdin","b64":"!!"}',  # not base64
        b'{"v":1,"type":"stdin","b64":5}',
        b'{"v":2,"type":"stdin","b64":"AA=="}',  # another version
        b'{"v":1,"type":"stdin_end"}',  # unknown type
        b'{"v":1,"type":"ping"}',  # a request where stdin was expected
        b"not json",
        b'{"v":1,"type":"stdin","b64":"'
        + base64.b64encode(b"x" * (c.MAX_STDIN_CHUNK + 1))
        + b'"}',  # over the chunk size
    ],
)
def test_bad_stdin_messages_are_refused(line: bytes) -> None:
    with pytest.raises(InvalidInputError, match="bad control stdin message"):
        c.decode_stdin(line)


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_round_trip(message: c.Message) -> None:
    line = c.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    decoded = (
        c.decode_request(line)
        if isinstance(message, c.ExecRequest | c.PingRequest | c.ShutdownRequest)
        else c.decode_event(line)
    )
    assert decoded == message


@pytest.mark.parametrize(
    "line",
    [
        b"not json",
        b"[]",
        b'{"type":"ping"}',  # no version
        b'{"v":2,"type":"ping"}',  # another version
        b'{"v":1,"type":"reboot"}',  # unknown type
        b'{"v":1}',
        b'{"v":1,"type":"exec","argv":[],"cwd":"/","env":[],"timeout_ms":1,'
        b'"stdout_cap":1,"stderr_cap":1}',
        b'{"v":1,"type":"exec","argv":["x"],"cwd":"/","env":[],"timeout_ms":true,'
        b'"stdout_cap":1,"stderr_cap":1}',
        b'{"v":1,"type":"exec","argv":["x"],"cwd":"/","env":[1],"timeout_ms":1,'
        b'"stdout_cap":1,"stderr_cap":1}',
        b'{"v":1,"type":"exec","argv":["x"],"cwd":"/","env":[],"timeout_ms":-1,'
        b'"stdout_cap":1,"stderr_cap":1}',
        b'{"v":1,"type":"exec","argv":["x"],"cwd":"/","env":[],"timeout_ms":1,'
        b'"stdout_cap":1,"stderr_cap":1,"stdin":1}',  # stdin must be a bool
        b'{"v":1,"type":"exec","argv":["x"],"cwd":"/","env":[],"timeout_ms":1,'
        b'"stdout_cap":1,"stderr_cap":1,"stream":"yes"}',  # stream must be a bool
        b'{"v":1,"type":"shutdown"}',
    ],
)
def test_bad_requests_are_refused(line: bytes) -> None:
    with pytest.raises(InvalidInputError, match="bad control request"):
        c.decode_request(line)


@pytest.mark.parametrize(
    "line",
    [
        b'{"v":1,"type":"exec_done","exit_code":0}',
        b'{"v":1,"type":"exec_done","exit_code":0,"signal":0,"timed_out":false,'
        b'"stdout_truncated":false,"stderr_truncated":false,"duration_ms":1,'
        b'"stdout_b64":"@@@","stderr_b64":""}',
        b'{"v":1,"type":"failed","error":"boom"}',
        b'{"v":1,"type":"output","stream":3,"b64":"AA=="}',  # no such stream
        b'{"v":1,"type":"output","stream":1,"b64":""}',  # empty
        b'{"v":1,"type":"output","stream":1}',
        b'{"v":1,"type":"ready","boot":"cold","boot_ms":1,"supervisor":{"pid":"x"},"vmm":null}',
        b'{"v":0,"type":"ok"}',
    ],
)
def test_unreadable_events_name_a_version_mismatch(line: bytes) -> None:
    with pytest.raises(VMStateError, match="unreadable message") as caught:
        c.decode_event(line)
    assert caught.value.hint is not None and "another pyro-mcp version" in caught.value.hint


def _all_error_classes() -> list[type[PyroError]]:
    found: list[type[PyroError]] = []
    todo: list[type[PyroError]] = [PyroError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", _all_error_classes(), ids=lambda cls: cls.__name__)
def test_errors_keep_their_class_and_code(cls: type[PyroError]) -> None:
    sent = cls("it broke", hint="do this", details={"console_tail": "x"})
    event = c.decode_event(c.encode(c.Failed(sent)))
    assert isinstance(event, c.Failed)
    got = event.error
    # A subclass that shares its parent's code (no code of its own) comes back as the
    # parent; every class with a code of its own comes back as itself.
    owner = next(k for k in _all_error_classes() if k.code == cls.code)
    assert type(got) is owner
    assert (got.code, got.message, got.hint, got.details) == (
        sent.code,
        "it broke",
        "do this",
        {"console_tail": "x"},
    )


def test_an_unknown_error_code_is_kept() -> None:
    got = c.error_from_dict({"code": "from_the_future", "message": "m"})
    assert type(got) is PyroError and got.code == "from_the_future"
    assert got.to_dict()["code"] == "from_the_future"
    assert isinstance(c.error_from_dict({"code": "boot_failed", "message": "m"}), errors.BootError)


def _launch() -> c.Launch:
    return c.Launch(
        backend="qemu",
        acceleration="tcg",
        kernel="/k",
        initramfs="/i",
        rootfs="/r",
        agent=None,
        vcpu_count=1,
        mem_mib=512,
        network=False,
        expires_at=1e9,
        owner=ProcessId(1, 2),
        boot_timeout=90.0,
        mounts=(c.MountSpec("/dev/vdb", "/workspace", "ext4"),),
        restore=("/snap", "key"),
    )


def test_launch_record_round_trips_through_the_record_reader(tmp_path: Path) -> None:
    launch = _launch()
    launch.write(tmp_path / "launch.json")
    assert json.loads((tmp_path / "launch.json").read_text())["schema"] >= 1
    assert c.Launch.read(tmp_path / "launch.json") == launch


@pytest.mark.parametrize(
    "change",
    [
        {"vcpu_count": "1"},
        {"network": 0},
        {"restore": ["only-one"]},
        {"mounts": [{"source": "/dev/vdb"}]},
        {"expires_at": None},
        {"kernel": 5},
    ],
)
def test_a_malformed_launch_record_is_a_state_error(
    tmp_path: Path, change: dict[str, object]
) -> None:
    data = {**_launch().to_dict(), **change}
    write_json_atomic(tmp_path / "launch.json", data)
    with pytest.raises(StateError, match="malformed"):
        c.Launch.read(tmp_path / "launch.json")


def test_a_launch_record_of_another_schema_is_refused(tmp_path: Path) -> None:
    (tmp_path / "launch.json").write_text(json.dumps({"schema": 0, **_launch().to_dict()}))
    with pytest.raises(StateError, match="schema"):
        c.Launch.read(tmp_path / "launch.json")


HEAVY = ("pydantic", "mcp", "click", "rich", "platformdirs", "httpx", "anyio")


def test_supervisor_import_budget() -> None:
    """The supervisor starts once per VM: its import path stays small (no pydantic,
    no CLI or MCP libraries). Module counts, not seconds: timings are noise here."""
    code = (
        "import sys, json; before = set(sys.modules); import pyro_mcp.supervisor; "
        "import pyro_mcp.vmm.qemu; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    heavy = sorted({name.split(".")[0] for name in loaded} & set(HEAVY))
    assert heavy == [], f"the supervisor imports {heavy}"
    ours = [name for name in loaded if name.startswith("pyro_mcp")]
    assert len(ours) <= 20, ours
    assert len(loaded) <= 160, len(loaded)
