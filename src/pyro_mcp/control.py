"""The control protocol between a pyro process (the manager) and a VM's supervisor.

Both ends import this module; nothing else writes or parses these messages.
Transport: the supervisor's unix socket ``VM_DIR/ctl.sock``, one request per
connection, newline-delimited JSON (an exec with ``stdin`` is followed on the
same connection by its stdin: ``stdin`` chunks of at most :data:`MAX_STDIN_CHUNK`
bytes, then ``stdin_eof``; the socket's own buffer is the backpressure). Every
message is an object with ``"v"`` (:data:`CONTROL_VERSION`) and ``"type"``; a
message of another version, of an unknown type or with a missing or ill-typed
field is refused, never guessed at.

    manager -> supervisor            supervisor -> manager
    exec {argv, cwd, env, ...}       heartbeat {elapsed_ms}   (about every second)
    [stdin {b64}]* stdin_eof         [output {stream, b64}]*  (only if "stream": true)
      (only after an exec with        exec_done {exit_code, ..., stdout_b64, ...}
       "stdin": true)
    ping                             ok
    shutdown {reason}                ok
    tunnel                           ok, then guest frames (below)
    (any)                            failed {error: {code, message, hint?, details?}}

An exec with ``"stream": true`` gets its output as it comes: ``output`` events
(``stream`` 1 stdout, 2 stderr; 1 to :data:`MAX_OUTPUT_CHUNK` bytes each, within
the caps), coalesced by the supervisor (flushed every :data:`OUTPUT_FLUSH_S` or at
:data:`MAX_OUTPUT_CHUNK` bytes) and sent in the order the agent's OUTPUT frames
came, across both streams; its ``exec_done`` then carries empty ``stdout_b64`` and
``stderr_b64`` (the caller keeps what it was sent). Without it (the field absent,
as in the requests of pyro-mcp before streaming) the output comes whole in
``exec_done``.

``tunnel`` turns the connection into a relay of guest-protocol frames (the
file operations of :mod:`pyro_mcp.guest.channel`: READ_FILE, WRITE_FILE, STAT,
LIST and their DATA/EOF/GRANT/CANCEL, plus PING). After its ``ok`` line both
ends speak docs/protocol.md's framing: the supervisor decodes every frame the
manager sends (a frame of any other type ends the tunnel), gives each of the
manager's request ids one of the agent channel's own, and sends the agent's
answers back under the manager's id. Commands never go through a tunnel: they
keep ``exec``'s timeout, grace and cancellation.

At start-up the supervisor writes one line on its stdout: ``ready {...}`` or
``failed {...}``. A ``failed`` error keeps its class: the manager rebuilds the
same :class:`~pyro_mcp.errors.PyroError` subclass from its ``code``.

``launch.json`` (what the manager asks the supervisor to start) is a
:class:`Launch`, written and read through :mod:`pyro_mcp.state`'s
schema-checked record IO like every other record.

Kept light on purpose: the supervisor starts once per VM, so this module
imports no pydantic (``tests/test_control.py`` holds the import budget).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

from pyro_mcp.errors import InvalidInputError, PyroError, VMStateError
from pyro_mcp.state import ProcessId
from pyro_mcp.vmm.base import LaunchPlan, LaunchSpec, SnapshotRef

CONTROL_VERSION = 1
MAX_LINE_BYTES = 1 << 20  # a request line; results are larger (they carry the output)
MAX_STDIN_CHUNK = 64 * 1024  # data bytes in one stdin message (the agent's DATA chunk)
MAX_OUTPUT_CHUNK = 64 * 1024  # data bytes in one output event
OUTPUT_FLUSH_S = 0.05  # the longest the supervisor holds output back to coalesce it
STDOUT, STDERR = 1, 2  # an output event's ``stream``


# ----------------------------------------------------------------- requests


@dataclass(frozen=True)
class ExecRequest:
    """Run ``argv`` in the guest (the guest protocol's EXEC, relayed)."""

    argv: tuple[str, ...]
    cwd: str
    env: tuple[str, ...]  # "NAME=value" items, the command's whole environment
    timeout_ms: int
    stdout_cap: int
    stderr_cap: int
    stdin: bool = False  # True: stdin messages then stdin_eof follow; False: /dev/null
    stream: bool = False  # True: output events as it comes, exec_done without the bytes


@dataclass(frozen=True)
class PingRequest:
    """Is the supervisor serving? Answered by :class:`Ok`."""


@dataclass(frozen=True)
class ShutdownRequest:
    """Kill the VMM, answer :class:`Ok`, then exit; ``reason`` goes into exit.json."""

    reason: str = "stopped"


@dataclass(frozen=True)
class TunnelRequest:
    """Relay guest file operations over this connection (answered by :class:`Ok`)."""


Request: TypeAlias = ExecRequest | PingRequest | ShutdownRequest | TunnelRequest


@dataclass(frozen=True)
class StdinData:
    """The next bytes of an exec's stdin (1 to :data:`MAX_STDIN_CHUNK`)."""

    data: bytes


@dataclass(frozen=True)
class StdinEof:
    """The exec's stdin is complete."""


StdinMessage: TypeAlias = StdinData | StdinEof


# ------------------------------------------------------------------- events


@dataclass(frozen=True)
class Heartbeat:
    elapsed_ms: int


@dataclass(frozen=True)
class Output:
    """The next bytes (1 to :data:`MAX_OUTPUT_CHUNK`) of an exec's stdout or stderr."""

    stream: int  # STDOUT or STDERR
    data: bytes


@dataclass(frozen=True)
class Ok:
    """A ping or shutdown was done."""


@dataclass(frozen=True)
class ExecDone:
    exit_code: int
    signal: int
    timed_out: bool
    stdout_truncated: bool
    stderr_truncated: bool
    duration_ms: int
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Failed:
    """The request (or the start-up) failed with ``error``, class and code kept."""

    error: PyroError


@dataclass(frozen=True)
class Ready:
    """The supervisor's start-up line: the guest answers, ctl.sock is listening."""

    boot: str  # "cold" | "restored"
    boot_ms: int
    supervisor: ProcessId | None
    vmm: ProcessId | None


Event: TypeAlias = Heartbeat | Output | Ok | ExecDone | Failed | Ready
Message: TypeAlias = Request | StdinMessage | Event


# ----------------------------------------------------------------- encoding


def encode(message: Message) -> bytes:
    """One line (with its newline) for ``message``."""
    body: dict[str, Any]
    if isinstance(message, ExecRequest):
        body = {
            "type": "exec",
            "argv": list(message.argv),
            "cwd": message.cwd,
            "env": list(message.env),
            "timeout_ms": message.timeout_ms,
            "stdout_cap": message.stdout_cap,
            "stderr_cap": message.stderr_cap,
            "stdin": message.stdin,
            "stream": message.stream,
        }
    elif isinstance(message, StdinData):
        if not 1 <= len(message.data) <= MAX_STDIN_CHUNK:
            raise InvalidInputError(f"a stdin chunk holds 1..{MAX_STDIN_CHUNK} bytes")
        body = {"type": "stdin", "b64": base64.b64encode(message.data).decode("ascii")}
    elif isinstance(message, StdinEof):
        body = {"type": "stdin_eof"}
    elif isinstance(message, PingRequest):
        body = {"type": "ping"}
    elif isinstance(message, ShutdownRequest):
        body = {"type": "shutdown", "reason": message.reason}
    elif isinstance(message, TunnelRequest):
        body = {"type": "tunnel"}
    elif isinstance(message, Heartbeat):
        body = {"type": "heartbeat", "elapsed_ms": message.elapsed_ms}
    elif isinstance(message, Output):
        if message.stream not in (STDOUT, STDERR):
            raise InvalidInputError(f"an output event's stream is 1 or 2, not {message.stream}")
        if not 1 <= len(message.data) <= MAX_OUTPUT_CHUNK:
            raise InvalidInputError(f"an output event holds 1..{MAX_OUTPUT_CHUNK} bytes")
        body = {
            "type": "output",
            "stream": message.stream,
            "b64": base64.b64encode(message.data).decode("ascii"),
        }
    elif isinstance(message, Ok):
        body = {"type": "ok"}
    elif isinstance(message, ExecDone):
        body = {
            "type": "exec_done",
            "exit_code": message.exit_code,
            "signal": message.signal,
            "timed_out": message.timed_out,
            "stdout_truncated": message.stdout_truncated,
            "stderr_truncated": message.stderr_truncated,
            "duration_ms": message.duration_ms,
            "stdout_b64": base64.b64encode(message.stdout).decode("ascii"),
            "stderr_b64": base64.b64encode(message.stderr).decode("ascii"),
        }
    elif isinstance(message, Failed):
        body = {"type": "failed", "error": message.error.to_dict()}
    elif isinstance(message, Ready):
        body = {
            "type": "ready",
            "boot": message.boot,
            "boot_ms": message.boot_ms,
            "supervisor": message.supervisor.to_dict() if message.supervisor else None,
            "vmm": message.vmm.to_dict() if message.vmm else None,
        }
    else:  # pragma: no cover - the type checker sees every case
        raise InvalidInputError(f"not a control message: {type(message).__name__}")
    return json.dumps({"v": CONTROL_VERSION, **body}, separators=(",", ":")).encode() + b"\n"


# ----------------------------------------------------------------- decoding


class _Fields:
    """Typed access to a decoded object's fields; any mismatch is a ``ValueError``."""

    def __init__(self, data: Mapping[str, Any]) -> None:
        self.data = data

    def _get(self, name: str, kind: type | tuple[type, ...]) -> Any:
        if name not in self.data:
            raise ValueError(f"missing field {name!r}")
        value = self.data[name]
        if isinstance(value, bool) and kind is int:
            raise ValueError(f"field {name!r} must be an integer")
        if not isinstance(value, kind):
            raise ValueError(f"field {name!r} has the wrong type ({type(value).__name__})")
        return value

    def int_(self, name: str, lo: int = 0, hi: int = 2**63) -> int:
        value: int = self._get(name, int)
        if not lo <= value <= hi:
            raise ValueError(f"field {name!r} is out of range ({value})")
        return value

    def str_(self, name: str) -> str:
        value: str = self._get(name, str)
        return value

    def bool_(self, name: str) -> bool:
        value: bool = self._get(name, bool)
        return value

    def strs(self, name: str) -> tuple[str, ...]:
        items = self._get(name, list)
        if not all(isinstance(item, str) for item in items):
            raise ValueError(f"field {name!r} must be a list of strings")
        return tuple(items)

    def b64(self, name: str) -> bytes:
        try:
            return base64.b64decode(self.str_(name), validate=True)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"field {name!r} is not base64") from exc

    def process(self, name: str) -> ProcessId | None:
        value = self._get(name, (dict, type(None)))
        if value is None:
            return None
        found = ProcessId.from_dict(value)
        if found is None:
            raise ValueError(f"field {name!r} is not a process identity")
        return found


