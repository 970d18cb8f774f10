"""Exporting a tree out of an untrusted guest to a host folder or tar archive.

The reverse of seeding (:mod:`pyro_mcp.workspace.archive`), held to the same caps
(:class:`~pyro_mcp.workspace.archive.SeedLimits`) and to these rules, because
everything the guest says may be a lie:

* Data only moves through the agent: one STAT of ``source``, one recursive LIST,
  then one READ_FILE per regular file, streamed. No guest filesystem is parsed here.
* Nothing is written outside ``dest`` and no link is followed while writing: the
  tree is built in a fresh private folder (or file) beside ``dest``; every entry is
  created relative to a directory fd that this module made itself (``O_EXCL``,
  ``O_NOFOLLOW``), then the whole is renamed into place. On failure the temporary
  is removed and ``dest`` is left as it was.
* Entries are checked against the whole listing before anything is read. What
  breaks a rule is skipped and reported (``ExportResult.skipped``), never fatal:

  ======================  ========================================================
  reason                  skipped
  ======================  ========================================================
  ``symlink_escape``      a link that is absolute or resolves (lexically, through
                          the other links of the listing) outside the exported
                          tree
  ``special_file``        FIFOs, sockets, character and block devices
  ``invalid_name``        a name with an empty, ``.`` or ``..`` component or a NUL
  ``name_too_long``       a name component over 255 bytes
  ``too_deep``            more than ``max_depth`` levels below ``source``
  ``too_many_entries``    entries past ``SeedLimits.max_entries`` (``.``: the
                          listing was cut)
  ``file_size``           a file over ``SeedLimits.max_file_bytes`` (never read)
  ``total_size``          a file that would bring the bytes over
                          ``max_total_bytes``
  ``duplicate``           a name listed twice (the first one wins)
  ``no_parent``           an entry whose folder was not listed as a folder
  ``unreadable``          a file the agent could not read (it vanished or changed
                          type)
  ``changed``             a file whose data differs from its listing; it IS
                          exported, with the bytes read (never more than listed)
  ``timeout``             the file in flight and the rest when ``timeout`` ran out
  ======================  ========================================================

  Entries below a skipped folder are dropped without a line of their own.
* Modes are kept without setuid/setgid (and without sticky on files); folders keep
  ``0o700`` and files ``0o400`` for their owner. Everything belongs to the user
  running pyro (tar members: uid/gid 0, no user or group names).
* ``dest``: a non-empty folder or an existing archive is refused unless
  ``overwrite``, which swaps the new tree in (``renameat2(RENAME_EXCHANGE)``, else
  two renames) and removes the old one with ``shutil.rmtree`` (fd-based, never
  follows links); a symlink at ``dest`` is always refused. docs/files.md
  is the user's description.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import gzip
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from pydantic import BaseModel, Field

from pyro_mcp.errors import GuestProtocolError, InvalidInputError, NotFoundError, PyroError
from pyro_mcp.guest.channel import AgentChannel
from pyro_mcp.guest.protocol import (
    MAX_LIST_ENTRIES,
    Error,
    FileKind,
    FileStat,
    ListDir,
    ReadEnd,
    ReadFile,
)
from pyro_mcp.progress import ProgressEvent, ProgressFn
from pyro_mcp.workspace.archive import SeedLimits

log = logging.getLogger(__name__)

ExportFormat = Literal["directory", "tar", "tar.gz"]
MAX_DEPTH = 64  # the agent's own recursion limit for a LIST
NAME_MAX = 255  # bytes in one host file name
DEFAULT_TIMEOUT = 600.0
MAX_REPORTED = 1000  # skipped entries listed in a result (all are counted)
_SPOOL_IN_MEMORY = 1 << 20  # a tar member up to this size is spooled in memory
_TMP_PREFIX = ".pyro-export-"


class ExportError(PyroError):
    """Writing the export on the host failed; ``dest`` is left as it was."""

    code = "export_failed"


class SkippedEntry(BaseModel):
    path: str = Field(
        description="The entry's path relative to the source, as escaped text: bytes that "
        "are not UTF-8 as \\xNN, control characters as \\n, \\t or \\xNN, a backslash as \\\\."
    )
    reason: str = Field(description="Why, e.g. 'symlink_escape', 'special_file', 'file_size'.")
    detail: str = Field(default="", description="One human line: the target, size or error.")


class ExportResult(BaseModel):
    """What an export wrote; entries it left out are in ``skipped``."""

    dest: str = Field(description="Absolute host path of the folder or archive written.")
    format: ExportFormat = Field(description="'directory', 'tar' or 'tar.gz'.")
    files: int = Field(description="Regular files written.")
    directories: int = Field(description="Folders written (the top folder not counted).")
    symlinks: int = Field(description="Symlinks written (all relative and inside the tree).")
    bytes: int = Field(description="File bytes written.")
    skipped: list[SkippedEntry] = Field(
        description=f"Entries left out (or, reason 'changed', kept as read); the first "
        f"{MAX_REPORTED}."
    )
    skipped_count: int = Field(description="All entries reported, listed or not.")
    truncated: bool = Field(description="A cap or the timeout stopped part of the tree.")
    duration_ms: int


def export_format(dest: Path) -> ExportFormat:
    """The format a destination's name asks for: .tar, .tar.gz / .tgz, else a folder."""
    name = dest.name
    if name.endswith((".tar.gz", ".tgz")):
        return "tar.gz"
    if name.endswith(".tar"):
        return "tar"
    return "directory"


