"""What a command in a guest is run with: one options type for every surface.

The SDK, the CLI and the MCP tools all take the same exec options (working
directory, environment, timeout, output caps); :meth:`ExecOptions.checked`
validates them once, at the boundary, and every layer below passes the value
on. ``None`` for ``cwd`` means the environment's own working directory
(``/root`` for VMs, ``/workspace`` for tasks).

A command's stdin is a :class:`Stdin`: a one-use stream of byte chunks made from
bytes, text (UTF-8), a binary file object or an iterable of bytes, and read
chunk by chunk as the command consumes it (never whole). No stdin means an
empty one (the command reads EOF at once).

A command's output can be followed as it comes: ``on_stdout``/``on_stderr`` are
called with each chunk of bytes (within the caps, in the order the command wrote
them as far as two pipes can tell), on the thread that runs the command; the
result still holds the whole (capped) output.
"""

from __future__ import annotations

import shlex
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeAlias

from pyro_mcp import limits
from pyro_mcp.errors import InvalidInputError, PyroError

#: The environment every guest command starts from; the caller's ``env`` goes on top.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
VM_DEFAULT_CWD = "/root"

STDIN_CHUNK = 64 * 1024  # the most bytes a stdin chunk carries past this layer
STDOUT, STDERR = 1, 2  # the streams of :meth:`ExecOptions.emit`

#: Called with each chunk of a command's stdout (or stderr) as it arrives.
OutputFn: TypeAlias = Callable[[bytes], None]

#: What the SDK takes as a command's stdin: bytes, text (sent as UTF-8), a binary
#: file object (anything with ``read``, e.g. ``open(path, "rb")`` or
#: ``sys.stdin.buffer``) or an iterable of bytes (a generator: streamed).
StdinSource: TypeAlias = (
    "bytes | bytearray | memoryview | str | BinaryIO | Iterable[bytes] | Stdin | None"
)


class Stdin:
    """A command's stdin: chunks of at most :data:`STDIN_CHUNK` bytes, read from the
    source only as they are sent. One use: a second :meth:`chunks` is refused."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._lock = threading.Lock()
        self._taken = False

    @classmethod
    def of(cls, source: StdinSource) -> Stdin | None:
        """The stdin for ``source`` (None stays None: an empty stdin); anything else
        is an InvalidInputError."""
        if source is None or isinstance(source, Stdin):
            return source
        if isinstance(source, str):
            return cls(_split(source.encode("utf-8")))
        if isinstance(source, bytes | bytearray | memoryview):
            return cls(_split(bytes(source)))
        read = getattr(source, "read1", None) or getattr(source, "read", None)
        if callable(read):
            return cls(_read_all(read))
        if isinstance(source, Iterable):
            return cls(_checked_chunks(source))
        raise InvalidInputError(
            f"stdin must be bytes, str, a binary file or an iterable of bytes, "
            f"not {type(source).__name__}",
            hint="pass e.g. stdin=b'data', stdin=open(path, 'rb') or a generator of bytes",
        )

    def chunks(self) -> Iterator[bytes]:
        with self._lock:
            if self._taken:
                raise InvalidInputError(
                    "this stdin was already used by a command",
                    hint="a stream is read once: pass a new one for each command",
                )
            self._taken = True
        return self._chunks


def source_error(exc: Exception) -> PyroError:
    """What to raise when reading a command's stdin source failed (the command is
    killed): a PyroError as it is, anything else as an InvalidInputError."""
    if isinstance(exc, PyroError):
        return exc
    return InvalidInputError(
        f"reading the command's stdin failed: {exc!r}",
        hint="the command was killed; check the stdin source",
    )


def _split(data: bytes) -> Iterator[bytes]:
    for i in range(0, len(data), STDIN_CHUNK):
        yield data[i : i + STDIN_CHUNK]


def _read_all(read: Any) -> Iterator[bytes]:
    while True:
        data = read(STDIN_CHUNK)
        if not data:
            return
        if not isinstance(data, bytes | bytearray):
            raise InvalidInputError(
                f"the stdin file gave {type(data).__name__}, not bytes",
                hint="open it in binary mode ('rb'), or pass its text as a str",
            )
        yield bytes(data)


def _checked_chunks(source: Iterable[Any]) -> Iterator[bytes]:
    for chunk in source:
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise InvalidInputError(
                f"a stdin iterable gave {type(chunk).__name__}, not bytes",
                hint="yield bytes (encode text first)",
            )
        if len(chunk):
            yield from _split(bytes(chunk))


@dataclass(frozen=True)
class ExecOptions:
    """How to run one command. Build it with :meth:`checked`."""

    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: int = limits.DEFAULT_TIMEOUT_SECONDS
    stdout_cap: int = limits.DEFAULT_OUTPUT_CAP
    stderr_cap: int = limits.DEFAULT_OUTPUT_CAP
    stdin: Stdin | None = None  # None: an empty stdin
    on_stdout: OutputFn | None = None
    on_stderr: OutputFn | None = None

    @property
    def streaming(self) -> bool:
        """Whether someone follows the output as it comes."""
        return self.on_stdout is not None or self.on_stderr is not None

    def emit(self, stream: int, data: bytes) -> None:
        """Hand ``data`` of ``stream`` (STDOUT or STDERR) to its callback, if any."""
        fn = self.on_stdout if stream == STDOUT else self.on_stderr
        if fn is not None and data:
            fn(data)

    @classmethod
    def checked(
        cls,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_seconds: int = limits.DEFAULT_TIMEOUT_SECONDS,
        stdout_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stderr_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stdin: StdinSource = None,
        on_stdout: OutputFn | None = None,
        on_stderr: OutputFn | None = None,
    ) -> ExecOptions:
        """Validated options; raises InvalidInputError naming the bad one."""
        return cls(
            cwd=None if cwd is None else limits.check_cwd(cwd),
            env=limits.check_env(env),
            timeout_seconds=limits.check_timeout(timeout_seconds),
            stdout_cap=limits.check_output_cap("stdout_cap", stdout_cap),
            stderr_cap=limits.check_output_cap("stderr_cap", stderr_cap),
            stdin=Stdin.of(stdin),
            on_stdout=_checked_callback("on_stdout", on_stdout),
            on_stderr=_checked_callback("on_stderr", on_stderr),
        )

    def guest_env(self) -> tuple[str, ...]:
        """The command's whole environment as "NAME=value" items."""
        return tuple(f"{k}={v}" for k, v in {**BASE_ENV, **self.env}.items())

    def cwd_or(self, default: str) -> str:
        return self.cwd if self.cwd is not None else default


def _checked_callback(name: str, fn: object) -> OutputFn | None:
    if fn is not None and not callable(fn):
        raise InvalidInputError(
            f"{name} must be a callable taking bytes, not {type(fn).__name__}",
            hint=f"pass e.g. {name}=sys.stdout.buffer.write",
        )
    return fn


def build_argv(command: str | list[str], env: Mapping[str, str]) -> list[str]:
    """A string runs under ``sh -lc``; the caller's env is re-exported after the
    login profile so it wins over what the profile sets (PATH above all)."""
    if isinstance(command, list):
        return command
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return ["sh", "-lc", exports + command]