def _parse(line: bytes | str) -> tuple[str, _Fields]:
    try:
        data = json.loads(line)
    except ValueError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if data.get("v") != CONTROL_VERSION:
        raise ValueError(f"control protocol version {data.get('v')!r}, expected {CONTROL_VERSION}")
    kind = data.get("type")
    if not isinstance(kind, str):
        raise ValueError("missing message type")
    return kind, _Fields(data)


def decode_request(line: bytes | str) -> Request:
    """The supervisor's reader: a malformed request is an :class:`InvalidInputError`."""
    try:
        kind, f = _parse(line)
        if kind == "exec":
            argv = f.strs("argv")
            if not argv:
                raise ValueError("argv is empty")
            return ExecRequest(
                argv=argv,
                cwd=f.str_("cwd"),
                env=f.strs("env"),
                timeout_ms=f.int_("timeout_ms", 0, 2**32 - 1),
                stdout_cap=f.int_("stdout_cap", 0, 2**32 - 1),
                stderr_cap=f.int_("stderr_cap", 0, 2**32 - 1),
                # Absent in the requests of pyro-mcp before stdin existed: no stdin.
                stdin=f.bool_("stdin") if "stdin" in f.data else False,
                # Absent before streaming: the output comes whole in exec_done.
                stream=f.bool_("stream") if "stream" in f.data else False,
            )
        if kind == "ping":
            return PingRequest()
        if kind == "shutdown":
            return ShutdownRequest(f.str_("reason"))
        if kind == "tunnel":
            return TunnelRequest()
        raise ValueError(f"unknown request type {kind!r}")
    except ValueError as exc:
        raise InvalidInputError(f"bad control request: {exc}") from None