def show_name(raw: bytes) -> str:
    """A guest name as one line of text that says which bytes it has."""
    out: list[str] = []
    text = raw.decode("utf-8", "surrogateescape")
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or 0x7F <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


# --------------------------------------------------------------------------- planning


Parts = tuple[bytes, ...]


@dataclass
class _Report:
    items: list[SkippedEntry]
    count: int = 0
    truncated: bool = False

    def add(self, parts: Parts | bytes, reason: str, detail: str = "") -> None:
        self.count += 1
        if len(self.items) < MAX_REPORTED:
            raw = parts if isinstance(parts, bytes) else b"/".join(parts)
            self.items.append(SkippedEntry(path=show_name(raw), reason=reason, detail=detail))


@dataclass(frozen=True)
class _Item:
    parts: Parts
    st: FileStat


def _name_problem(parts: Parts) -> tuple[str, str] | None:
    for part in parts:
        if part in (b"", b".", b"..") or b"\x00" in part or b"/" in part:
            return "invalid_name", "has an empty, '.' or '..' component or a NUL byte"
        if len(part) > NAME_MAX:
            return "name_too_long", f"has a component of {len(part)} bytes (limit {NAME_MAX})"
    return None


def _resolve(
    start: list[bytes], target: bytes, links: dict[Parts, bytes], depth: int = 0
) -> list[bytes] | None:
    """Where ``target``, read from folder ``start`` of the exported tree, leads; None
    when it leaves the tree (or loops).

    Purely lexical, on the listing: a component that names a listed symlink is
    replaced by that link's target, so ``d -> .`` then ``e -> d/../..`` is caught.
    """
    if depth > 40 or target.startswith(b"/"):
        return None
    stack = list(start)
    for comp in target.split(b"/"):
        if comp in (b"", b"."):
            continue
        if comp == b"..":
            if not stack:
                return None
            stack.pop()
            continue
        stack.append(comp)
        link = links.get(tuple(stack))
        if link is not None:
            stack.pop()
            resolved = _resolve(stack, link, links, depth + 1)
            if resolved is None:
                return None
            stack = resolved
    return stack


@dataclass
class _Plan:
    items: list[_Item]  # accepted, parents first (sorted by path components)
    total_bytes: int


