"""What changed in a task's workspace since it was seeded: a summary and a git patch.

:func:`diff_workspace` compares the guest's workspace, seen through the agent
channel (one recursive LIST, then READ_FILE only for files whose metadata differs),
with the seed folder on the host (an ``lstat`` walk), and writes a patch in git's
own format that ``git apply`` takes on the original host folder.

A file whose kind, permission bits, size and mtime in whole seconds are the same on
both sides is taken as unchanged without reading it (the qemu workspace disk is
built by ``mkfs.ext4 -d``, which keeps whole seconds only), unless its seed mtime is
not older than ``racy_since`` (the task's creation) less a second: like git's "racily
clean" entries, a file written on the host just before the task was made could be
changed in the guest within the same second at the same size, so it is read. Every
other file is read from the guest (bounded by the caps) and compared byte for byte
with the seed.

Everything read from the guest is untrusted: names are raw bytes (quoted the way git
quotes them), sizes and contents are bounded by the caps, and nothing from the guest
is ever written on the host or followed there.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import stat
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from pathlib import Path
from typing import Literal, Protocol

from pydantic import BaseModel, Field

from pyro_mcp.errors import InvalidInputError, NotFoundError, StateError
from pyro_mcp.guest.protocol import (
    DirEntry,
    Error,
    FileKind,
    FileStat,
    ListDir,
    ListEnd,
    ReadEnd,
    ReadFile,
)
from pyro_mcp.workspace.archive import Excluder

__all__ = [
    "DEFAULT_MAX_BINARY_BYTES",
    "DEFAULT_MAX_ENTRIES",
    "DEFAULT_MAX_FILES",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_PATCH_BYTES",
    "DiffEntry",
    "DiffResult",
    "FileChannel",
    "SkippedFile",
    "diff_workspace",
]

DEFAULT_MAX_PATCH_BYTES = 8 << 20
DEFAULT_MAX_BINARY_BYTES = 1 << 20
DEFAULT_MAX_FILE_BYTES = 8 << 20
DEFAULT_MAX_FILES = 2000
DEFAULT_MAX_ENTRIES = 100_000
DEFAULT_TIMEOUT = 30.0

CONTEXT = 3
_NULL_ID = b"0" * 40

EntryStatus = Literal["added", "modified", "deleted", "mode_changed", "type_changed"]
EntryKind = Literal["file", "symlink", "dir", "other"]


class DiffEntry(BaseModel):
    """One changed path."""

    path: str = Field(
        description="Relative to the workspace root; bytes that are not UTF-8 as \\xNN."
    )
    status: EntryStatus = Field(
        description="'added', 'modified' (content or symlink target; a mode change may come "
        "with it), 'deleted', 'mode_changed' (only the executable bit) or 'type_changed' "
        "(e.g. file <-> symlink: a delete plus an add in the patch)."
    )
    kind: EntryKind = Field(description="What the path is now ('deleted': what it was).")
    old_mode: str | None = Field(
        description="git's mode before ('100644', '100755', '120000'); null if absent or a dir."
    )
    new_mode: str | None = Field(description="git's mode after; null if deleted or a dir.")
    binary: bool = Field(default=False, description="The content is patched as binary.")
    in_patch: bool = Field(description="The patch carries this change.")


class SkippedFile(BaseModel):
    """A change the patch leaves out, and why."""

    path: str
    reason: str


class DiffResult(BaseModel):
    """The workspace compared with its seed; ``patch`` applies with ``git apply``."""

    root: str = Field(description="The guest folder compared (the workspace root).")
    path: str | None = Field(default=None, description="The subpath the diff was limited to.")
    added: list[str] = Field(default_factory=list)
    modified: list[str] = Field(default_factory=list)
    deleted: list[str] = Field(default_factory=list)
    mode_changed: list[str] = Field(default_factory=list)
    type_changed: list[str] = Field(default_factory=list)
    entries: list[DiffEntry] = Field(
        default_factory=list, description="Every change, folders included, in path order."
    )
    patch: str = Field(description="git's patch format, for `git apply` in the seed folder.")
    patch_bytes: int
    truncated: bool = Field(
        description="Something is missing: a cap cut the patch or the listing, see skipped."
    )
    listing_truncated: bool = Field(
        default=False,
        description="The guest listing stopped at max_entries: deletions are not reported.",
    )
    skipped: list[SkippedFile] = Field(default_factory=list)
    files_compared: int = Field(description="Guest files read (metadata alone did not decide).")
    summary: str


class FileChannel(Protocol):
    """What the diff needs of the guest: :class:`~pyro_mcp.guest.channel.AgentChannel`
    has it (another backend can offer the same three calls over its own transport)."""

    def list_dir(
        self, request: ListDir, timeout: float
    ) -> tuple[list[DirEntry], ListEnd | Error]: ...

    def read_file(
        self, request: ReadFile, sink: Callable[[bytes], None], timeout: float
    ) -> ReadEnd | Error: ...

    def stat(self, path: bytes, timeout: float) -> FileStat | Error: ...


# ------------------------------------------------------------------ the two trees


@dataclass(frozen=True)
class _Node:
    kind: FileKind
    perm: int
    size: int
    mtime_s: int
    target: bytes = b""

    @property
    def git_mode(self) -> int | None:
        if self.kind == FileKind.FILE:
            return 0o100755 if self.perm & stat.S_IXUSR else 0o100644
        if self.kind == FileKind.SYMLINK:
            return 0o120000
        return None


_HOST_KINDS = (
    (stat.S_ISREG, FileKind.FILE),
    (stat.S_ISDIR, FileKind.DIR),
    (stat.S_ISLNK, FileKind.SYMLINK),
    (stat.S_ISFIFO, FileKind.FIFO),
    (stat.S_ISSOCK, FileKind.SOCKET),
    (stat.S_ISCHR, FileKind.CHAR_DEVICE),
    (stat.S_ISBLK, FileKind.BLOCK_DEVICE),
)


def _host_node(path: bytes) -> _Node | None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    kind = next(k for test, k in _HOST_KINDS if test(st.st_mode))
    target = os.readlink(path) if kind == FileKind.SYMLINK else b""
    return _Node(kind, st.st_mode & 0o7777, st.st_size, st.st_mtime_ns // 10**9, target)


def _text(rel: bytes) -> str:
    return rel.decode("utf-8", "backslashreplace")


def _check_subpath(path: str | None) -> bytes:
    if path is None:
        return b""
    raw = os.fsencode(path)
    parts = [p for p in raw.split(b"/") if p not in (b"", b".")]
    if raw.startswith(b"/") or b"\0" in raw or b".." in parts:
        raise InvalidInputError(
            f"path must be relative to the workspace, without '..': {path!r}",
            hint="give a path like 'src' or 'src/app.py'",
        )
    return b"/".join(parts)


def _seed_tree(seed_dir: Path | None, sub: bytes, excluder: Excluder) -> dict[bytes, _Node]:
    """``lstat`` of every seed entry under ``sub`` (all if empty), excluded ones pruned."""
    nodes: dict[bytes, _Node] = {}
    if seed_dir is None:
        return nodes
    root = os.fsencode(seed_dir)
    if not os.path.isdir(root):
        raise NotFoundError(
            f"the seed folder {seed_dir} is gone",
            hint="the task's seed copy was removed from pyro's state folder",
        )
    if sub:
        parts = sub.split(b"/")
        for i in range(1, len(parts)):  # an ancestor that is not a folder: nothing below
            node = _host_node(root + b"/" + b"/".join(parts[:i]))
            if node is None or node.kind != FileKind.DIR:
                return nodes
        top = _host_node(root + b"/" + sub)
        if top is None:
            return nodes
        nodes[sub] = top
        if top.kind != FileKind.DIR:
            return nodes
    stack = [sub]
    while stack:
        folder = stack.pop()
        with os.scandir(root + b"/" + folder if folder else root) as it:
            names = [e.name for e in it]
        for name in names:
            rel = folder + b"/" + name if folder else name
            if excluder and excluder.matches(os.fsdecode(rel)):
                continue
            node = _host_node(root + b"/" + rel)
            if node is None:
                continue
            nodes[rel] = node
            if node.kind == FileKind.DIR:
                stack.append(rel)
    return nodes


def _safe_name(name: bytes) -> bool:
    """A relative path without empty, ``.`` or ``..`` parts (the agent never sends others)."""
    return (
        bool(name)
        and b"\0" not in name
        and all(p not in (b"", b".", b"..") for p in name.split(b"/"))
    )


def _guest_tree(
    ch: FileChannel, root: bytes, sub: bytes, max_entries: int, timeout: float, bad: list[bytes]
) -> tuple[dict[bytes, _Node], bool]:
    """The guest's entries under ``sub`` (one recursive LIST) and whether it was cut;
    names no honest agent sends go to ``bad``."""
    nodes: dict[bytes, _Node] = {}
    if sub:
        parts = sub.split(b"/")
        for i in range(1, len(parts) + 1):
            got = ch.stat(root + b"/" + b"/".join(parts[:i]), timeout)
            if isinstance(got, Error):
                if got.errno_code in (errno.ENOENT, errno.ENOTDIR):
                    return nodes, False
                raise _guest_error(root + b"/" + sub, got)
            node = _Node(got.kind, got.mode, got.size, got.mtime_ns // 10**9, got.link_target)
            if i < len(parts) and node.kind != FileKind.DIR:
                return nodes, False
        nodes[sub] = node
        if node.kind != FileKind.DIR:
            return nodes, False
    where = root + b"/" + sub if sub else root
    entries, end = ch.list_dir(ListDir(where, recursive=True, max_entries=max_entries), timeout)
    if isinstance(end, Error):
        if not sub and end.errno_code in (errno.ENOENT, errno.ENOTDIR):
            raise NotFoundError(
                f"the workspace {os.fsdecode(root)} is not a folder in the guest",
                hint="the task's workspace was removed or replaced inside the sandbox",
            )
        raise _guest_error(where, end)
    for e in entries:
        st = e.stat
        if not _safe_name(e.name):
            bad.append(e.name)
            continue
        rel = sub + b"/" + e.name if sub else e.name
        nodes[rel] = _Node(st.kind, st.mode, st.size, st.mtime_ns // 10**9, st.link_target)
    return nodes, isinstance(end, ListEnd) and end.truncated


def _guest_error(path: bytes, err: Error) -> StateError:
    return StateError(
        f"cannot list {os.fsdecode(path)} in the guest: {err.message} "
        f"({errno.errorcode.get(err.errno_code, err.errno_code)})",
        hint="check the workspace inside the sandbox (permissions, a folder replaced by a file)",
    )


# ------------------------------------------------------------------ git's format


def _quote(name: bytes) -> bytes:
    """git's quote_c_style with core.quotePath on: quoted only when needed."""
    if not any(c < 0x20 or c >= 0x7F or c in b'"\\' for c in name):
        return name
    out = bytearray(b'"')
    for c in name:
        if c in _ESCAPES:
            out += b"\\" + _ESCAPES[c]
        elif c < 0x20 or c >= 0x7F:
            out += b"\\%03o" % c
        else:
            out.append(c)
    out += b'"'
    return bytes(out)