def decode_stdin(line: bytes | str) -> StdinMessage:
    """The supervisor's reader of an exec's stdin: anything but a ``stdin`` chunk of
    1..MAX_STDIN_CHUNK bytes or ``stdin_eof`` is an :class:`InvalidInputError`."""
    try:
        kind, f = _parse(line)
        if kind == "stdin":
            data = f.b64("b64")
            if not 1 <= len(data) <= MAX_STDIN_CHUNK:
                raise ValueError(f"a stdin chunk of {len(data)} bytes")
            return StdinData(data)
        if kind == "stdin_eof":
            return StdinEof()
        raise ValueError(f"{kind!r} where stdin was expected")
    except ValueError as exc:
        raise InvalidInputError(f"bad control stdin message: {exc}") from None


def decode_event(line: bytes | str) -> Event:
    """The manager's reader. A line it cannot read means the supervisor is of another
    pyro-mcp version (or broken): a :class:`VMStateError` that says so."""
    try:
        kind, f = _parse(line)
        if kind == "heartbeat":
            return Heartbeat(f.int_("elapsed_ms"))
        if kind == "output":
            data = f.b64("b64")
            if not 1 <= len(data) <= MAX_OUTPUT_CHUNK:
                raise ValueError(f"an output event of {len(data)} bytes")
            return Output(f.int_("stream", STDOUT, STDERR), data)
        if kind == "ok":
            return Ok()
        if kind == "exec_done":
            return ExecDone(
                exit_code=f.int_("exit_code", -(2**31), 2**31 - 1),
                signal=f.int_("signal", -(2**31), 2**31 - 1),
                timed_out=f.bool_("timed_out"),
                stdout_truncated=f.bool_("stdout_truncated"),
                stderr_truncated=f.bool_("stderr_truncated"),
                duration_ms=f.int_("duration_ms"),
                stdout=f.b64("stdout_b64"),
                stderr=f.b64("stderr_b64"),
            )
        if kind == "failed":
            raw = f.data.get("error")
            if not isinstance(raw, dict):
                raise ValueError("field 'error' must be an object")
            return Failed(error_from_dict(raw))
        if kind == "ready":
            return Ready(
                boot=f.str_("boot"),
                boot_ms=f.int_("boot_ms"),
                supervisor=f.process("supervisor"),
                vmm=f.process("vmm"),
            )
        raise ValueError(f"unknown event type {kind!r}")
    except ValueError as exc:
        raise VMStateError(
            f"the VM's supervisor sent an unreadable message ({exc})",
            hint="it may be from another pyro-mcp version: delete the VM and create a new one",
        ) from None