def _plan(
    listing: list[tuple[Parts, FileStat]],
    caps: SeedLimits,
    max_depth: int,
    report: _Report,
) -> _Plan:
    listing.sort(key=lambda e: e[0])
    links = {parts: st.link_target for parts, st in listing if st.kind == FileKind.SYMLINK}
    accepted_dirs: set[Parts] = {()}
    dropped_dirs: set[Parts] = set()
    seen: set[Parts] = set()
    items: list[_Item] = []
    total = 0
    for parts, st in listing:
        if parts in seen:
            report.add(parts, "duplicate", "listed more than once")
            continue
        seen.add(parts)
        parent = parts[:-1]
        if parent not in accepted_dirs:
            if parent in dropped_dirs:
                if st.kind == FileKind.DIR:
                    dropped_dirs.add(parts)
            else:
                report.add(parts, "no_parent", "its folder was not listed as a folder")
            continue
        problem = _name_problem(parts)
        if problem is None and len(parts) > max_depth:
            problem = "too_deep", f"is {len(parts)} levels deep (limit {max_depth})"
        if problem is None and len(items) >= caps.max_entries:
            problem = "too_many_entries", f"is past the cap of {caps.max_entries} entries"
        if problem is None:
            problem = _kind_problem(parts, st, caps, total, links)
        if problem is not None:
            reason, detail = problem
            report.add(parts, reason, detail)
            if reason in ("too_deep", "too_many_entries", "file_size", "total_size"):
                report.truncated = True
            if st.kind == FileKind.DIR:
                dropped_dirs.add(parts)
            continue
        if st.kind == FileKind.DIR:
            accepted_dirs.add(parts)
        elif st.kind == FileKind.FILE:
            total += st.size
        items.append(_Item(parts, st))
    return _Plan(items, total)


def _kind_problem(
    parts: Parts, st: FileStat, caps: SeedLimits, total: int, links: dict[Parts, bytes]
) -> tuple[str, str] | None:
    if st.kind == FileKind.FILE:
        if st.size > caps.max_file_bytes:
            return (
                "file_size",
                f"is {st.size} bytes, over the per-file cap of {caps.max_file_bytes}",
            )
        if total + st.size > caps.max_total_bytes:
            return "total_size", f"would bring the export over {caps.max_total_bytes} bytes"
        return None
    if st.kind == FileKind.SYMLINK:
        target = st.link_target
        if target.startswith(b"/"):
            return "symlink_escape", f"points to absolute path {show_name(target)}"
        if _resolve(list(parts[:-1]), target, links) is None:
            return "symlink_escape", f"points to {show_name(target)}, outside the exported tree"
        return None
    if st.kind == FileKind.DIR:
        return None
    return "special_file", f"is a {st.kind.name.lower().replace('_', ' ')}"


# --------------------------------------------------------------------------- writers


def _file_mode(mode: int) -> int:
    return (mode & 0o777) | 0o400


def _dir_mode(mode: int) -> int:
    return (mode & 0o1777) | 0o700


class _Writer:
    """Where accepted entries go, in listing order (parents first)."""

    path: str  # the private temporary beside dest

    def mkdir(self, parts: Parts, st: FileStat) -> None:
        raise NotImplementedError

    def symlink(self, parts: Parts, st: FileStat) -> None:
        raise NotImplementedError

    def file(self, parts: Parts, st: FileStat) -> _FileSink:
        raise NotImplementedError

    def finish(self, root: FileStat | None) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError


class _FileSink:
    """One file's bytes as they arrive; ``commit`` or ``abandon`` it."""

    def __init__(self, out: IO[bytes]) -> None:
        self.out = out
        self.size = 0

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = self.out.write(view)
            view = view[n:]
        self.size += len(data)

    def commit(self, st: FileStat) -> None:
        raise NotImplementedError

    def abandon(self) -> None:
        raise NotImplementedError


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


