"""Reading, writing, editing and listing files in a task's guest, over its agent channel.

The host side of ``task_read_file`` / ``task_write_file`` / ``task_edit_file`` /
``task_list_files`` (user-facing description: ``docs/files.md``). Every function
takes an :class:`~pyro_mcp.guest.channel.AgentChannel` and an *absolute* guest path as
``str``; :func:`guest_path` turns what a user gave (maybe relative to ``/workspace``)
into one. The guest agent does the file system work (protocol version 2: READ_FILE,
WRITE_FILE, STAT, LIST); this module bounds sizes, decides text versus base64, does the
line arithmetic and the edit's string replacement, and translates the agent's errno
errors into :class:`~pyro_mcp.errors.PyroError` subclasses with a hint, in one place
(:func:`_fail`).

Writes are atomic in the guest (a temporary file renamed over the path): a reader sees
the old file or the whole new one; a failed or abandoned write leaves no trace. ``timeout``
is everywhere the longest wait for the agent between two frames, not a total.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import errno
import os
import posixpath
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Literal, NoReturn

from pydantic import BaseModel, Field

from pyro_mcp.errors import (
    GuestProtocolError,
    InvalidInputError,
    LimitError,
    NotFoundError,
    PyroError,
)
from pyro_mcp.guest.channel import AgentChannel
from pyro_mcp.guest.protocol import (
    MAX_PATH,
    Error,
    FileKind,
    FileStat,
    ListDir,
    ReadEnd,
    ReadFile,
    WriteFile,
)
from pyro_mcp.limits import (
    DEFAULT_LIST_ENTRIES,
    DEFAULT_READ_BYTES,
    MAX_LIST_ENTRIES,
    MAX_READ_BYTES,
    TASK_WORKSPACE,
    check_int,
)

__all__ = [
    "DEFAULT_FILE_TIMEOUT",
    "DEFAULT_LIST_ENTRIES",
    "DEFAULT_READ_BYTES",
    "DIFF_MAX_BYTES",
    "DIFF_MAX_LINES",
    "MAX_EDIT_BYTES",
    "MAX_EDIT_RESULT_BYTES",
    "MAX_LINE_SCAN_BYTES",
    "MAX_LIST_ENTRIES",
    "MAX_READ_BYTES",
    "Encoding",
    "FileEditResult",
    "FileEntry",
    "FileListResult",
    "FileReadResult",
    "FileStreamResult",
    "FileType",
    "FileWriteResult",
    "decode_content",
    "edit_file",
    "guest_path",
    "list_files",
    "read_file",
    "stream_file",
    "write_file",
]

MAX_LINE_SCAN_BYTES = 64 << 20  # how far read_file looks for start_line
MAX_EDIT_BYTES = 8 << 20  # edit_file refuses bigger files
MAX_EDIT_RESULT_BYTES = 16 << 20  # ... and edits that would leave a bigger one
DIFF_MAX_LINES = 60  # edit_file's diff is cut after this many lines ...
DIFF_MAX_BYTES = 4096  # ... or this many bytes
DEFAULT_FILE_TIMEOUT = 30.0  # seconds to wait for the agent between two frames
_SCAN_CHUNK = 1 << 20  # bytes one READ_FILE asks for while looking for lines
_DIFF_MAX_SPAN = 20000  # lines: a changed span longer than this gets no diff

Encoding = Literal["utf-8", "base64"]
FileType = Literal[
    "file", "directory", "symlink", "fifo", "socket", "char_device", "block_device", "other"
]
_TYPES: dict[int, FileType] = {
    FileKind.FILE: "file",
    FileKind.DIR: "directory",
    FileKind.SYMLINK: "symlink",
    FileKind.FIFO: "fifo",
    FileKind.SOCKET: "socket",
    FileKind.CHAR_DEVICE: "char_device",
    FileKind.BLOCK_DEVICE: "block_device",
}


# ------------------------------------------------------------------ results


class FileReadResult(BaseModel):
    """Part of a guest file: text when it is valid UTF-8, else base64 of its bytes."""

    path: str = Field(description="Absolute guest path that was read.")
    size: int = Field(description="Size of the whole file in bytes.")
    mtime: str = Field(description="The file's modification time, ISO 8601 UTC.")
    offset: int = Field(description="Byte offset in the file where content starts.")
    bytes_read: int = Field(description="Bytes of the file in content (before numbering).")
    truncated: bool = Field(
        description="More was asked for than came back: max_bytes cut the read (the file "
        "goes on past the content, or the requested lines did not all fit)."
    )
    encoding: Encoding = Field(description="'utf-8': content is the text; 'base64': bytes.")
    content: str = Field(description="The text, or base64 of the bytes (see encoding).")
    start_line: int | None = Field(
        default=None, description="Line reads: 1-based number of the first line in content."
    )
    end_line: int | None = Field(
        default=None,
        description="Line reads: number of the last line (maybe partial) in content; null "
        "when no line is in content.",
    )
    total_lines: int | None = Field(
        default=None, description="Line reads: lines in the file, when the read reached its end."
    )
    line_numbers: bool = Field(
        default=False,
        description="Each line of content starts with its number and a tab ('%6d\\t', like "
        "cat -n): a view for reading, not text to copy into an edit's old_text.",
    )


class FileStreamResult(BaseModel):
    """What a streaming read delivered to its sink."""

    path: str
    size: int = Field(description="Size of the whole file in bytes.")
    mode: str = Field(description="Permission bits in octal, e.g. '0644'.")
    mtime: str = Field(description="ISO 8601 UTC.")
    offset: int
    bytes_read: int = Field(description="Bytes handed to the sink.")
    truncated: bool = Field(description="max_bytes stopped the read before the file's end.")


class FileWriteResult(BaseModel):
    """A file written whole, atomically (parent folders made as needed)."""

    path: str
    bytes_written: int
    size: int = Field(description="Size of the file now.")
    mode: str = Field(description="Permission bits in octal, e.g. '0644'.")
    mtime: str = Field(description="ISO 8601 UTC.")


class FileEditResult(BaseModel):
    """An exact string replacement in a UTF-8 text file."""

    path: str
    replacements: int = Field(description="How many occurrences of old_text were replaced.")
    diff: str = Field(description="Unified diff of the change (cut when long, see below).")
    diff_truncated: bool = Field(
        description=f"The diff was cut at {DIFF_MAX_LINES} lines / {DIFF_MAX_BYTES} bytes "
        "(or left out for a very large change); the edit itself is whole."
    )
    size: int = Field(description="Size of the file after the edit, in bytes.")
    mode: str = Field(description="Permission bits in octal (kept from before the edit).")
    mtime: str = Field(description="ISO 8601 UTC, after the edit.")


class FileEntry(BaseModel):
    """One entry of a listing (symlinks are described, never followed)."""

    path: str = Field(
        description="Path relative to the listed folder ('src/main.py' when recursive). A "
        "name that is not valid UTF-8 has its bad bytes written as '\\xNN' here and its "
        "exact bytes in path_base64."
    )
    path_base64: str | None = Field(
        default=None, description="Base64 of the raw name, only when it is not valid UTF-8."
    )
    type: FileType
    size: int = Field(description="Bytes (for a symlink: the length of its target).")
    mode: str = Field(description="Permission bits in octal, e.g. '0644'.")
    mtime: str = Field(description="ISO 8601 UTC.")
    link_target: str | None = Field(
        default=None,
        description="Symlinks only: where the link points, as stored (relative or absolute; "
        "bad UTF-8 as '\\xNN', exact bytes in link_target_base64).",
    )
    link_target_base64: str | None = Field(
        default=None, description="Base64 of the raw target, only when it is not valid UTF-8."
    )


class FileListResult(BaseModel):
    """The entries of a guest folder, sorted by path (a folder's entries follow it)."""

    path: str = Field(description="Absolute guest path of the listed folder.")
    recursive: bool
    entries: list[FileEntry]
    count: int = Field(description="len(entries).")
    truncated: bool = Field(
        description="max_entries stopped the listing: entries is an arbitrary subset (the "
        "guest's directory order), not the first ones by name."
    )


# ------------------------------------------------------------------- paths


def guest_path(path: str, base: str = TASK_WORKSPACE) -> str:
    """A user's guest path, checked and made absolute: relative paths are joined under
    ``base``, then ``posixpath.normpath`` is applied ('..' is resolved as text: this is a
    check of form, not a confinement; the guest is the sandbox).

    Refused (:class:`InvalidInputError`): anything but a non-empty ``str``, a NUL, text
    that is not valid UTF-8, more than 4096 bytes of UTF-8 (given or joined).
    """
    if not isinstance(path, str) or not path:
        raise InvalidInputError(
            f"a guest path must be a non-empty string, got {path!r}",
            hint="pass a path such as 'src/main.py' (relative to /workspace) or '/etc/hosts'",
        )
    if "\x00" in path:
        raise InvalidInputError(
            f"guest path {_short(path)!r} contains a NUL character",
            hint="file names cannot contain NUL; remove it from the path",
        )
    size = _utf8_size(path)
    if size > MAX_PATH:
        raise InvalidInputError(
            f"guest path is {size} bytes of UTF-8; the limit is {MAX_PATH}",
            hint="use a shorter path",
        )
    joined = path if path.startswith("/") else posixpath.join(base, path)
    result = posixpath.normpath(joined)
    if result.startswith("//"):  # normpath keeps a leading '//' (POSIX allows it)
        result = "/" + result.lstrip("/")
    if not result.startswith("/"):
        raise InvalidInputError(
            f"guest path {_short(path)!r} is relative to {_short(base)!r}, which is not absolute",
            hint="pass an absolute base such as '/workspace'",
        )
    if _utf8_size(result) > MAX_PATH:
        raise InvalidInputError(
            f"guest path {_short(result)!r} is over {MAX_PATH} bytes of UTF-8 once joined "
            f"to {_short(base)}",
            hint="use a shorter path",
        )
    return result


def _short(text: str) -> str:
    """A path for a message: at most 200 characters."""
    return text if len(text) <= 200 else text[:200] + "..."


def _utf8_size(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"guest path {_short(text)!r} is not valid text (it has an unpaired surrogate)",
            hint="pass the path as valid UTF-8 text",
        ) from None


def _absolute(path: str) -> bytes:
    """``path`` (must be absolute) as the agent gets it."""
    if isinstance(path, str) and path and not path.startswith("/"):
        raise InvalidInputError(
            f"guest path {path!r} is not absolute",
            hint="resolve it first with guest_path() (relative paths are under /workspace)",
        )
    return guest_path(path).encode("utf-8")


# ------------------------------------------------------------------ errors


def _fail(err: Error, path: str, op: str) -> NoReturn:
    """The agent's ERROR for ``op`` ('read', 'write', 'edit', 'list', 'stat') on ``path``
    as the PyroError a user can act on: the one place guest errnos are translated."""
    code = err.errno_code
    name = errno.errorcode.get(code, f"errno {code}")
    details = {"path": path, "operation": op, "errno": name, "guest_message": err.message}
    if code == errno.ENOENT:
        raise NotFoundError(
            f"{path}: no such file or directory",
            hint="check the path; list the folder with task_list_files",
            details=details,
        )
    if code == errno.EISDIR:
        hint = (
            f"name a file inside it, e.g. {posixpath.join(path, 'NAME')}"
            if op == "write"
            else "list it with task_list_files, or name a file inside it"
        )
        raise InvalidInputError(f"{path} is a directory, not a file", hint=hint, details=details)
    if code == errno.ENOTDIR:
        raise InvalidInputError(
            f"{path}: a parent of it is a file, not a directory",
            hint="check the path; task_list_files on a folder above shows what is there",
            details=details,
        )
    if code in (errno.EACCES, errno.EPERM):
        raise InvalidInputError(
            f"cannot {op} {path}: permission denied in the guest",
            hint="change its permissions with task_exec (chmod/chown), or use another path",
            details=details,
        )
    if code in (errno.ENOSPC, errno.EDQUOT):
        raise LimitError(
            f"cannot {op} {path}: no space left on the guest's file system",
            hint="free space (remove files with task_exec), or write less",
            details=details,
        )
    if code == errno.ENAMETOOLONG:
        raise InvalidInputError(
            f"{path}: a name in it is too long",
            hint="keep each name within 255 bytes and the path within 4096",
            details=details,
        )
    if code == errno.ELOOP:
        raise InvalidInputError(
            f"{path}: too many levels of symbolic links (a link loop?)",
            hint="look at the links on the path with task_list_files",
            details=details,
        )
    if code == errno.EINVAL and op in ("read", "edit"):
        raise InvalidInputError(
            f"{path} is not a regular file (a fifo, socket or device?)",
            hint="only regular files can be read; task_list_files shows its type",
            details=details,
        )
    if code == errno.EINVAL:
        raise InvalidInputError(
            f"cannot {op} {path}: invalid argument ({err.message})",
            hint="check that the path names the right kind of file (task_list_files shows types)",
            details=details,
        )
    if code == errno.EROFS:
        raise InvalidInputError(
            f"cannot {op} {path}: the file system is read-only",
            hint="write under /workspace (or /tmp)",
            details=details,
        )
    if code == errno.EAGAIN:
        raise LimitError(
            f"cannot {op} {path} now: the guest agent runs as many file operations as it may",
            hint="retry once the other file operations have finished",
            details=details,
        )
    if code == errno.EPROTO:
        raise GuestProtocolError(
            f"the guest agent refused the {op} of {path} as malformed: {err.message}",
            details=details,
        )
    raise PyroError(
        f"cannot {op} {path}: {os.strerror(code)} ({name})",
        hint=f"the guest agent said: {err.message}",
        details=details,
    )


# ----------------------------------------------------------------- helpers


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso(mtime_ns: int) -> str:
    """ISO 8601 UTC with microseconds (the wire's i64 nanoseconds span 1677..2262)."""
    when = _EPOCH + timedelta(microseconds=mtime_ns // 1000)  # exact: no float
    return when.isoformat(timespec="microseconds")


def _octal(mode: int) -> str:
    return f"{mode & 0o7777:04o}"


def _check_timeout(timeout: object) -> float:
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise InvalidInputError(
            f"timeout must be a positive number of seconds, got {timeout!r}",
            hint="pass e.g. timeout=30",
        )
    return float(timeout)


def _stat(ch: AgentChannel, path: str, wire: bytes, op: str, timeout: float) -> FileStat:
    st = ch.stat(wire, timeout)
    if isinstance(st, Error):
        _fail(st, path, op)
    return st


def _read_bytes(
    ch: AgentChannel, path: str, wire: bytes, offset: int, max_bytes: int, op: str, timeout: float
) -> tuple[bytes, ReadEnd]:
    buf = bytearray()
    end = ch.read_file(ReadFile(wire, offset, max_bytes), buf.extend, timeout)
    if isinstance(end, Error):
        _fail(end, path, op)
    return bytes(buf), end


def _as_text(data: bytes, mid_file: bool, truncated: bool) -> tuple[str, int, int] | None:
    """``data`` as text, or None when it is not UTF-8. A character cut at either edge of a
    read is not binary: returns (text, bytes skipped at the start, bytes dropped at the end);
    only a read that starts mid-file may skip, only a truncated one may drop (at most 3)."""
    lead = 0
    if mid_file:
        while lead < min(3, len(data)) and 0x80 <= data[lead] <= 0xBF:
            lead += 1
    for skip in dict.fromkeys((lead, 0)):  # the skip only if the rest is text
        body = data[skip:]
        try:
            return body.decode("utf-8"), skip, 0
        except UnicodeDecodeError as exc:
            cut = len(body) - exc.start
            if truncated and exc.reason == "unexpected end of data" and cut <= 3:
                try:
                    return body[: exc.start].decode("utf-8"), skip, cut
                except UnicodeDecodeError:
                    pass
    return None


def _split_lines(text: str) -> list[str]:
    """Lines split at '\\n' only (str.splitlines also splits at \\r, \\x0c, U+2028, ...)."""
    parts = text.split("\n")
    lines = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _numbered(text: str, first: int) -> str:
    return "".join(f"{n:6d}\t{line}" for n, line in enumerate(_split_lines(text), first))


def _line_count(data: bytes) -> int:
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


# -------------------------------------------------------------------- read


def read_file(
    ch: AgentChannel,
    path: str,
    *,
    offset: int = 0,
    max_bytes: int = DEFAULT_READ_BYTES,
    start_line: int | None = None,
    end_line: int | None = None,
    line_numbers: bool = False,
    timeout: float = DEFAULT_FILE_TIMEOUT,
) -> FileReadResult:
    """Read at most ``max_bytes`` (≤ 16 MiB) of a regular file (symlinks followed).

    Bytes from ``offset``, or, with ``start_line``/``end_line`` (1-based, inclusive;
    ``end_line`` None: to the end), just those lines (``offset`` must then be 0). Lines
    are cut at '\\n' only; a line read returns whole lines while they fit in
    ``max_bytes`` (a first line longer than that comes back cut, ``truncated``).
    ``line_numbers`` (implies a line read from line 1 when no start_line is given)
    prefixes each line with ``'%6d\\t'``: a view for a model to read, never text to pass
    back as an edit's old_text. Content that is not UTF-8 comes back as base64 (and
    without numbers); a character cut by max_bytes is dropped, not a reason for base64.
    """
    wire = _absolute(path)
    path = wire.decode("utf-8")
    timeout = _check_timeout(timeout)
    check_int("offset", offset, 0, 2**63 - 1, "bytes")
    if (
        isinstance(max_bytes, int)
        and not isinstance(max_bytes, bool)
        and max_bytes > MAX_READ_BYTES
    ):
        raise InvalidInputError(
            f"max_bytes is {max_bytes}; one read returns at most {MAX_READ_BYTES} bytes",
            hint="read it in parts with offset, or stream it whole with stream_file "
            "(the CLI's raw output)",
        )
    check_int("max_bytes", max_bytes, 1, MAX_READ_BYTES, "bytes")
    if not isinstance(line_numbers, bool):
        raise InvalidInputError(
            f"line_numbers must be true or false, got {line_numbers!r}", hint="pass a bool"
        )
    if start_line is None and end_line is None and not line_numbers:
        data, end = _read_bytes(ch, path, wire, offset, max_bytes, "read", timeout)
        return _byte_result(path, data, end, offset)
    first = 1 if start_line is None else check_int("start_line", start_line, 1, 2**63 - 1)
    if end_line is not None:
        check_int("end_line", end_line, 1, 2**63 - 1)
        if end_line < first:
            raise InvalidInputError(
                f"end_line {end_line} is before start_line {first}",
                hint="pass end_line >= start_line (or leave it out to read to the end)",
            )
    if offset:
        raise InvalidInputError(
            "offset cannot be combined with start_line/end_line/line_numbers",
            hint="lines are counted from the file's start: leave offset at 0",
        )
    return _read_lines(ch, path, wire, first, end_line, max_bytes, line_numbers, timeout)


def _byte_result(path: str, data: bytes, end: ReadEnd, offset: int) -> FileReadResult:
    truncated = end.truncated
    text = _as_text(data, offset > 0, truncated)
    if text is None:
        encoding: Encoding = "base64"
        content = base64.b64encode(data).decode("ascii")
        skip = 0
    else:
        encoding = "utf-8"
        content, skip, drop = text
        data = data[skip : len(data) - drop]
    return FileReadResult(
        path=path,
        size=end.stat.size,
        mtime=_iso(end.stat.mtime_ns),
        offset=offset + skip,
        bytes_read=len(data),
        truncated=truncated,
        encoding=encoding,
        content=content,
    )


def _read_lines(
    ch: AgentChannel,
    path: str,
    wire: bytes,
    first: int,
    last: int | None,
    max_bytes: int,
    line_numbers: bool,
    timeout: float,
) -> FileReadResult:
    """Scan the file in bounded READ_FILEs, keeping the bytes of lines first..last."""
    pos = 0  # file offset of the next byte to scan
    line = 1  # number of the line that byte belongs to
    newlines = 0
    last_byte = b""
    start: int | None = None  # file offset of the first kept byte
    kept = bytearray()
    end: ReadEnd | None = None
    at_eof = stopped = False
    while not stopped:
        if start is None and pos >= MAX_LINE_SCAN_BYTES:
            raise InvalidInputError(
                f"line {first} of {path} is not within its first {MAX_LINE_SCAN_BYTES} bytes",
                hint="read a file this large by byte offset (offset and max_bytes)",
            )
        data, end = _read_bytes(ch, path, wire, pos, _SCAN_CHUNK, "read", timeout)
        i = 0
        skipped = data.count(b"\n")
        if line + skipped < first:  # the wanted lines start past this chunk: skip it whole
            line += skipped
            newlines += skipped
            i = len(data)
        while i < len(data):
            j = data.find(b"\n", i)
            stop = len(data) if j < 0 else j + 1
            if line >= first and (last is None or line <= last):
                if start is None:
                    start = pos + i
                kept += data[i:stop]
            if j >= 0:
                line += 1
                newlines += 1
            i = stop
            if (last is not None and line > last) or len(kept) > max_bytes:
                stopped = True
                break
        if data:
            last_byte = data[i - 1 : i]
        pos += i
        if not end.truncated and i == len(data):
            at_eof = True
            break
    assert end is not None
    truncated = len(kept) > max_bytes
    if truncated:
        cut = kept.rfind(b"\n", 0, max_bytes)
        kept = kept[: cut + 1] if cut >= 0 else kept[:max_bytes]
    total = None
    if at_eof:
        total = newlines + (1 if last_byte and last_byte != b"\n" else 0)
    raw = bytes(kept)
    text = _as_text(raw, False, truncated)
    if text is None:
        encoding: Encoding = "base64"
        content = base64.b64encode(raw).decode("ascii")
        line_numbers = False
    else:
        encoding = "utf-8"
        content, _, drop = text
        raw = raw[: len(raw) - drop]
        if line_numbers:
            content = _numbered(content, first)
    count = _line_count(raw)
    return FileReadResult(
        path=path,
        size=end.stat.size,
        mtime=_iso(end.stat.mtime_ns),
        offset=pos if start is None else start,
        bytes_read=len(raw),
        truncated=truncated,
        encoding=encoding,
        content=content,
        start_line=first,
        end_line=first + count - 1 if count else None,
        total_lines=total,
        line_numbers=line_numbers,
    )


def stream_file(
    ch: AgentChannel,
    path: str,
    sink: Callable[[bytes], None],
    *,
    offset: int = 0,
    max_bytes: int | None = None,
    timeout: float = DEFAULT_FILE_TIMEOUT,
) -> FileStreamResult:
    """Hand a regular file's bytes from ``offset`` (all, or at most ``max_bytes``) to
    ``sink`` as they arrive, in chunks of at most 64 KiB; host memory stays bounded by
    the flow-control window whatever the size. If ``sink`` raises, the read is cancelled
    in the guest and the exception propagates."""
    wire = _absolute(path)
    path = wire.decode("utf-8")
    timeout = _check_timeout(timeout)
    check_int("offset", offset, 0, 2**63 - 1, "bytes")
    limit = 2**64 - 1 if max_bytes is None else check_int("max_bytes", max_bytes, 0, 2**64 - 1)
    end = ch.read_file(ReadFile(wire, offset, limit), sink, timeout)
    if isinstance(end, Error):
        _fail(end, path, "read")
    return FileStreamResult(
        path=path,
        size=end.stat.size,
        mode=_octal(end.stat.mode),
        mtime=_iso(end.stat.mtime_ns),
        offset=offset,
        bytes_read=end.bytes_sent,
        truncated=end.truncated,
    )


# ------------------------------------------------------------------- write


def decode_content(content: str, encoding: Encoding) -> bytes:
    """The bytes a tool call's ``content`` stands for: UTF-8 text, or strict base64
    (RFC 4648 alphabet, padded, no whitespace)."""
    if not isinstance(content, str):
        raise InvalidInputError(
            f"content must be a string, got {type(content).__name__}",
            hint="pass text, or base64 text with encoding='base64'",
        )
    if encoding == "utf-8":
        try:
            return content.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidInputError(
                "content is not valid text (it has an unpaired surrogate)",
                hint="send bytes that are not UTF-8 as base64 with encoding='base64'",
            ) from None
    if encoding == "base64":
        try:
            return base64.b64decode(content.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError) as exc:
            raise InvalidInputError(
                f"content is not valid base64: {exc}",
                hint="encode the bytes as standard base64 (A-Z a-z 0-9 + /, '=' padding, no "
                "line breaks), or send text with encoding='utf-8'",
            ) from None
    raise InvalidInputError(
        f"encoding must be 'utf-8' or 'base64', got {encoding!r}",
        hint="use 'utf-8' for text and 'base64' for other bytes",
    )


def _chunks(data: Iterable[bytes]) -> Iterator[bytes]:
    for chunk in data:
        if not isinstance(chunk, bytes | bytearray | memoryview):
            raise InvalidInputError(
                f"write_file's data yielded a {type(chunk).__name__}, not bytes",
                hint="yield bytes (encode text first)",
            )
        yield bytes(chunk)


def write_file(
    ch: AgentChannel,
    path: str,
    data: bytes | Iterable[bytes],
    *,
    mode: int | None = None,
    timeout: float = DEFAULT_FILE_TIMEOUT,
) -> FileWriteResult:
    """Write a file whole, atomically: missing parent folders are made (0755), the bytes
    go to a temporary file in the target's folder that is renamed over the path, so a
    failure (or ``data`` raising) leaves the old file, or none, and no temporary file.

    ``data``: bytes, or an iterable of bytes (streamed, any size, bounded memory).
    ``mode`` None keeps an existing file's mode and owner (0644 for a new file); an int
    (0..0o7777) is set exactly, no umask. A symlink at ``path`` is replaced by the file;
    its target is not written.
    """
    wire = _absolute(path)
    path = wire.decode("utf-8")
    timeout = _check_timeout(timeout)
    if mode is not None:
        check_int("mode", mode, 0, 0o7777)
    if isinstance(data, str):
        raise InvalidInputError(
            "write_file takes bytes, got str",
            hint="encode the text (or use decode_content for a tool's content and encoding)",
        )
    chunks: Iterable[bytes]
    if isinstance(data, bytes | bytearray | memoryview):
        chunks = [bytes(data)]
    elif isinstance(data, Iterable):
        chunks = _chunks(data)
    else:
        raise InvalidInputError(
            f"write_file's data must be bytes or an iterable of bytes, got {type(data).__name__}",
            hint="pass bytes",
        )
    request = WriteFile(
        wire,
        mode=0o644 if mode is None else mode,
        keep_mode=mode is None,
        make_parents=True,
    )
    end = ch.write_file(request, chunks, timeout)
    if isinstance(end, Error):
        _fail(end, path, "write")
    return FileWriteResult(
        path=path,
        bytes_written=end.bytes_written,
        size=end.stat.size,
        mode=_octal(end.stat.mode),
        mtime=_iso(end.stat.mtime_ns),
    )


# -------------------------------------------------------------------- edit


def edit_file(
    ch: AgentChannel,
    path: str,
    old_text: str,
    new_text: str,
    *,
    replace_all: bool = False,
    timeout: float = DEFAULT_FILE_TIMEOUT,
) -> FileEditResult:
    """Replace ``old_text`` by ``new_text`` in a UTF-8 text file (≤ 8 MiB), exactly.

    ``old_text`` must occur exactly once, or ``replace_all`` must be set. The file is
    written back atomically with its mode and owner kept; if it changed (size or mtime)
    between the read and the write, nothing is written and the edit is refused. A symlink
    is refused (edit its target). The result's diff is capped (``diff_truncated``).
    """
    wire = _absolute(path)
    path = wire.decode("utf-8")
    timeout = _check_timeout(timeout)
    for name, value in (("old_text", old_text), ("new_text", new_text)):
        if not isinstance(value, str):
            raise InvalidInputError(
                f"{name} must be a string, got {type(value).__name__}", hint=f"pass {name} as text"
            )
    if not isinstance(replace_all, bool):
        raise InvalidInputError(
            f"replace_all must be true or false, got {replace_all!r}", hint="pass a bool"
        )
    if not old_text:
        raise InvalidInputError(
            "old_text is empty: there is nothing to find",
            hint="pass the exact text to replace; to write a whole file use task_write_file",
        )
    try:
        new_text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidInputError(
            "new_text is not valid text (it has an unpaired surrogate)",
            hint="pass valid UTF-8 text",
        ) from None

    before = _stat(ch, path, wire, "edit", timeout)
    _check_editable(path, before)
    data, end = _read_bytes(ch, path, wire, 0, MAX_EDIT_BYTES + 1, "edit", timeout)
    if len(data) > MAX_EDIT_BYTES:
        _too_big(path, end.stat.size)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInputError(
            f"{path} is not UTF-8 text (byte {exc.start} is not valid UTF-8): cannot edit it",
            hint="edit text files only; replace a binary file whole with task_write_file",
        ) from None

    found = text.count(old_text)
    if found == 0:
        raise InvalidInputError(
            f"old_text was not found in {path}",
            hint=_near_miss_hint(text, old_text),
            details={"path": path, "matches": 0},
        )
    if found > 1 and not replace_all:
        raise InvalidInputError(
            f"old_text was found {found} times in {path}; it must be unique",
            hint="add surrounding lines to old_text so it matches once, or pass "
            "replace_all=true to replace all of them",
            details={"path": path, "matches": found},
        )
    count = found if replace_all else 1
    grows = len(new_text.encode("utf-8")) - len(old_text.encode("utf-8"))
    if len(data) + count * grows > MAX_EDIT_RESULT_BYTES:
        raise LimitError(
            f"the edit would make {path} {len(data) + count * grows} bytes; an edit may "
            f"leave at most {MAX_EDIT_RESULT_BYTES}",
            hint="write the new content whole with task_write_file",
            details={"path": path},
        )
    new = text.replace(old_text, new_text, -1 if replace_all else 1)
    diff, cut = _diff(path, text, new)
    if new == text:  # nothing changes: leave the file (and its mtime) alone
        return FileEditResult(
            path=path,
            replacements=count,
            diff="",
            diff_truncated=False,
            size=end.stat.size,
            mode=_octal(end.stat.mode),
            mtime=_iso(end.stat.mtime_ns),
        )

    now = _stat(ch, path, wire, "edit", timeout)
    if (now.kind, now.size, now.mtime_ns) != (end.stat.kind, end.stat.size, end.stat.mtime_ns):
        raise InvalidInputError(
            f"{path} changed while it was being edited (size or modification time): "
            "nothing was written",
            hint="read it again and retry the edit",
            details={"path": path},
        )
    request = WriteFile(wire, mode=end.stat.mode, keep_mode=True, make_parents=False)
    written = ch.write_file(request, [new.encode("utf-8")], timeout)
    if isinstance(written, Error):
        _fail(written, path, "edit")
    return FileEditResult(
        path=path,
        replacements=found if replace_all else 1,
        diff=diff,
        diff_truncated=cut,
        size=written.stat.size,
        mode=_octal(written.stat.mode),
        mtime=_iso(written.stat.mtime_ns),
    )


def _check_editable(path: str, st: FileStat) -> None:
    if st.kind == FileKind.SYMLINK:
        target = st.link_target.decode("utf-8", "backslashreplace")
        shown = posixpath.normpath(posixpath.join(posixpath.dirname(path), target))
        raise InvalidInputError(
            f"{path} is a symbolic link to {target!r}; edit refuses to replace a link by a file",
            hint=f"edit the file it points to: {shown}",
            details={"path": path, "link_target": target},
        )
    if st.kind == FileKind.DIR:
        _fail(Error(errno.EISDIR, "is a directory"), path, "edit")
    if st.kind != FileKind.FILE:
        _fail(Error(errno.EINVAL, "not a regular file"), path, "edit")
    if st.size > MAX_EDIT_BYTES:
        _too_big(path, st.size)


def _too_big(path: str, size: int) -> NoReturn:
    raise LimitError(
        f"{path} is {size} bytes; edit works on files up to {MAX_EDIT_BYTES} bytes",
        hint="change it with a command via task_exec (e.g. sed), or rewrite it with "
        "task_write_file",
        details={"path": path, "size": size},
    )


_NUMBERED = re.compile(r"^ *\d+\t", re.MULTILINE)


def _near_miss_hint(text: str, old: str) -> str:
    """Why old_text may have missed: line endings, whitespace, or a numbered view."""
    if "\r\n" in text and "\r\n" not in old and old.replace("\n", "\r\n") in text:
        return (
            "it matches if line endings are ignored: the file uses CRLF ('\\r\\n'); "
            "put '\\r\\n' in old_text (and new_text)"
        )
    if "\r\n" in old and old.replace("\r\n", "\n") in text:
        return "it matches if line endings are ignored: the file uses '\\n', old_text '\\r\\n'"
    if _NUMBERED.search(old) and _NUMBERED.sub("", old) in text:
        return (
            "it matches without the line-number prefixes: copy old_text from a read "
            "without line_numbers"
        )
    squeeze = re.compile(r"\s+")
    if squeeze.sub(" ", old).strip() and squeeze.sub(" ", old).strip() in squeeze.sub(" ", text):
        return (
            "it matches if whitespace is ignored (indentation, tabs versus spaces or line "
            "breaks differ): copy old_text exactly from task_read_file"
        )
    return "copy old_text exactly (whitespace included) from task_read_file, without line numbers"


def _diff(path: str, old: str, new: str) -> tuple[str, bool]:
    """A unified diff of old→new with 3 lines of context, capped; only the changed span
    (between the common head and tail) goes through difflib, which keeps big files cheap."""
    a, b = _split_lines(old), _split_lines(new)
    head = 0
    while head < min(len(a), len(b)) and a[head] == b[head]:
        head += 1
    tail = 0
    while tail < min(len(a), len(b)) - head and a[-1 - tail] == b[-1 - tail]:
        tail += 1
    lo = max(0, head - 3)
    a_span, b_span = a[lo : len(a) - max(0, tail - 3)], b[lo : len(b) - max(0, tail - 3)]
    if len(a_span) + len(b_span) > 2 * _DIFF_MAX_SPAN:
        return "", True
    lines: list[str] = []
    size = 0
    cut = False
    for raw in difflib.unified_diff(a_span, b_span, f"a{path}", f"b{path}", n=3):
        line = _shift_hunk(raw, lo) if raw.startswith("@@") else raw
        if not line.endswith("\n"):
            line += "\n\\ No newline at end of file\n"
        if len(lines) >= DIFF_MAX_LINES or size + len(line.encode("utf-8")) > DIFF_MAX_BYTES:
            cut = True
            break
        lines.append(line)
        size += len(line.encode("utf-8"))
    return "".join(lines), cut


_HUNK = re.compile(r"^@@ -(\d+)((?:,\d+)?) \+(\d+)((?:,\d+)?) @@")


def _shift_hunk(header: str, by: int) -> str:
    m = _HUNK.match(header)
    if m is None or not by:
        return header
    return f"@@ -{int(m[1]) + by}{m[2]} +{int(m[3]) + by}{m[4]} @@" + header[m.end() :]


# -------------------------------------------------------------------- list


def list_files(
    ch: AgentChannel,
    path: str,
    *,
    recursive: bool = False,
    max_entries: int = DEFAULT_LIST_ENTRIES,
    timeout: float = DEFAULT_FILE_TIMEOUT,
) -> FileListResult:
    """The entries of a folder (with ``recursive``, of everything below it, never through a
    symlink), at most ``max_entries`` (≤ 10000), sorted by path. A symlink to a folder as
    ``path`` is followed. A path that is not a folder is an error (read it instead)."""
    wire = _absolute(path)
    path = wire.decode("utf-8")
    timeout = _check_timeout(timeout)
    if not isinstance(recursive, bool):
        raise InvalidInputError(
            f"recursive must be true or false, got {recursive!r}", hint="pass a bool"
        )
    check_int("max_entries", max_entries, 1, MAX_LIST_ENTRIES)
    raw, end = ch.list_dir(ListDir(wire, recursive, max_entries), timeout)
    if isinstance(end, Error):
        if end.errno_code == errno.ENOTDIR:
            _not_a_folder(ch, path, wire, timeout)
        _fail(end, path, "list")
    raw.sort(key=lambda e: e.name.split(b"/"))
    entries = [_entry(e.name, e.stat) for e in raw]
    return FileListResult(
        path=path,
        recursive=recursive,
        entries=entries,
        count=len(entries),
        truncated=end.truncated,
    )


def _not_a_folder(ch: AgentChannel, path: str, wire: bytes, timeout: float) -> None:
    """LIST said ENOTDIR: if ``path`` itself exists (so its parents are folders), it is
    what is not a folder; raise saying so. Otherwise return (a parent is a file)."""
    st = ch.stat(wire, timeout)
    if isinstance(st, Error) or st.kind == FileKind.DIR:
        return
    hint = f"read it with task_read_file, or list its folder {posixpath.dirname(path)}"
    if st.kind == FileKind.SYMLINK:
        target = st.link_target.decode("utf-8", "backslashreplace")
        what = f"a symbolic link to {target!r}, which is not a directory"
    else:
        what = f"a {_TYPES.get(st.kind, 'other').replace('_', ' ')}, not a directory"
    raise InvalidInputError(f"{path} is {what}", hint=hint, details={"path": path})


def _text_and_raw(name: bytes) -> tuple[str, str | None]:
    try:
        return name.decode("utf-8"), None
    except UnicodeDecodeError:
        return name.decode("utf-8", "backslashreplace"), base64.b64encode(name).decode("ascii")


def _entry(name: bytes, st: FileStat) -> FileEntry:
    text, raw = _text_and_raw(name)
    target = target_raw = None
    if st.kind == FileKind.SYMLINK:
        target, target_raw = _text_and_raw(st.link_target)
    return FileEntry(
        path=text,
        path_base64=raw,
        type=_TYPES.get(st.kind, "other"),
        size=st.size,
        mode=_octal(st.mode),
        mtime=_iso(st.mtime_ns),
        link_target=target,
        link_target_base64=target_raw,
    )
