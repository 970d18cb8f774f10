"""Safe extraction of untrusted trees into a fresh, private directory.

(One module on purpose, over the usual size: every rule an untrusted archive or
folder is held to is here, read and reviewed as a unit; splitting it would
scatter the checks that must agree with each other.)

Everything that puts user content into a task's workspace goes through
:class:`Extractor`, whichever the source (a tar stream or a host directory)
and whichever the backend (the guest's workspace disk is built from the
extracted tree; host-compat uses the tree itself). The rules are written out
here rather than borrowed from :mod:`tarfile`'s extraction filters, so they
do not depend on the Python patch level:

==========================  ===============================================
rule                        rejected
==========================  ===============================================
``absolute_path``           a member name starting with ``/``
``parent_escape``           a name with a ``..`` component
``invalid_name``            a name with NUL, or one the filesystem refuses
``symlink_escape``          a symlink whose target is absolute or resolves
                            outside the destination (also through other links)
``hardlink_escape``         a hardlink whose target is absolute, has ``..``,
                            or goes through a symlink
``hardlink_target``         a hardlink to something that is not a regular
                            file extracted earlier
``write_through_symlink``   a member below a path that is a symlink
``type_conflict``           a directory over a file or link, or the reverse
``special_file``            character/block devices, FIFOs, sockets
``unsupported_type``        any other member type
``too_many_entries``        more entries than ``SeedLimits.max_entries``
``total_size``              more file bytes than ``SeedLimits.max_total_bytes``
``file_size``               one file over ``SeedLimits.max_file_bytes``
``header_size``             a pax / GNU long-name header over 1 MiB
``corrupt_archive``         a stream tarfile or the decompressor cannot read
==========================  ===============================================

setuid/setgid bits are dropped; the owner always keeps read access to files
and full access to directories (so the tree can be copied onto the workspace
disk). Owners are not taken from the source: everything belongs to the user
running pyro. Modes, mtimes, empty directories, in-tree symlinks and
hardlinks are kept. A later member with the name of an earlier file or link
replaces it, as ``tar`` does.

Tar streams are read with :mod:`tarfile` in streaming mode over our own
decompressor (:class:`DecompressingReader`), which never inflates more than
it is asked for, so a compression bomb costs time, never memory.
"""

from __future__ import annotations

import bz2
import contextlib
import errno
import fnmatch
import hashlib
import lzma
import os
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Protocol

from pyro_mcp import limits
from pyro_mcp.errors import InvalidInputError

CHUNK = 1 << 20
MAX_HEADER_BYTES = 1 << 20
MAX_TRAILING_BYTES = 16 << 20  # decompressed bytes allowed after a tar's end-of-archive
_MAX_LINK_DEPTH = 40
_GZIP_MAGIC = b"\x1f\x8b"
_BZ2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_OTHER_MAGIC = {
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
    b"PK\x03\x04": "zip",
    b"7z\xbc\xaf": "7z",
}


class UnsafeSeedError(InvalidInputError):
    """A seed source broke one of the extraction rules; nothing of it is kept.

    ``details`` holds ``rule`` and ``member`` (and ``offending`` for directory
    sources, which are checked as a whole first so every problem is listed).
    """

    code = "unsafe_seed"