class _DirWriter(_Writer):
    """Builds the tree in a private folder, through directory fds only.

    Entries come parents first and each folder's subtree in one run, so the open
    folders are a stack: the top is the parent of the next entry once the folders
    it is not in are closed (and given their mtime).
    """

    def __init__(self, parent: Path) -> None:
        self.path = tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent)
        self._stack: list[tuple[Parts, int, int]] = []  # (parts, fd, mtime_ns)
        self._root_fd = os.open(self.path, _O_DIR)

    def _parent(self, parts: Parts) -> int:
        parent = parts[:-1]
        while self._stack and self._stack[-1][0] != parent:
            self._pop()
        if not self._stack:
            if parent:
                raise ExportError(
                    f"internal error: folder {show_name(b'/'.join(parent))} is closed"
                )
            return self._root_fd
        return self._stack[-1][1]

    def _pop(self) -> None:
        _, fd, mtime_ns = self._stack.pop()
        try:
            with contextlib.suppress(OSError, OverflowError):
                os.utime(fd, ns=(mtime_ns, mtime_ns))
        finally:
            os.close(fd)

    def mkdir(self, parts: Parts, st: FileStat) -> None:
        pfd = self._parent(parts)
        os.mkdir(parts[-1], 0o700, dir_fd=pfd)
        fd = os.open(parts[-1], _O_DIR, dir_fd=pfd)
        try:
            os.fchmod(fd, _dir_mode(st.mode))
        except BaseException:
            os.close(fd)
            raise
        self._stack.append((parts, fd, st.mtime_ns))

    def symlink(self, parts: Parts, st: FileStat) -> None:
        pfd = self._parent(parts)
        os.symlink(st.link_target, parts[-1], dir_fd=pfd)
        with contextlib.suppress(OSError, OverflowError):
            os.utime(parts[-1], ns=(st.mtime_ns, st.mtime_ns), dir_fd=pfd, follow_symlinks=False)

    def file(self, parts: Parts, st: FileStat) -> _FileSink:
        pfd = self._parent(parts)
        fd = os.open(parts[-1], _O_NEW, 0o600, dir_fd=pfd)
        # unbuffered: data comes in chunks of up to 64 KiB, and a buffer per tiny file costs
        return _DirFile(os.fdopen(fd, "wb", buffering=0), pfd, parts[-1])

    def finish(self, root: FileStat | None) -> None:
        while self._stack:
            self._pop()
        if root is not None:
            os.fchmod(self._root_fd, _dir_mode(root.mode))
            with contextlib.suppress(OSError, OverflowError):
                os.utime(self._root_fd, ns=(root.mtime_ns, root.mtime_ns))
        else:
            os.fchmod(self._root_fd, 0o755)
        os.close(self._root_fd)
        self._root_fd = -1

    def discard(self) -> None:
        while self._stack:
            with contextlib.suppress(OSError):
                os.close(self._stack.pop()[1])
        if self._root_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._root_fd)
            self._root_fd = -1
        _remove(self.path)


class _DirFile(_FileSink):
    def __init__(self, out: IO[bytes], dir_fd: int, name: bytes) -> None:
        super().__init__(out)
        self._dir_fd = dir_fd
        self._name = name

    def commit(self, st: FileStat) -> None:
        with self.out:
            self.out.flush()
            fd = self.out.fileno()
            os.fchmod(fd, _file_mode(st.mode))
            with contextlib.suppress(OSError, OverflowError):
                os.utime(fd, ns=(st.mtime_ns, st.mtime_ns))

    def abandon(self) -> None:
        with contextlib.suppress(OSError):
            self.out.close()
        os.unlink(self._name, dir_fd=self._dir_fd)


