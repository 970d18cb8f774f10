"""Build the guest agent binary and the initramfs that boots it (both cached).

The agent is compiled from the ``agent.c`` shipped in this package with the
host's C compiler, statically linked against glibc. The initramfs is written
here, in Python (no ``cpio`` tool needed), byte-for-byte deterministic: the same
agent and modules always give the same file. Both land in :func:`cache_dir`
under a name derived from their inputs' hashes, are written to a temporary
file and renamed into place, and are built under a file lock so concurrent
builders wait for each other instead of racing.
"""

from __future__ import annotations

import gzip
import hashlib
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import filelock

from pyro_mcp.errors import EnvironmentBuildError, InvalidInputError
from pyro_mcp.fsio import sha256_file
from pyro_mcp.paths import cache_dir
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress

__all__ = [
    "AGENT_SOURCE",
    "CFLAGS",
    "INITRAMFS_COMPRESSED",
    "agent_version",
    "build_cpio",
    "ensure_agent_binary",
    "ensure_initramfs",
]

AGENT_SOURCE: Path = Path(str(resources.files("pyro_mcp.guest").joinpath("agent.c")))
CFLAGS: tuple[str, ...] = ("-static", "-Os", "-s", "-Wall", "-Wextra", "-Werror")
# Measured (TCG, Debian cloud kernel 6.1, agent + 8 virtio modules; see docs/protocol.md):
# gzip 420 KB vs raw 1.1 MB, with no boot-time difference within noise (QEMU start to
# HELLO ~1.9-2.5 s either way), so the smaller file wins.
INITRAMFS_COMPRESSED = True

_INSTALL_HINT = "apt-get install gcc libc6-dev"
_LOCK_TIMEOUT_S = 600.0
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.+-]+\.ko$")
_INITRAMFS_LAYOUT = b"pyro-initramfs-1"  # bump when the layout below changes

# cpio "newc" modes
_S_IFDIR = 0o040000
_S_IFREG = 0o100000
_S_IFCHR = 0o020000


def agent_version() -> str:
    """``"1.<first 12 hex digits of sha256(agent.c)>"``: names the agent build."""
    return f"1.{sha256_file(AGENT_SOURCE)[:12]}"


@contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with filelock.FileLock(str(lock_path), timeout=_LOCK_TIMEOUT_S):
            yield
    except filelock.Timeout:
        raise EnvironmentBuildError(
            f"timed out after {_LOCK_TIMEOUT_S:.0f} s waiting for {lock_path}",
            hint="another pyro process is building the same artifact; if none is, "
            "delete the lock file",
        ) from None


def _write_atomic(dest: Path, data: bytes, mode: int = 0o644) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _find_compiler() -> str:
    for candidate in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if candidate:
            found = shutil.which(candidate)
            if found:
                return found
    raise EnvironmentBuildError("no C compiler found to build the guest agent", hint=_INSTALL_HINT)


def ensure_agent_binary(progress: ProgressFn = no_progress) -> Path:
    """Path of the compiled agent for the shipped ``agent.c``; compiles it on first use.

    Cached as ``cache_dir()/agent/<version>/pyro-agent``. Raises
    EnvironmentBuildError (hint: ``apt-get install gcc libc6-dev``) when there is
    no C compiler or no static C library.
    """
    version = agent_version()
    dest_dir = cache_dir() / "agent" / version
    dest = dest_dir / "pyro-agent"
    if dest.is_file():
        return dest
    with _locked(cache_dir() / "agent" / f"{version}.lock"):
        if dest.is_file():
            return dest
        compiler = _find_compiler()
        progress(ProgressEvent("agent", f"compiling guest agent {version}"))
        dest_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".pyro-agent.", suffix=".tmp")
        os.close(fd)
        try:
            cmd = [
                compiler,
                *CFLAGS,
                f'-DAGENT_VERSION="{version}"',
                "-o",
                tmp,
                str(AGENT_SOURCE),
            ]
            try:
                proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300)
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise EnvironmentBuildError(
                    f"could not run the C compiler {compiler}: {exc}", hint=_INSTALL_HINT
                ) from exc
            if proc.returncode != 0:
                err = proc.stderr.strip()
                if re.search(r"cannot find -lc\b|crt1\.o|libc\.a", err):
                    message = "the static C library (libc.a) is missing"
                else:
                    message = f"compiling the guest agent failed (exit {proc.returncode})"
                raise EnvironmentBuildError(
                    message,
                    hint=_INSTALL_HINT,
                    details={"command": cmd, "stderr": err[-4000:]},
                )
            os.chmod(tmp, 0o755)  # noqa: S103 - an executable, copied into guests
            os.replace(tmp, dest)
        finally:
            Path(tmp).unlink(missing_ok=True)
    progress(ProgressEvent("agent", f"guest agent {version} ready"))
    return dest


# ---------------------------------------------------------------- initramfs