@dataclass(frozen=True)
class SeedLimits:
    """Caps that stop tar bombs early (checked against each header before data)."""

    max_total_bytes: int = limits.SEED_MAX_TOTAL_BYTES
    max_entries: int = limits.SEED_MAX_ENTRIES
    max_file_bytes: int = limits.SEED_MAX_FILE_BYTES

    def __post_init__(self) -> None:
        for name in ("max_total_bytes", "max_entries", "max_file_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"SeedLimits.{name} must be a non-negative integer")


def reject(rule: str, member: str, why: str, hint: str | None = None) -> UnsafeSeedError:
    return UnsafeSeedError(
        f"seed rejected: {member!r} {why} (rule: {rule})",
        hint=hint or "fix or remove that entry in the source, then create the task again",
        details={"rule": rule, "member": member},
    )


def normalize_name(name: str) -> str | None:
    """The member's path relative to the destination, or None for the root itself."""
    if "\x00" in name:
        raise reject("invalid_name", name, "contains a NUL byte")
    if name.startswith("/"):
        raise reject("absolute_path", name, "is an absolute path")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise reject("parent_escape", name, "has a '..' component")
    return "/".join(parts) or None


class Excluder:
    """``fnmatch`` patterns matched against each path and each of its components'
    names: ``.git``, ``node_modules``, ``*.pyc``, ``build/cache``. A matching
    directory drops everything below it."""

    def __init__(self, patterns: Iterable[str] = ()) -> None:
        self.patterns = tuple(p.strip("/") for p in patterns if p.strip("/"))
        for p in self.patterns:
            if "\x00" in p:
                raise InvalidInputError("exclude patterns must not contain NUL bytes")

    def __bool__(self) -> bool:
        return bool(self.patterns)

    def matches(self, rel: str) -> bool:
        """Whether ``rel`` itself matches (its ancestors are checked by the caller)."""
        base = rel.rpartition("/")[2]
        return any(
            fnmatch.fnmatchcase(rel, p) or fnmatch.fnmatchcase(base, p) for p in self.patterns
        )

    def excludes(self, rel: str) -> bool:
        """Whether ``rel`` or any of its ancestors matches."""
        if not self.patterns:
            return False
        parts = rel.split("/")
        return any(self.matches("/".join(parts[:i])) for i in range(1, len(parts) + 1))


_DIR, _FILE, _LINK = "d", "f", "l"


@dataclass
class Extractor:
    """Writes entries into ``dest`` (an existing, empty directory only we write to).

    Every entry in ``dest`` is one we made, so the map of kinds below is the
    whole truth about it: no path is followed that we did not check.
    """

    dest: Path
    seed_limits: SeedLimits = field(default_factory=SeedLimits)
    entry_count: int = 0
    bytes_written: int = 0
    _declared_bytes: int = 0
    _kinds: dict[str, str] = field(default_factory=dict)
    _links: dict[str, str] = field(default_factory=dict)
    _dir_attrs: dict[str, tuple[int, float | None]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._root = os.fspath(self.dest)

    # -- bookkeeping --------------------------------------------------------
    def _path(self, rel: str) -> str:
        return os.path.join(self._root, rel)

    def _count(self, member: str) -> None:
        self.entry_count += 1
        if self.entry_count > self.seed_limits.max_entries:
            raise reject(
                "too_many_entries",
                member,
                f"is entry {self.entry_count}, over the cap of {self.seed_limits.max_entries}",
                hint="seed fewer files (exclude build output or dependencies)",
            )

    def _prepare(self, rel: str, member: str, kind: str) -> None:
        """Make the parents of ``rel`` (refusing links and files among them) and
        clear the way for a new entry of ``kind``."""
        parts = rel.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            have = self._kinds.get(parent)
            if have == _LINK:
                raise reject(
                    "write_through_symlink", member, f"would be written through symlink {parent!r}"
                )
            if have == _FILE:
                raise reject("type_conflict", member, f"needs {parent!r} to be a directory")
            if have is None:
                self._count(parent)
                self._os(os.mkdir, parent, self._path(parent), 0o755)
                self._kinds[parent] = _DIR
        have = self._kinds.get(rel)
        if have is None:
            return
        if _DIR in (have, kind):
            if have == kind:
                return
            raise reject("type_conflict", member, "replaces a directory with a non-directory")
        os.unlink(self._path(rel))
        self._links.pop(rel, None)
        del self._kinds[rel]

    @staticmethod
    def _os(fn: Callable[..., Any], member: str, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            if exc.errno in (errno.ENAMETOOLONG, errno.EINVAL, errno.EILSEQ):
                raise reject(
                    "invalid_name", member, f"is not a usable name ({exc.strerror})"
                ) from None
            raise

    # -- entries ------------------------------------------------------------
    def add_dir(self, name: str, mode: int, mtime: float | None) -> None:
        rel = normalize_name(name)
        self._count(name)
        if rel is None:
            return
        self._prepare(rel, name, _DIR)
        if rel not in self._kinds:
            self._os(os.mkdir, name, self._path(rel), 0o700)
            self._kinds[rel] = _DIR
        self._dir_attrs[rel] = ((mode & 0o1777) | 0o700, mtime)

    def add_file(
        self, name: str, mode: int, mtime: float | None, size: int, read: Callable[[int], bytes]
    ) -> None:
        """Copy exactly ``size`` bytes from ``read``; the caps are checked before any."""
        rel = normalize_name(name)
        self._count(name)
        if rel is None:
            raise reject("type_conflict", name, "names the destination itself as a file")
        caps = self.seed_limits
        if size > caps.max_file_bytes:
            raise reject(
                "file_size",
                name,
                f"is {size} bytes, over the per-file cap of {caps.max_file_bytes}",
            )
        if self._declared_bytes + size > caps.max_total_bytes:
            raise reject(
                "total_size",
                name,
                f"brings the seed over its cap of {caps.max_total_bytes} bytes",
                hint="seed less data (exclude large or generated files)",
            )
        self._declared_bytes += size
        self._prepare(rel, name, _FILE)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = self._os(os.open, name, self._path(rel), flags, 0o600)
        self._kinds[rel] = _FILE
        with os.fdopen(fd, "wb") as out:
            remaining = size
            while remaining:
                data = read(min(CHUNK, remaining))
                if not data:
                    raise reject("corrupt_archive", name, "ends before its declared size")
                if len(data) > remaining:
                    data = data[:remaining]
                out.write(data)
                remaining -= len(data)
                self.bytes_written += len(data)
            out.flush()
            os.fchmod(out.fileno(), (mode & 0o777) | 0o400)
            if mtime is not None:
                with contextlib.suppress(OverflowError, ValueError, OSError):
                    os.utime(out.fileno(), ns=(_ns(mtime), _ns(mtime)))

    def add_symlink(self, name: str, target: str, mtime: float | None) -> None:
        rel = normalize_name(name)
        self._count(name)
        if rel is None:
            raise reject("type_conflict", name, "names the destination itself as a symlink")
        if "\x00" in target or not target:
            raise reject("invalid_name", name, "has an empty or NUL-containing link target")
        if target.startswith("/"):
            raise reject(
                "symlink_escape", name, f"points to absolute path {target!r}, outside the workspace"
            )
        start = rel.split("/")[:-1]
        if self._resolve(start, target, 0) is None:
            raise reject(
                "symlink_escape",
                name,
                f"points to {target!r}, which resolves outside the workspace",
            )
        self._prepare(rel, name, _LINK)
        self._os(os.symlink, name, target, self._path(rel))
        self._kinds[rel] = _LINK
        self._links[rel] = target
        if mtime is not None:
            with contextlib.suppress(OverflowError, ValueError, OSError):
                os.utime(self._path(rel), ns=(_ns(mtime), _ns(mtime)), follow_symlinks=False)

    def add_hardlink(self, name: str, target: str) -> None:
        rel = normalize_name(name)
        self._count(name)
        if rel is None:
            raise reject("type_conflict", name, "names the destination itself as a link")
        if target.startswith("/"):
            raise reject("hardlink_escape", name, f"links to absolute path {target!r}")
        if ".." in target.split("/"):
            raise reject("hardlink_escape", name, f"links to {target!r}, which has '..'")
        dest_rel = normalize_name(target)
        if dest_rel is None:
            raise reject("hardlink_target", name, "links to the destination directory")
        parts = dest_rel.split("/")
        for i in range(1, len(parts)):
            if self._kinds.get("/".join(parts[:i])) == _LINK:
                raise reject(
                    "hardlink_escape", name, f"links to {target!r}, which goes through a symlink"
                )
        if self._kinds.get(dest_rel) != _FILE:
            raise reject(
                "hardlink_target",
                name,
                f"links to {target!r}, which is not a regular file earlier in the source",
            )
        if dest_rel == rel:
            return
        self._prepare(rel, name, _FILE)
        src, dst = self._path(dest_rel), self._path(rel)
        self._os(lambda: os.link(src, dst, follow_symlinks=False), name)
        self._kinds[rel] = _FILE

    def reject_special(self, name: str, what: str) -> None:
        raise reject(
            "special_file",
            name,
            f"is a {what}; only files, directories and links can be seeded",
            hint="remove it from the source or exclude it",
        )

    # -- resolution ---------------------------------------------------------
    def _resolve(self, stack: list[str], target: str, depth: int) -> list[str] | None:
        """Resolve ``target`` from directory ``stack`` through the links made so far;
        None when it leaves the destination (or loops too deep)."""
        if depth > _MAX_LINK_DEPTH:
            return None
        stack = list(stack)
        for comp in target.split("/"):
            if comp in ("", "."):
                continue
            if comp == "..":
                if not stack:
                    return None
                stack.pop()
                continue
            stack.append(comp)
            link = self._links.get("/".join(stack))
            if link is not None:
                if link.startswith("/"):
                    return None
                stack.pop()
                resolved = self._resolve(stack, link, depth + 1)
                if resolved is None:
                    return None
                stack = resolved
        return stack

    # -- finish -------------------------------------------------------------
    def finish(self) -> None:
        """Re-check every link against the final tree, then set directory modes and
        mtimes (deepest first, after their contents are written)."""
        root = os.path.realpath(self._root)
        for rel, target in self._links.items():
            real = os.path.realpath(self._path(rel))
            if real != root and not real.startswith(root + os.sep):
                raise reject(
                    "symlink_escape",
                    rel,
                    f"points to {target!r}, which resolves outside the workspace in the final tree",
                )
        for rel in sorted(self._dir_attrs, key=lambda r: r.count("/"), reverse=True):
            mode, mtime = self._dir_attrs[rel]
            path = self._path(rel)
            os.chmod(path, mode, follow_symlinks=False)
            if mtime is not None:
                with contextlib.suppress(OverflowError, ValueError, OSError):
                    os.utime(path, ns=(_ns(mtime), _ns(mtime)), follow_symlinks=False)


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000) if isinstance(seconds, float) else int(seconds) * 10**9


# --------------------------------------------------------------------------- tar streams


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class HashingReader:
    """Reads a binary file, hashing every byte handed out (in order)."""

    def __init__(self, raw: _Readable) -> None:
        self.raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size if size >= 0 else CHUNK)
        self.sha256.update(data)
        self.bytes_read += len(data)
        return data

    def drain(self) -> None:
        """Read (and hash) the rest, so the digest is that of the whole file."""
        while self.read(CHUNK):
            pass


class DecompressingReader:
    """gzip / bzip2 / xz / plain, chosen by magic bytes; ``read(n)`` never inflates
    more than ``n`` bytes (the decompressors' ``max_length``), so memory stays
    bounded whatever the compression ratio. Concatenated streams are followed."""

    def __init__(self, raw: _Readable) -> None:
        self.raw = raw
        head = raw.read(6)
        self._pending = head
        self.kind = "tar"
        if head.startswith(_GZIP_MAGIC):
            self.kind = "gzip"
        elif head.startswith(_BZ2_MAGIC):
            self.kind = "bzip2"
        elif head.startswith(_XZ_MAGIC):
            self.kind = "xz"
        else:
            for magic, name in _OTHER_MAGIC.items():
                if head.startswith(magic):
                    raise UnsafeSeedError(
                        f"the archive is {name}-compressed, which pyro cannot read",
                        hint="use .tar, .tar.gz, .tar.bz2 or .tar.xz",
                        details={"rule": "corrupt_archive", "member": ""},
                    )
        self._dec: Any = self._new() if self.kind != "tar" else None
        self._eof = False

    def _new(self) -> Any:
        if self.kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS)
        if self.kind == "bzip2":
            return bz2.BZ2Decompressor()
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ)

    def _input(self) -> bytes:
        if self._pending:
            data, self._pending = self._pending, b""
            return data
        return self.raw.read(64 * 1024)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = CHUNK
        if size == 0 or self._eof:
            return b""
        if self._dec is None:
            data = self._input()
            if len(data) > size:
                self._pending, data = data[size:], data[:size]
            if not data:
                self._eof = True
            return data
        try:
            while True:
                dec = self._dec
                if dec.eof:
                    # End of one compressed stream: another may follow (pbzip2,
                    # concatenated gzip members), possibly after zero padding.
                    rest = dec.unused_data.lstrip(b"\x00")
                    while not rest:
                        more = self._input()
                        if not more:
                            self._eof = True
                            return b""
                        rest = more.lstrip(b"\x00")
                    self._dec = self._new()
                    self._pending = rest
                    continue
                if self.kind == "gzip":
                    data = dec.unconsumed_tail or self._input()
                    if not data:
                        raise tarfile.ReadError("the compressed stream ends too early")
                elif dec.needs_input:
                    data = self._input()
                    if not data:
                        raise tarfile.ReadError("the compressed stream ends too early")
                else:
                    data = b""
                out: bytes = dec.decompress(data, size)
                if out:
                    return out
        except (zlib.error, OSError, lzma.LZMAError, EOFError) as exc:
            raise tarfile.ReadError(f"{self.kind} data is corrupt: {exc}") from None