class _TarWriter(_Writer):
    """Writes a PAX tar (gzip on the host when asked) into a private file beside dest."""

    def __init__(self, parent: Path, gz: bool) -> None:
        fd, self.path = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=".tmp", dir=parent)
        self._parent_dir = parent
        self._raw = os.fdopen(fd, "wb", buffering=1 << 20)
        self._gz: gzip.GzipFile | None = None
        out: IO[bytes] = self._raw
        if gz:
            self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, mtime=0)
            out = self._gz  # type: ignore[assignment]
        self._tar = tarfile.open(  # noqa: SIM115 (closed in finish/discard)
            fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, errors="surrogateescape"
        )

    @staticmethod
    def _info(parts: Parts, st: FileStat, kind: bytes) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(b"/".join(parts).decode("utf-8", "surrogateescape"))
        ti.type = kind
        ti.mtime = max(0, st.mtime_ns // 1_000_000_000)
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = ""
        return ti

    def mkdir(self, parts: Parts, st: FileStat) -> None:
        ti = self._info(parts, st, tarfile.DIRTYPE)
        ti.mode = _dir_mode(st.mode)
        self._tar.addfile(ti)

    def symlink(self, parts: Parts, st: FileStat) -> None:
        ti = self._info(parts, st, tarfile.SYMTYPE)
        ti.mode = 0o777
        ti.linkname = st.link_target.decode("utf-8", "surrogateescape")
        self._tar.addfile(ti)

    def file(self, parts: Parts, st: FileStat) -> _FileSink:
        spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by the sink)
            max_size=_SPOOL_IN_MEMORY, dir=os.fspath(self._parent_dir)
        )
        return _TarFile(spool, self, parts)

    def add(self, ti: tarfile.TarInfo, data: IO[bytes]) -> None:
        self._tar.addfile(ti, data)

    def finish(self, root: FileStat | None) -> None:
        del root
        self._tar.close()
        if self._gz is not None:
            self._gz.close()
        self._raw.flush()
        os.fchmod(self._raw.fileno(), 0o644)
        self._raw.close()

    def discard(self) -> None:
        for closer in (self._tar, self._gz, self._raw):
            if closer is not None:
                with contextlib.suppress(Exception):
                    closer.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class _TarFile(_FileSink):
    def __init__(self, out: IO[bytes], tar: _TarWriter, parts: Parts) -> None:
        super().__init__(out)
        self._tar = tar
        self._parts = parts

    def commit(self, st: FileStat) -> None:
        with self.out:
            ti = self._tar._info(self._parts, st, tarfile.REGTYPE)
            ti.mode = _file_mode(st.mode)
            ti.size = self.size
            self.out.seek(0)
            self._tar.add(ti, self.out)

    def abandon(self) -> None:
        self.out.close()


def _remove(path: str) -> None:
    """Remove what sits at ``path`` without following a link there (fd-based rmtree)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)
    else:
        os.unlink(path)


# --------------------------------------------------------------------------- placing


_RENAME_EXCHANGE = 2


def _exchange(a: str, b: str) -> bool:
    """Swap two paths atomically (``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err), b)


def _place(tmp: str, dest: Path, fmt: ExportFormat, overwrite: bool) -> None:
    target = os.fspath(dest)
    try:
        if fmt != "directory":
            if overwrite:
                os.replace(tmp, target)  # replaces a link at dest itself, never follows it
            else:
                os.link(tmp, target, follow_symlinks=False)  # fails if anything is there
                os.unlink(tmp)
            return
        try:
            os.rename(tmp, target)  # over nothing or an empty folder only
            return
        except OSError as exc:
            if not overwrite or exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        st = os.lstat(target)
        if not stat.S_ISDIR(st.st_mode):
            raise _dest_kind(dest, fmt)
        if _exchange(tmp, target):
            _remove_old(tmp)
            return
        old = tempfile.mkdtemp(prefix=_TMP_PREFIX + "old-", dir=dest.parent)
        try:
            os.rename(target, old)
        except OSError:
            os.rmdir(old)
            raise
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old, target)
            raise
        _remove_old(old)
    except FileExistsError:
        raise _dest_exists(dest) from None
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise _dest_exists(dest) from None
        if exc.errno in (errno.ENOTDIR, errno.EISDIR):
            raise _dest_kind(dest, fmt) from None
        raise