_ESCAPES = {7: b"a", 8: b"b", 9: b"t", 10: b"n", 11: b"v", 12: b"f", 13: b"r", 34: b'"', 92: b"\\"}


def _blob_id(data: bytes) -> bytes:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest().encode()


def _is_binary(data: bytes) -> bool:
    """git looks for a NUL in the first 8000 bytes; any NUL here (the whole file is in
    memory anyway), and anything not UTF-8 (the patch is text)."""
    if b"\0" in data:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _literal(data: bytes) -> bytes:
    """A ``literal`` hunk of a GIT binary patch: deflated, base85, a length char a line."""
    z = zlib.compress(data, 1)  # git's own level (zlib_compression_level: Z_BEST_SPEED)
    out = [b"literal %d\n" % len(data)]
    for i in range(0, len(z), 52):
        chunk = z[i : i + 52]
        n = len(chunk)
        out.append(bytes([0x40 + n if n <= 26 else 0x60 + n - 26]))
        out.append(base64.b85encode(chunk, pad=True) + b"\n")
    out.append(b"\n")
    return b"".join(out)


def _lines(data: bytes) -> list[bytes]:
    parts = data.split(b"\n")
    lines = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        lines.append(parts[-1])
    return lines


def _range(start: int, stop: int) -> bytes:
    length = stop - start
    if length == 1:
        return b"%d" % (start + 1)
    return b"%d,%d" % (start + 1 if length else start, length)