# ------------------------------------------------------------------- errors


def _error_classes() -> dict[str, type[PyroError]]:
    found: dict[str, type[PyroError]] = {}
    todo: list[type[PyroError]] = [PyroError]
    while todo:
        cls = todo.pop()
        found.setdefault(cls.code, cls)
        todo.extend(cls.__subclasses__())
    return found


def error_from_dict(data: Mapping[str, Any]) -> PyroError:
    """Rebuild the :class:`PyroError` subclass that ``PyroError.to_dict`` described.

    An unknown code (an error class this process has not imported) still keeps its
    code: the root class is used with the code set on the instance.
    """
    code = data.get("code")
    message = data.get("message")
    hint = data.get("hint")
    details = data.get("details")
    hints = data.get("hints")
    if not isinstance(code, str) or not isinstance(message, str):
        raise ValueError("an error needs a string code and message")
    cls = _error_classes().get(code, PyroError)
    error = cls(
        message,
        hint=hint if isinstance(hint, str) else None,
        hints={str(k): str(v) for k, v in hints.items()} if isinstance(hints, dict) else None,
        details=details if isinstance(details, dict) else None,
    )
    if error.code != code:
        error.code = code  # keep the code even where the class is not known here
    return error


# ------------------------------------------------------------------- launch


@dataclass(frozen=True)
class MountSpec:
    """A filesystem the guest agent mounts at INIT (e.g. a task's /workspace disk)."""

    source: str
    target: str
    fstype: str
    readonly: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "fstype": self.fstype,
            "readonly": self.readonly,
        }

    @classmethod
    def from_dict(cls, data: Any) -> MountSpec:
        if not isinstance(data, dict):
            raise ValueError("a mount must be an object")
        f = _Fields(data)
        return cls(f.str_("source"), f.str_("target"), f.str_("fstype"), f.bool_("readonly"))