def _remove_old(path: str) -> None:
    try:
        _remove(path)
    except OSError as exc:  # the export is in place; the old tree is only debris
        log.warning("could not remove the replaced export at %s: %s", path, exc)


def _dest_exists(dest: Path) -> InvalidInputError:
    return InvalidInputError(
        f"{dest} already exists and is not empty",
        hint="choose another destination, remove it, or pass overwrite=True to replace it",
        details={"dest": str(dest)},
    )


def _dest_kind(dest: Path, fmt: ExportFormat) -> InvalidInputError:
    want = "a folder" if fmt == "directory" else "an archive file"
    return InvalidInputError(
        f"{dest} exists and is not {want}: an export never replaces one kind with another",
        hint="choose another destination, or remove what is there",
        details={"dest": str(dest)},
    )


def _check_dest(dest: Path, fmt: ExportFormat, overwrite: bool) -> Path:
    dest = Path(os.path.abspath(dest))
    parent = dest.parent
    if dest == parent:
        raise InvalidInputError(f"{dest} cannot be a destination", hint="name a new folder")
    if not parent.is_dir():
        raise InvalidInputError(
            f"the folder of the destination, {parent}, does not exist",
            hint="create it first",
            details={"dest": str(dest)},
        )
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        return dest
    except OSError as exc:
        raise InvalidInputError(f"cannot inspect {dest}: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise InvalidInputError(
            f"{dest} is a symlink; an export never writes through one",
            hint="give the real path of the destination, or remove the link",
            details={"dest": str(dest)},
        )
    if fmt == "directory":
        if not stat.S_ISDIR(st.st_mode):
            raise _dest_kind(dest, fmt)
        if not overwrite:
            try:
                with os.scandir(dest) as it:
                    empty = next(it, None) is None
            except OSError as exc:
                raise InvalidInputError(f"cannot read {dest}: {exc.strerror}") from None
            if not empty:
                raise _dest_exists(dest)
    else:
        if not stat.S_ISREG(st.st_mode):
            raise _dest_kind(dest, fmt)
        if not overwrite:
            raise _dest_exists(dest)
    return dest


# --------------------------------------------------------------------------- export


class _Deadline(Exception):
    pass