class _BoundedTarInfo(tarfile.TarInfo):
    """Refuses oversized pax / GNU long-name headers before tarfile reads them
    into memory (it reads such a header's whole content at once)."""

    META_TYPES: ClassVar[tuple[bytes, ...]] = (
        tarfile.GNUTYPE_LONGNAME,
        tarfile.GNUTYPE_LONGLINK,
        tarfile.XHDTYPE,
        tarfile.XGLTYPE,
        tarfile.SOLARIS_XHDTYPE,
    )

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in self.META_TYPES and self.size > MAX_HEADER_BYTES:
            raise reject(
                "header_size", self.name, f"is a {self.size}-byte metadata header (cap 1 MiB)"
            )
        return super()._proc_member(tf)  # type: ignore[misc,no-any-return]


_SPECIAL_TYPES = {
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "FIFO",
}


def extract_tar_stream(
    raw: IO[bytes] | _Readable,
    extractor: Extractor,
    excluder: Excluder | None = None,
) -> str:
    """Extract the (possibly compressed) tar read from ``raw``; return the sha256 of
    every byte of ``raw`` (drained to its end, so it equals ``sha256sum FILE``)."""
    hashing = HashingReader(raw)
    excluder = excluder or Excluder()
    try:
        stream = DecompressingReader(hashing)
        with tarfile.open(  # type: ignore[call-overload]
            fileobj=stream,
            mode="r|",
            tarinfo=_BoundedTarInfo,
            bufsize=64 * 1024,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tf:
            while True:
                member = tf.next()
                tf.members.clear()  # streaming: do not keep every header in memory
                if member is None:
                    break
                _extract_member(tf, member, extractor, excluder)
        _check_stream_end(stream)
    except (tarfile.TarError, EOFError, RecursionError) as exc:
        raise UnsafeSeedError(
            f"the archive is not a readable tar stream: {exc}",
            hint="check the file with `tar -tvf FILE`",
            details={"rule": "corrupt_archive", "member": ""},
        ) from None
    extractor.finish()
    hashing.drain()
    return hashing.sha256.hexdigest()


def _check_stream_end(stream: DecompressingReader) -> None:
    """Decompress what follows the end-of-archive blocks, so the compressed stream's own
    checks run (gzip's CRC and size, bzip2's block CRC, xz's check): tarfile stops
    reading before them, and would take a damaged or truncated tail as good. A tar
    has only padding there; more than :data:`MAX_TRAILING_BYTES` is refused."""
    if stream.kind == "tar":
        return
    seen = 0
    while data := stream.read(CHUNK):
        seen += len(data)
        if seen > MAX_TRAILING_BYTES:
            raise tarfile.ReadError(
                f"more than {MAX_TRAILING_BYTES} bytes follow the end of the archive"
            )


def _extract_member(
    tf: tarfile.TarFile, member: tarfile.TarInfo, extractor: Extractor, excluder: Excluder
) -> None:
    name = member.name
    rel = normalize_name(name)
    if rel is not None and excluder.excludes(rel):
        return
    mtime = float(member.mtime) if isinstance(member.mtime, int | float) else None
    if member.type in _SPECIAL_TYPES:
        extractor.reject_special(name, _SPECIAL_TYPES[member.type])
    elif member.isdir():
        extractor.add_dir(name, member.mode, mtime)
    elif member.issym():
        extractor.add_symlink(name, member.linkname, mtime)
    elif member.islnk():
        parts = [p for p in member.linkname.split("/") if p not in ("", ".")]
        safe = parts and ".." not in parts and not member.linkname.startswith("/")
        if excluder and safe and excluder.excludes("/".join(parts)):
            raise reject("hardlink_target", name, f"links to excluded {member.linkname!r}")
        extractor.add_hardlink(name, member.linkname)
    elif member.isreg():
        fh = tf.extractfile(member)
        assert fh is not None
        extractor.add_file(name, member.mode, mtime, member.size, fh.read)
    else:
        raise reject(
            "unsupported_type", name, f"has tar member type {member.type!r}, which pyro cannot seed"
        )


# --------------------------------------------------------------------------- directories


@dataclass(frozen=True)
class TreeEntry:
    rel: str
    st: os.stat_result
    link_target: str | None = None  # symlinks
    hardlink_to: str | None = None  # regular files seen before under another name


def walk_tree(root: Path, excluder: Excluder) -> Iterator[TreeEntry]:
    """Depth-first, each directory's entries sorted by their bytes; the directory
    itself comes before its contents. The root is not yielded."""
    seen: dict[tuple[int, int], str] = {}
    stack: list[tuple[str, str, Iterator[str]]] = []

    def push(directory: str, prefix: str) -> None:
        try:
            with os.scandir(directory) as it:
                names = sorted((e.name for e in it), key=os.fsencode)
        except OSError as exc:
            raise _unreadable(directory, exc) from None
        stack.append((directory, prefix, iter(names)))

    push(os.fspath(root), "")
    while stack:
        directory, prefix, names = stack[-1]
        entry_name = next(names, None)
        if entry_name is None:
            stack.pop()
            continue
        rel = f"{prefix}{entry_name}"
        if excluder and excluder.matches(rel):
            continue
        path = os.path.join(directory, entry_name)
        try:
            st = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
        except OSError as exc:
            raise _unreadable(path, exc) from None
        if target is not None:
            yield TreeEntry(rel, st, link_target=target)
        elif stat.S_ISDIR(st.st_mode):
            yield TreeEntry(rel, st)
            push(path, rel + "/")
        elif stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            first = seen.setdefault((st.st_dev, st.st_ino), rel)
            yield TreeEntry(rel, st, hardlink_to=None if first == rel else first)
        else:
            yield TreeEntry(rel, st)


def _unreadable(path: str, exc: OSError) -> InvalidInputError:
    return InvalidInputError(
        f"cannot read {path} in the seed source: {exc.strerror}",
        hint="make it readable, exclude it (--exclude), or stop what changes the folder",
    )


def special_kind(mode: int) -> str | None:
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISFIFO(mode):
        return "FIFO"
    if stat.S_ISSOCK(mode):
        return "socket"
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode) or stat.S_ISLNK(mode)):
        return "file of unknown type"
    return None