def _hunks(old: bytes, new: bytes) -> list[bytes]:
    a, b = _lines(old), _lines(new)
    out: list[bytes] = []

    def emit(prefix: bytes, line: bytes) -> None:
        out.append(prefix + line)
        if not line.endswith(b"\n"):
            out.append(b"\n\\ No newline at end of file\n")

    for group in SequenceMatcher(None, a, b, autojunk=len(a) + len(b) > 20000).get_grouped_opcodes(
        CONTEXT
    ):
        i1, i2, j1, j2 = group[0][1], group[-1][2], group[0][3], group[-1][4]
        out.append(b"@@ -" + _range(i1, i2) + b" +" + _range(j1, j2) + b" @@\n")
        for tag, x1, x2, y1, y2 in group:
            if tag == "equal":
                for line in a[x1:x2]:
                    emit(b" ", line)
                continue
            for line in a[x1:x2]:
                emit(b"-", line)
            for line in b[y1:y2]:
                emit(b"+", line)
    return out


@dataclass(frozen=True)
class _Blob:
    mode: int
    data: bytes


def _section(rel: bytes, old: _Blob | None, new: _Blob | None, binary: bool) -> bytes:
    """One ``diff --git`` section: a new, deleted or changed file (never a type change)."""
    a, b = _quote(b"a/" + rel), _quote(b"b/" + rel)
    out = [b"diff --git " + a + b" " + b + b"\n"]
    if old is None and new is not None:
        out.append(b"new file mode %o\n" % new.mode)
    elif new is None and old is not None:
        out.append(b"deleted file mode %o\n" % old.mode)
    elif old is not None and new is not None and old.mode != new.mode:
        out.append(b"old mode %o\nnew mode %o\n" % (old.mode, new.mode))
    old_data = old.data if old else b""
    new_data = new.data if new else b""
    if old is not None and new is not None and old_data == new_data:
        return b"".join(out)  # a mode change only
    index = b"index " + (_blob_id(old_data) if old else _NULL_ID)
    index += b".." + (_blob_id(new_data) if new else _NULL_ID)
    if old is not None and new is not None and old.mode == new.mode:
        index += b" %o" % old.mode
    out.append(index + b"\n")
    if binary:
        out.append(b"GIT binary patch\n" + _literal(new_data))
    elif old_data or new_data:
        la, lb = a if old else b"/dev/null", b if new else b"/dev/null"
        out.append(b"--- " + la + (b"\t" if b" " in la else b"") + b"\n")
        out.append(b"+++ " + lb + (b"\t" if b" " in lb else b"") + b"\n")
        out.extend(_hunks(old_data, new_data))
    return b"".join(out)