class _HostWriteFailed(Exception):
    """A host write failed inside a channel call (so it is not read as the channel's)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(str(error))
        self.error = error


def _channel_failed(exc: OSError) -> GuestProtocolError:
    return GuestProtocolError(f"the guest agent channel failed: {exc.strerror or exc}")


def _guest_path(source: str) -> bytes:
    if not isinstance(source, str) or not source.startswith("/") or "\x00" in source:
        raise InvalidInputError(
            f"source must be an absolute guest path, got {source!r}",
            hint="e.g. /workspace or /workspace/build/out.bin",
        )
    raw = os.fsencode(source)
    while raw.endswith(b"/") and raw != b"/":
        raw = raw[:-1]
    return raw


def _guest_error(source: str, err: Error, what: str) -> PyroError:
    if err.errno_code == errno.ENOENT:
        return NotFoundError(f"{source} does not exist in the guest", details={"source": source})
    return InvalidInputError(
        f"cannot {what} {source} in the guest: {err.message} (errno {err.errno_code})",
        details={"source": source, "errno": err.errno_code},
    )


def export_tree(
    ch: AgentChannel,
    source: str,
    dest: Path,
    *,
    overwrite: bool = False,
    caps: SeedLimits | None = None,
    max_depth: int = MAX_DEPTH,
    timeout: float = DEFAULT_TIMEOUT,
    progress: ProgressFn | None = None,
) -> ExportResult:
    """Copy guest ``source`` (a folder or one regular file) to host ``dest``.

    ``dest`` ending in ``.tar``, ``.tar.gz`` or ``.tgz`` gets a tar archive (PAX,
    gzip done here), anything else a folder (a single file goes inside it). An
    existing non-empty folder or an existing archive is refused unless
    ``overwrite``: then the new tree is swapped in atomically (``RENAME_EXCHANGE``,
    else two renames) and the old one removed without following its links. A
    symlink at ``dest`` is always refused. ``timeout`` bounds the whole export;
    what is left when it runs out is reported and the rest kept.
    """
    started = time.monotonic()
    deadline = started + timeout
    caps = caps or SeedLimits()
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 1:
        raise InvalidInputError("max_depth must be a positive integer")
    raw_source = _guest_path(source)
    fmt = export_format(Path(dest))
    dest = _check_dest(Path(dest), fmt, overwrite)
    report = _Report(items=[])

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Deadline
        return remaining

    try:
        base, plan, folder_st = _plan_source(ch, source, raw_source, caps, max_depth, report, left)
    except OSError as exc:  # the pipe or socket to the guest broke
        raise _channel_failed(exc) from None
    except (_Deadline, GuestProtocolError):
        if time.monotonic() < deadline:
            raise  # the guest broke the protocol (or stopped) within the time
        raise ExportError(
            f"listing {source} in the guest took longer than the export's {timeout:.0f} s",
            hint="export a smaller folder, or give it more time",
            details={"source": source},
        ) from None

    writer: _Writer
    try:
        writer = (
            _DirWriter(dest.parent)
            if fmt == "directory"
            else _TarWriter(dest.parent, gz=fmt == "tar.gz")
        )
    except OSError as exc:
        raise ExportError(
            f"cannot create a temporary beside {dest}: {exc.strerror}",
            hint="the destination's folder must be writable",
        ) from None
    counts = {"files": 0, "directories": 0, "symlinks": 0, "bytes": 0}
    try:
        for index, item in enumerate(plan.items):
            try:
                left()
            except _Deadline:
                _report_rest(report, plan.items[index:])
                break
            try:
                _copy_one(ch, base, item, writer, counts, report, left)
            except _Deadline:
                report.add(item.parts, "timeout", "the export's timeout ran out while reading it")
                _report_rest(report, plan.items[index + 1 :])
                break
            if progress is not None and item.st.kind == FileKind.FILE:
                progress(
                    ProgressEvent(
                        "export",
                        show_name(b"/".join(item.parts)),
                        completed=counts["bytes"],
                        total=plan.total_bytes,
                    )
                )
        writer.finish(folder_st)
        _place(writer.path, dest, fmt, overwrite)
    except BaseException as exc:
        writer.discard()
        if isinstance(exc, _HostWriteFailed):
            exc = exc.error
        if isinstance(exc, OSError):
            raise ExportError(
                f"writing the export to {dest} failed: {exc.strerror or exc}",
                hint="check the free space and permissions of the destination's folder",
                details={"dest": str(dest)},
            ) from None
        raise
    return ExportResult(
        dest=str(dest),
        format=fmt,
        files=counts["files"],
        directories=counts["directories"],
        symlinks=counts["symlinks"],
        bytes=counts["bytes"],
        skipped=report.items,
        skipped_count=report.count,
        truncated=report.truncated,
        duration_ms=int((time.monotonic() - started) * 1000),
    )


def _plan_source(
    ch: AgentChannel,
    source: str,
    raw_source: bytes,
    caps: SeedLimits,
    max_depth: int,
    report: _Report,
    left: Callable[[], float],
) -> tuple[bytes, _Plan, FileStat | None]:
    """STAT, then LIST the source: (the guest folder entries are under, the plan, the
    top folder's stat, None for a single file)."""
    root_st = ch.stat(raw_source, left())
    if isinstance(root_st, Error):
        raise _guest_error(source, root_st, "inspect")
    if root_st.kind == FileKind.DIR:
        base = raw_source if raw_source != b"/" else b""
        entries, end = ch.list_dir(
            ListDir(
                raw_source,
                recursive=True,
                max_entries=min(caps.max_entries + 1, MAX_LIST_ENTRIES),
            ),
            left(),
        )
        if isinstance(end, Error):
            raise _guest_error(source, end, "list")
        listing = [(tuple(e.name.split(b"/")), e.stat) for e in entries]
        del entries
        if end.truncated:
            report.add(b".", "too_many_entries", "the guest's listing was cut at the cap")
            report.truncated = True
        plan = _plan(listing, caps, max_depth, report)
        del listing
        return base, plan, root_st
    elif root_st.kind == FileKind.FILE:
        name = raw_source.rsplit(b"/", 1)[1]
        base = raw_source[: -len(name) - 1]
        return base, _plan([((name,), root_st)], caps, max_depth, report), None
    elif root_st.kind == FileKind.SYMLINK:
        raise InvalidInputError(
            f"{source} is a symlink in the guest; an export never follows one",
            hint="export the path it points to",
            details={"source": source},
        )
    raise InvalidInputError(
        f"{source} is a {root_st.kind.name.lower().replace('_', ' ')}; only folders and "
        "regular files can be exported",
        details={"source": source},
    )


def _report_rest(report: _Report, rest: list[_Item]) -> None:
    report.truncated = True
    for item in rest:
        report.add(item.parts, "timeout", "not exported: the export's timeout ran out")


def _copy_one(
    ch: AgentChannel,
    base: bytes,
    item: _Item,
    writer: _Writer,
    counts: dict[str, int],
    report: _Report,
    left: Callable[[], float],
) -> None:
    st = item.st
    if st.kind == FileKind.DIR:
        writer.mkdir(item.parts, st)
        counts["directories"] += 1
        return
    if st.kind == FileKind.SYMLINK:
        writer.symlink(item.parts, st)
        counts["symlinks"] += 1
        return
    sink = writer.file(item.parts, st)
    expected = st.size
    extra = False

    def take(data: bytes) -> None:
        nonlocal extra
        room = expected - sink.size
        if len(data) > room:  # the guest sends more than it was asked for
            extra = True
            data = data[:room]
        if data:
            try:
                sink.write(data)
            except OSError as exc:
                raise _HostWriteFailed(exc) from None
        left()

    try:
        path = base + b"/" + b"/".join(item.parts)
        try:
            end = ch.read_file(ReadFile(path, 0, expected), take, left())
        except OSError as exc:  # the pipe or socket to the guest broke
            raise _channel_failed(exc) from None
    except GuestProtocolError:
        sink.abandon()
        left()  # a quiet guest past the deadline is a timeout, not a broken protocol
        raise
    except BaseException:
        sink.abandon()
        raise
    if isinstance(end, Error):
        sink.abandon()
        report.add(item.parts, "unreadable", f"{end.message} (errno {end.errno_code})")
        return
    sink.commit(st)
    counts["files"] += 1
    counts["bytes"] += sink.size
    if extra or _changed(end, sink.size, expected):
        report.add(
            item.parts,
            "changed",
            f"listed as {expected} bytes, read {sink.size}"
            + (" and more were there" if end.truncated or extra else "")
            + f"; exported as read (file size now {end.stat.size})",
        )


def _changed(end: ReadEnd, got: int, expected: int) -> bool:
    return (
        got != expected
        or end.truncated
        or end.bytes_sent != got
        or end.stat.kind != FileKind.FILE
        or end.stat.size != expected
    )


__all__ = [
    "DEFAULT_TIMEOUT",
    "MAX_DEPTH",
    "ExportError",
    "ExportFormat",
    "ExportResult",
    "SkippedEntry",
    "export_format",
    "export_tree",
    "show_name",
]
