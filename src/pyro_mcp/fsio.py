"""File primitives every on-disk record and cache shares: atomic writes, sha256, fsync.

An atomic write goes to a temporary file beside the target (same folder, so the
same filesystem), is fsync'd, then renamed over the target: a reader sees the
old content or the new one, never half of either. Records with their own
envelope (a ``schema`` field, a manifest format) build on :func:`write_json_atomic`
and :func:`read_json_object`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from pyro_mcp.errors import StateError


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's content (sparse holes read as zeros)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file, or a folder (which makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_atomic(path: Path, data: bytes, *, mode: int | None = None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it, rename it over ``path``.

    The file gets ``mode`` exactly, or by default the mode a plain
    ``open(path, "w")`` would (0666 less the umask).
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as fh:
            if mode is not None:
                os.fchmod(fh.fileno(), mode)
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    """:func:`write_bytes_atomic` of ``data`` as indented, key-sorted JSON plus a newline."""
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    write_bytes_atomic(path, text.encode("utf-8"))


def read_json_object(path: Path, *, hint: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``.

    FileNotFoundError passes through (absent is not damaged); anything else that
    keeps the file from being a JSON object raises StateError (with ``hint``).
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StateError(f"{path} is unreadable: {exc}", hint=hint) from exc
    if not isinstance(data, dict):
        raise StateError(f"{path} does not hold a JSON object", hint=hint)
    return data


__all__ = [
    "fsync_path",
    "read_json_object",
    "sha256_file",
    "write_bytes_atomic",
    "write_json_atomic",
]


def copy_into_place(source: Path, target: Path) -> None:
    """Replace ``target`` with a copy of ``source`` (a file, sparse holes kept, or a
    folder with modes, times and links as they are), via a temporary name beside
    it: ``target`` is the old one or the whole new one, never a part. Copy-on-write
    (reflink) where the filesystem has it. The old ``target`` is removed without
    following links in it."""
    import shutil
    import subprocess

    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.new")
    old = target.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
    args = ["cp", "--reflink=auto", "--no-dereference", "--preserve=mode,timestamps,links"]
    if source.is_dir():
        args.append("--recursive")
    else:
        args.append("--sparse=always")
    proc = subprocess.run(
        [*args, str(source), str(tmp)], check=False, capture_output=True, text=True
    )
    if proc.returncode != 0:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise OSError(f"copying {source} failed: {proc.stderr.strip()}")
    moved = False
    if target.is_dir() and not target.is_symlink():
        os.rename(target, old)
        moved = True
    os.rename(tmp, target)
    if moved:
        shutil.rmtree(old, ignore_errors=True)