def _cpio_entry(
    out: list[bytes],
    ino: int,
    name: str,
    mode: int,
    data: bytes = b"",
    rdev: tuple[int, int] = (0, 0),
) -> None:
    encoded = name.encode() + b"\0"
    is_dir = (mode & 0o170000) == _S_IFDIR
    fields = (
        ino,
        mode,
        0,  # uid
        0,  # gid
        2 if is_dir else 1,  # nlink
        0,  # mtime
        len(data),
        0,  # devmajor
        0,  # devminor
        rdev[0],
        rdev[1],
        len(encoded),
        0,  # check
    )
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out.append(header + encoded)
    out.append(b"\0" * (-(len(header) + len(encoded)) % 4))
    out.append(data)
    out.append(b"\0" * (-len(data) % 4))


def build_cpio(files: dict[str, bytes], executables: frozenset[str] = frozenset()) -> bytes:
    """The initramfs as an uncompressed cpio "newc" archive, deterministic.

    ``files`` maps archive paths (no leading slash) to contents; directories
    ``dev proc sys newroot`` and each file's parents are created, plus the
    ``dev/console`` device node the kernel opens for /init's stdio.
    """
    dirs = {"dev", "proc", "sys", "newroot"}
    for name in files:
        parts = name.split("/")
        dirs.update("/".join(parts[:i]) for i in range(1, len(parts)))
    entries: list[tuple[str, int, bytes, tuple[int, int]]] = []
    entries += [(d, _S_IFDIR | 0o755, b"", (0, 0)) for d in dirs]
    entries.append(("dev/console", _S_IFCHR | 0o600, b"", (5, 1)))
    for name, data in files.items():
        mode = 0o755 if name in executables else 0o644
        entries.append((name, _S_IFREG | mode, data, (0, 0)))
    entries.sort(key=lambda e: e[0])
    out: list[bytes] = []
    for ino, (name, mode, data, rdev) in enumerate(entries, start=1):
        _cpio_entry(out, ino, name, mode, data, rdev)
    _cpio_entry(out, 0, "TRAILER!!!", 0)
    return b"".join(out)


def _read_module(path: Path) -> tuple[str, bytes]:
    """(name in the initramfs, uncompressed contents) of one kernel module file."""
    name = path.name
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise EnvironmentBuildError(f"cannot read kernel module {path}: {exc}") from exc
    try:
        if name.endswith(".ko.xz"):
            return name[:-3], lzma.decompress(raw)
        if name.endswith(".ko.gz"):
            return name[:-3], gzip.decompress(raw)
    except (lzma.LZMAError, OSError, EOFError) as exc:
        raise EnvironmentBuildError(f"cannot decompress kernel module {path}: {exc}") from exc
    if name.endswith(".ko.zst"):
        raise EnvironmentBuildError(
            f"kernel module {path} is zstd-compressed, which is not supported",
            hint="decompress it first (zstd -d)",
        )
    if not _MODULE_NAME.match(name):
        raise InvalidInputError(f"not a kernel module file name: {path}")
    return name, raw


def ensure_initramfs(modules: Sequence[Path], progress: ProgressFn = no_progress) -> Path:
    """Path of the initramfs holding the agent as /init and ``modules`` (in load order).

    Layout: ``/init``, ``/modules/<name>.ko`` for each module, ``/modules.list``
    (one file name a line, in the order given), empty ``/dev /proc /sys
    /newroot``, and the ``/dev/console`` node. Cached as
    ``cache_dir()/initramfs/<sha256>.cpio`` (``.cpio.gz`` when compressed).
    """
    agent = ensure_agent_binary(progress)
    key = hashlib.sha256(_INITRAMFS_LAYOUT)
    key.update(b"\0gz" if INITRAMFS_COMPRESSED else b"\0raw")
    key.update(b"\0agent\0" + sha256_file(agent).encode())
    for module in modules:
        key.update(b"\0module\0" + module.name.encode() + b"\0" + sha256_file(module).encode())
    suffix = ".cpio.gz" if INITRAMFS_COMPRESSED else ".cpio"
    out_dir = cache_dir() / "initramfs"
    dest = out_dir / f"{key.hexdigest()}{suffix}"
    if dest.is_file():
        return dest
    with _locked(out_dir / f"{key.hexdigest()}.lock"):
        if dest.is_file():
            return dest
        progress(ProgressEvent("initramfs", f"building initramfs ({len(modules)} modules)"))
        files: dict[str, bytes] = {"init": agent.read_bytes()}
        names: list[str] = []
        for module in modules:
            name, data = _read_module(module)
            if name in names:
                raise InvalidInputError(f"kernel module {name} given twice")
            names.append(name)
            files[f"modules/{name}"] = data
        files["modules.list"] = "".join(f"{n}\n" for n in names).encode()
        image = build_cpio(files, executables=frozenset({"init"}))
        if INITRAMFS_COMPRESSED:
            image = gzip.compress(image, compresslevel=6, mtime=0)
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_atomic(dest, image)
    return dest