# ------------------------------------------------------------------ the comparison


class _Files:
    """Reads seed and guest files within the caps; counts the guest reads."""

    def __init__(
        self, ch: FileChannel, root: bytes, seed: bytes, max_files: int, cap: int, timeout: float
    ) -> None:
        self.ch, self.root, self.seed = ch, root, seed
        self.max_files, self.cap, self.timeout = max_files, cap, timeout
        self.reads = 0

    def seed_data(self, rel: bytes, node: _Node) -> bytes:
        if node.kind == FileKind.SYMLINK:
            return node.target
        fd = os.open(self.seed + b"/" + rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            return fh.read(self.cap + 1)

    def _read(self, rel: bytes, sink: Callable[[bytes], None], limit: int) -> str | bool:
        """Stream a guest file into ``sink``: why not (text), or whether bytes remain."""
        if self.reads >= self.max_files:
            return f"not compared: over max_files ({self.max_files})"
        self.reads += 1
        end = self.ch.read_file(
            ReadFile(self.root + b"/" + rel, max_bytes=limit), sink, self.timeout
        )
        if isinstance(end, Error):
            return f"cannot read it in the guest: {end.message}"
        return end.truncated

    def guest_data(self, rel: bytes, node: _Node) -> bytes | str:
        """The guest file's bytes (up to the cap), or why not."""
        if node.kind == FileKind.SYMLINK:
            return node.target
        if node.size > self.cap:
            return self.too_large
        keep = bytearray()
        got = self._read(rel, keep.extend, self.cap + 1)
        if isinstance(got, str):
            return got
        if got or len(keep) > self.cap:
            return self.too_large
        return bytes(keep)

    def same_as_seed(self, rel: bytes, size: int) -> bool | str:
        """Whether a guest file too large to keep has the seed's ``size`` bytes, streamed."""
        fd = os.open(self.seed + b"/" + rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            state = [True, 0]

            def sink(chunk: bytes) -> None:
                state[1] = int(state[1]) + len(chunk)
                if state[0]:
                    state[0] = fh.read(len(chunk)) == chunk

            got = self._read(rel, sink, size + 1)
        if isinstance(got, str):
            return got
        return bool(state[0]) and not got and state[1] == size

    @property
    def too_large(self) -> str:
        return f"larger than max_file_bytes ({self.cap})"


@dataclass
class _Change:
    status: EntryStatus
    blobs: list[tuple[_Blob | None, _Blob | None]]
    reason: str | None = None  # why the patch cannot carry it
    unknown: bool = False  # not compared: whether it changed at all is not known


def _compare(files: _Files, rel: bytes, old: _Node | None, new: _Node | None) -> _Change | None:
    if old is not None and new is not None and old.kind == new.kind:
        if old.kind not in (FileKind.FILE, FileKind.SYMLINK):
            return None
        om, nm = _m(old), _m(new)
        if old.kind == FileKind.SYMLINK:
            return _Change("modified", [(_Blob(om, old.target), _Blob(nm, new.target))])
        mode_only = _Change("mode_changed", [(_Blob(om, b""), _Blob(nm, b""))])
        if old.size > files.cap or new.size > files.cap:
            if old.size != new.size:
                return _Change("modified", [], files.too_large)
            same = files.same_as_seed(rel, old.size)
            if isinstance(same, str):
                return _Change("modified", [], same, unknown=True)
            if same:
                return mode_only if om != nm else None
            return _Change("modified", [], files.too_large)
        old_data = files.seed_data(rel, old)
        new_data = files.guest_data(rel, new)
        if isinstance(new_data, str):
            # too large: changed for sure; not read or unreadable: not known
            return _Change("modified", [], new_data, unknown=new_data != files.too_large)
        if old_data == new_data:
            return mode_only if om != nm else None
        return _Change("modified", [(_Blob(om, old_data), _Blob(nm, new_data))])

    status: EntryStatus = "added" if old is None else "deleted" if new is None else "type_changed"
    change = _Change(status, [])
    if old is not None and old.git_mode is not None:
        if old.kind == FileKind.FILE and old.size > files.cap:
            change.reason = files.too_large
        else:
            change.blobs.append((_Blob(_m(old), files.seed_data(rel, old)), None))
    if new is not None and new.git_mode is not None:
        got = files.guest_data(rel, new)
        if isinstance(got, str):
            change.reason = got
        else:
            change.blobs.append((None, _Blob(_m(new), got)))
    for node in (old, new):
        if node is not None and node.git_mode is None and node.kind != FileKind.DIR:
            change.reason = "not a regular file, symlink or folder: git cannot carry it"
    return change


def _m(node: _Node) -> int:
    mode = node.git_mode
    if mode is None:
        raise AssertionError(f"{node.kind!r} has no git mode")
    return mode


def diff_workspace(
    ch: FileChannel,
    guest_root: str,
    seed_dir: Path | None,
    *,
    exclude: Sequence[str] = (),
    path: str | None = None,
    max_patch_bytes: int = DEFAULT_MAX_PATCH_BYTES,
    max_binary_bytes: int = DEFAULT_MAX_BINARY_BYTES,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_files: int = DEFAULT_MAX_FILES,
    max_entries: int = DEFAULT_MAX_ENTRIES,
    timeout: float = DEFAULT_TIMEOUT,
    racy_since: float | None = None,
) -> DiffResult:
    """Compare the guest folder ``guest_root`` with the host folder ``seed_dir`` (None: an
    empty seed) and return the changes and a patch ``git apply`` takes in ``seed_dir``.

    ``exclude``: fnmatch patterns, as seeding applies them, on both sides. ``path``: only
    this file or folder, relative to the root (the patch's paths stay relative to the
    root). Caps: ``max_entries`` guest entries listed; ``max_files`` guest files read;
    ``max_file_bytes`` per file read; ``max_binary_bytes`` per binary file in the patch;
    ``max_patch_bytes`` in all. Caps only cut at file boundaries: what they leave out is in
    ``skipped``. ``timeout``: seconds to wait for the agent between two of its frames.
    ``racy_since``: when the seed was taken (epoch seconds); seed files this recent are
    always compared by content.

    Raises InvalidInputError (a bad ``path`` or pattern), NotFoundError (no workspace in
    the guest, or no seed folder), StateError (the guest cannot list it, the host cannot
    read the seed) and GuestProtocolError (the agent broke the protocol or went quiet).
    """
    if isinstance(exclude, str):
        exclude = [exclude]
    excluder = Excluder(exclude)
    sub = _check_subpath(path)
    caps = (max_patch_bytes, max_binary_bytes, max_file_bytes, max_files, max_entries)
    if min(caps) < 0 or max_entries < 1:
        raise InvalidInputError(
            "the diff's caps must not be negative, and max_entries at least 1",
            hint="leave them out to get the defaults",
        )
    try:
        racy = int(racy_since) - 1 if racy_since is not None else None
        return _diff(
            ch, guest_root, seed_dir, excluder, sub, *caps, timeout=timeout, racy_from=racy
        )
    except OSError as exc:
        raise StateError(
            f"cannot read the task's seed copy: {exc}",
            hint="pyro's state folder lost files or permissions; the task can still run",
        ) from None


def _diff(
    ch: FileChannel,
    guest_root: str,
    seed_dir: Path | None,
    excluder: Excluder,
    sub: bytes,
    max_patch_bytes: int,
    max_binary_bytes: int,
    max_file_bytes: int,
    max_files: int,
    max_entries: int,
    *,
    timeout: float,
    racy_from: int | None = None,
) -> DiffResult:
    root = os.fsencode(guest_root).rstrip(b"/")
    seed_nodes: dict[bytes, _Node] = {}
    guest_nodes: dict[bytes, _Node] = {}
    listing_cut = False
    bad_names: list[bytes] = []
    if not (sub and excluder.excludes(os.fsdecode(sub))):
        seed_nodes = _seed_tree(seed_dir, sub, excluder)
        guest_nodes, listing_cut = _guest_tree(
            ch, root or b"/", sub, max_entries, timeout, bad_names
        )
        if excluder:
            guest_nodes = {
                r: n for r, n in guest_nodes.items() if not excluder.excludes(os.fsdecode(r))
            }

    seed = os.fsencode(seed_dir) if seed_dir is not None else b""
    files = _Files(ch, root, seed, max_files, max_file_bytes, timeout)
    patch = bytearray()
    result = DiffResult(
        root=guest_root,
        path=_text(sub) if sub else None,
        patch="",
        patch_bytes=0,
        truncated=listing_cut,
        listing_truncated=listing_cut,
        files_compared=0,
        summary="",
    )
    for name in bad_names:
        result.skipped.append(SkippedFile(path=_text(name), reason="unsafe name from the guest"))
        result.truncated = True
    full = False
    for rel in sorted(set(seed_nodes) | set(guest_nodes)):
        old, new = seed_nodes.get(rel), guest_nodes.get(rel)
        if new is None and listing_cut:
            continue  # not listed is not deleted
        racy = (
            racy_from is not None
            and old is not None
            and old.kind == FileKind.FILE
            and old.mtime_s >= racy_from
        )
        if old is not None and new is not None and not racy and _unchanged(old, new):
            continue
        change = _compare(files, rel, old, new)
        if change is None:
            continue
        text = _text(rel)
        reason = change.reason
        if change.unknown and reason is not None:
            result.skipped.append(SkippedFile(path=text, reason=reason))
            result.truncated = True
            continue
        binary = any(_is_binary(b.data) for pair in change.blobs for b in pair if b is not None)
        if reason is None and binary:
            biggest = max((len(n.data) for _, n in change.blobs if n is not None), default=0)
            if biggest > max_binary_bytes:
                reason = f"binary, {biggest} bytes: over max_binary_bytes ({max_binary_bytes})"
        if reason is None and change.blobs:
            if not full:  # once cut, later files are left out too: the patch stays a prefix
                sections = b"".join(_section(rel, o, n, binary) for o, n in change.blobs)
                full = len(patch) + len(sections) > max_patch_bytes
                if not full:
                    patch += sections
            if full:
                reason = f"the patch reached max_patch_bytes ({max_patch_bytes})"
        _record(
            result, text, change.status, old, new, binary, reason is None and bool(change.blobs)
        )
        if reason is not None:
            result.skipped.append(SkippedFile(path=text, reason=reason))
            result.truncated = True

    result.patch = patch.decode("utf-8")
    result.patch_bytes = len(patch)
    result.files_compared = files.reads
    result.summary = _summary(result)
    return result


def _unchanged(old: _Node, new: _Node) -> bool:
    """The cheap test: no read when kind, permissions, size and mtime (whole s) agree."""
    if old.kind != new.kind:
        return False
    if old.kind == FileKind.SYMLINK:
        return old.target == new.target
    if old.kind != FileKind.FILE:
        return True  # folders, fifos...: nothing git records beyond their children
    return (old.perm, old.size, old.mtime_s) == (new.perm, new.size, new.mtime_s)


def _kind(node: _Node) -> EntryKind:
    if node.kind == FileKind.FILE:
        return "file"
    if node.kind == FileKind.SYMLINK:
        return "symlink"
    if node.kind == FileKind.DIR:
        return "dir"
    return "other"


def _record(
    result: DiffResult,
    text: str,
    status: EntryStatus,
    old: _Node | None,
    new: _Node | None,
    binary: bool,
    in_patch: bool,
) -> None:
    now = new if new is not None else old
    if now is None:
        raise AssertionError("a change with neither side")
    kind = _kind(now)
    old_mode, new_mode = (old.git_mode if old else None), (new.git_mode if new else None)
    result.entries.append(
        DiffEntry(
            path=text,
            status=status,
            kind=kind,
            old_mode=f"{old_mode:o}" if old_mode is not None else None,
            new_mode=f"{new_mode:o}" if new_mode is not None else None,
            binary=binary,
            in_patch=in_patch,
        )
    )
    if kind == "dir" and status in ("added", "deleted"):
        return  # folders: in entries and the summary's count only
    if status == "modified" and old_mode != new_mode:
        result.mode_changed.append(text)
    getattr(result, status).append(text)


def _summary(result: DiffResult) -> str:
    parts = [
        f"{len(result.added)} added",
        f"{len(result.modified)} modified",
        f"{len(result.deleted)} deleted",
    ]
    if result.mode_changed:
        parts.append(f"{len(result.mode_changed)} mode changed")
    if result.type_changed:
        parts.append(f"{len(result.type_changed)} type changed")
    for what in ("added", "deleted"):
        n = sum(1 for e in result.entries if e.kind == "dir" and e.status == what)
        if n:
            parts.append(f"{n} folder{'s' if n > 1 else ''} {what}")
    text = ", ".join(parts)
    if result.skipped:
        text += f"; {len(result.skipped)} left out of the patch"
    if result.listing_truncated:
        text += "; the guest listing stopped at max_entries (deletions not reported)"
    return text