@dataclass(frozen=True)
class Launch:
    """What the manager asks a supervisor to start (``launch.json``)."""

    backend: str
    acceleration: str
    kernel: str | None  # None: the backend needs none (gvisor)
    initramfs: str | None
    rootfs: str
    agent: str | None
    vcpu_count: int
    mem_mib: int
    network: bool
    expires_at: float
    owner: ProcessId | None
    boot_timeout: float
    mounts: tuple[MountSpec, ...] = ()
    restore: tuple[str, str] | None = None  # (snapshot folder, key)

    @classmethod
    def from_plan(
        cls,
        backend: str,
        plan: LaunchPlan,
        *,
        expires_at: float,
        owner: ProcessId | None,
        boot_timeout: float,
    ) -> Launch:
        """What the backend prepared (``Backend.prepare``), with the supervision terms."""
        spec = plan.spec
        return cls(
            backend=backend,
            acceleration=spec.acceleration,
            kernel=str(spec.kernel) if spec.kernel else None,
            initramfs=str(spec.initramfs) if spec.initramfs else None,
            rootfs=str(spec.rootfs),
            agent=str(spec.agent) if spec.agent else None,
            vcpu_count=spec.vcpu_count,
            mem_mib=spec.mem_mib,
            network=spec.network,
            expires_at=expires_at,
            owner=owner,
            boot_timeout=boot_timeout,
            mounts=tuple(MountSpec.from_dict(dict(m)) for m in plan.mounts),
            restore=(str(plan.restore.directory), plan.restore.key) if plan.restore else None,
        )

    def spec(self) -> LaunchSpec:
        """The backend's start arguments, as :meth:`from_plan` took them."""

        def path(value: str | None) -> Path | None:
            return Path(value) if value else None

        return LaunchSpec(
            rootfs=Path(self.rootfs),
            vcpu_count=self.vcpu_count,
            mem_mib=self.mem_mib,
            network=self.network,
            acceleration=self.acceleration,
            kernel=path(self.kernel),
            initramfs=path(self.initramfs),
            agent=path(self.agent),
        )

    def snapshot(self) -> SnapshotRef | None:
        """The snapshot to restore from; None: a cold boot."""
        return SnapshotRef(Path(self.restore[0]), self.restore[1]) if self.restore else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "acceleration": self.acceleration,
            "kernel": self.kernel,
            "initramfs": self.initramfs,
            "rootfs": self.rootfs,
            "agent": self.agent,
            "vcpu_count": self.vcpu_count,
            "mem_mib": self.mem_mib,
            "network": self.network,
            "expires_at": self.expires_at,
            "owner": self.owner.to_dict() if self.owner else None,
            "boot_timeout": self.boot_timeout,
            "mounts": [m.to_dict() for m in self.mounts],
            "restore": list(self.restore) if self.restore else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Launch:
        """Strict: a launch record with a missing or ill-typed field is a ``ValueError``."""
        f = _Fields(data)
        for name in ("agent", "kernel", "initramfs"):
            if name not in data or not isinstance(data[name], str | None):
                raise ValueError(f"field {name!r} must be a string or null")
        restore = data.get("restore")
        if restore is not None and not (
            isinstance(restore, list)
            and len(restore) == 2
            and all(isinstance(x, str) for x in restore)
        ):
            raise ValueError("field 'restore' must be [folder, key] or null")
        mounts = data.get("mounts", [])
        if not isinstance(mounts, list):
            raise ValueError("field 'mounts' must be a list")
        expires = data.get("expires_at")
        timeout = data.get("boot_timeout")
        if not all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in (expires, timeout)
        ):
            raise ValueError("fields 'expires_at' and 'boot_timeout' must be numbers")
        return cls(
            backend=f.str_("backend"),
            acceleration=f.str_("acceleration"),
            kernel=data["kernel"],
            initramfs=data["initramfs"],
            rootfs=f.str_("rootfs"),
            agent=data["agent"],
            vcpu_count=f.int_("vcpu_count", 1, 64),
            mem_mib=f.int_("mem_mib", 1, 1 << 24),
            network=f.bool_("network"),
            expires_at=float(expires),  # type: ignore[arg-type]
            owner=f.process("owner"),
            boot_timeout=float(timeout),  # type: ignore[arg-type]
            mounts=tuple(MountSpec.from_dict(m) for m in mounts),
            restore=(restore[0], restore[1]) if restore else None,
        )

    def write(self, path: Path) -> None:
        from pyro_mcp.state import write_json_atomic

        write_json_atomic(path, self.to_dict())

    @classmethod
    def read(cls, path: Path) -> Launch:
        """Through the same schema-checked reader as every record."""
        from pyro_mcp.errors import StateError
        from pyro_mcp.state import read_json

        data = read_json(path)
        try:
            return cls.from_dict(data)
        except ValueError as exc:
            raise StateError(
                f"launch record {path} is malformed: {exc}",
                hint=f"it was written by another pyro-mcp version; remove {path.parent}",
            ) from None


__all__ = [
    "CONTROL_VERSION",
    "MAX_OUTPUT_CHUNK",
    "MAX_STDIN_CHUNK",
    "OUTPUT_FLUSH_S",
    "STDERR",
    "STDOUT",
    "Event",
    "ExecDone",
    "ExecRequest",
    "Failed",
    "Heartbeat",
    "Launch",
    "Message",
    "MountSpec",
    "Ok",
    "Output",
    "PingRequest",
    "Ready",
    "Request",
    "ShutdownRequest",
    "StdinData",
    "StdinEof",
    "StdinMessage",
    "decode_event",
    "decode_request",
    "decode_stdin",
    "encode",
    "error_from_dict",
]