MAX_LISTED = 1000


def check_tree(root: Path, excluder: Excluder, seed_limits: SeedLimits) -> tuple[int, int]:
    """Walk the whole tree first (no writes): list *every* offending path in one
    error, and apply the caps. Returns (entries, file bytes)."""
    real_root = os.path.realpath(root)
    offending: list[dict[str, str]] = []
    total = 0
    entries = 0
    count = 0
    for entry in walk_tree(root, excluder):
        entries += 1
        if entries > seed_limits.max_entries:
            raise reject(
                "too_many_entries",
                entry.rel,
                f"is entry {entries}, over the cap of {seed_limits.max_entries}",
                hint="seed fewer files: exclude build output or dependencies (--exclude)",
            )
        problem = None
        rule = ""
        if entry.link_target is not None:
            target = entry.link_target
            real = os.path.realpath(os.path.join(root, entry.rel))
            if target.startswith("/"):
                rule, problem = "symlink_escape", f"symlink to absolute path {target}"
            elif real != real_root and not real.startswith(real_root + os.sep):
                rule, problem = "symlink_escape", f"symlink to {target}, outside the directory"
        else:
            kind = special_kind(entry.st.st_mode)
            if kind is not None:
                rule, problem = "special_file", kind
            elif stat.S_ISREG(entry.st.st_mode) and entry.hardlink_to is None:
                size = entry.st.st_size
                if size > seed_limits.max_file_bytes:
                    raise reject(
                        "file_size",
                        entry.rel,
                        f"is {size} bytes, over the per-file cap of {seed_limits.max_file_bytes}",
                    )
                total += size
                if total > seed_limits.max_total_bytes:
                    raise reject(
                        "total_size",
                        entry.rel,
                        f"brings the seed over its cap of {seed_limits.max_total_bytes} bytes",
                        hint="seed less data: exclude large or generated files (--exclude)",
                    )
        if problem is not None:
            count += 1
            if len(offending) < MAX_LISTED:
                offending.append({"path": entry.rel, "rule": rule, "problem": problem})
    if offending:
        shown = "; ".join(f"{o['path']} ({o['problem']})" for o in offending[:20])
        more = f"; and {count - 20} more" if count > 20 else ""
        raise UnsafeSeedError(
            f"seed rejected: {count} path(s) in {root} cannot be seeded: {shown}{more}",
            hint="remove them, or leave them out with --exclude PATTERN (SDK: exclude=[...])",
            details={
                "rule": offending[0]["rule"],
                "member": offending[0]["path"],
                "offending": offending,
                "offending_count": count,
            },
        )
    return entries, total


def canonical_tarinfo(entry: TreeEntry) -> tarfile.TarInfo:
    """The tar header pyro's canonical tar of a directory has for ``entry``."""
    st = entry.st
    ti = tarfile.TarInfo(entry.rel)
    ti.mode = stat.S_IMODE(st.st_mode) & 0o1777
    ti.mtime = int(st.st_mtime)
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    if entry.link_target is not None:
        ti.type = tarfile.SYMTYPE
        ti.linkname = entry.link_target
    elif entry.hardlink_to is not None:
        ti.type = tarfile.LNKTYPE
        ti.linkname = entry.hardlink_to
    elif stat.S_ISDIR(st.st_mode):
        ti.type = tarfile.DIRTYPE
    else:
        ti.type = tarfile.REGTYPE
        ti.size = st.st_size
    return ti


def _tar_header(ti: tarfile.TarInfo) -> bytes:
    return ti.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def copy_tree(
    root: Path,
    extractor: Extractor,
    excluder: Excluder | None = None,
) -> str:
    """Copy directory ``root`` through ``extractor``; return the sha256 of the
    canonical tar of it (what :func:`write_canonical_tar` writes), computed on
    the fly without writing the tar."""
    excluder = excluder or Excluder()
    sha = hashlib.sha256()
    offset = 0
    for entry in walk_tree(root, excluder):
        kind = special_kind(entry.st.st_mode)
        if entry.link_target is None and kind is not None:
            extractor.reject_special(entry.rel, kind)
        ti = canonical_tarinfo(entry)
        header = _tar_header(ti)
        sha.update(header)
        offset += len(header)
        mtime = float(ti.mtime)
        if ti.type == tarfile.SYMTYPE:
            extractor.add_symlink(entry.rel, ti.linkname, mtime)
        elif ti.type == tarfile.LNKTYPE:
            extractor.add_hardlink(entry.rel, ti.linkname)
        elif ti.type == tarfile.DIRTYPE:
            extractor.add_dir(entry.rel, ti.mode, mtime)
        else:
            src = os.path.join(root, entry.rel)
            try:
                fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as exc:
                raise InvalidInputError(
                    f"cannot read {src}: {exc.strerror}",
                    hint="make the file readable, or exclude it",
                ) from None
            with os.fdopen(fd, "rb") as fh:

                def read(n: int, fh: IO[bytes] = fh) -> bytes:
                    data = fh.read(n)
                    sha.update(data)
                    return data

                try:
                    extractor.add_file(entry.rel, ti.mode, mtime, ti.size, read)
                except UnsafeSeedError as exc:
                    if exc.details.get("rule") == "corrupt_archive":
                        raise InvalidInputError(
                            f"{src} shrank while it was being seeded",
                            hint="stop whatever writes to the directory, then try again",
                        ) from None
                    raise
            offset += ti.size
            pad = -ti.size % tarfile.BLOCKSIZE
            sha.update(b"\x00" * pad)
            offset += pad
    extractor.finish()
    sha.update(_end_of_archive(offset))
    return sha.hexdigest()


def _end_of_archive(offset: int) -> bytes:
    """What tarfile writes on close: two zero blocks, padded to a whole record."""
    offset += 2 * tarfile.BLOCKSIZE
    return b"\x00" * (2 * tarfile.BLOCKSIZE + (-offset % tarfile.RECORDSIZE))


def write_canonical_tar(
    root: str | os.PathLike[str], out: IO[bytes], exclude: Sequence[str] = ()
) -> None:
    """Write the canonical tar of directory ``root``: PAX format, entries in
    :func:`walk_tree` order, owner 0:0 without names, modes without
    setuid/setgid, whole-second mtimes. Its sha256 is the ``workspace_seed.sha256``
    of a task seeded from that directory."""
    excluder = Excluder(exclude)
    base = Path(root)
    with tarfile.open(
        fileobj=out, mode="w|", format=tarfile.PAX_FORMAT, errors="surrogateescape"
    ) as tf:
        for entry in walk_tree(base, excluder):
            ti = canonical_tarinfo(entry)
            if ti.type == tarfile.REGTYPE:
                with open(os.path.join(base, entry.rel), "rb") as fh:
                    tf.addfile(ti, fh)
            else:
                tf.addfile(ti)
