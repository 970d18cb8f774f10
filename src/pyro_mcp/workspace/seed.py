"""Seeding a task's workspace from a host directory or a tar archive.

All content is validated and extracted on the host, by the one extractor in
:mod:`pyro_mcp.workspace.archive`, into a staging folder inside the task's own
state folder. Then:

* microVM tasks: ``mkfs.ext4 -d STAGING`` writes the tree into the task's
  workspace disk image (sparse, always :data:`WORKSPACE_DISK_MIB`, so one
  warm-start snapshot fits every VM), which the guest mounts at /workspace;
* host-compat tasks: the staging folder *is* the workspace.

Why on the host: decompression, hashing and file creation run natively there,
while the same work in a TCG guest is about 20x slower (see docs/tasks.md for
measured figures); and the guest never parses an untrusted archive.

``sha256`` in the metadata is, for a tar archive, the digest of the archive
file as given (``sha256sum FILE``); for a directory, the digest of its
canonical tar (:func:`pyro_mcp.workspace.archive.write_canonical_tar`),
computed while copying.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from pyro_mcp import limits
from pyro_mcp.errors import InvalidInputError, PyroError, StateError
from pyro_mcp.vmm.base import WORKSPACE_DISK_MIB
from pyro_mcp.workspace.archive import (
    Excluder,
    Extractor,
    SeedLimits,
    UnsafeSeedError,
    check_tree,
    copy_tree,
    extract_tar_stream,
)

SeedMode = Literal["empty", "directory", "tar_archive"]
IMAGE_LABEL = "workspace"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")


@dataclass(frozen=True)
class SeedResult:
    """What was seeded; persisted with the task as ``workspace_seed``."""

    mode: SeedMode
    source_path: str | None
    destination: str
    entry_count: int
    bytes_written: int
    sha256: str | None
    exclude: tuple[str, ...] = ()
    seed_ms: int = 0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["exclude"] = list(self.exclude)
        return data


def resolve_source(source_path: str | os.PathLike[str]) -> tuple[SeedMode, Path]:
    """Which kind of source this is, and its absolute path (symlinks resolved)."""
    if (
        not isinstance(source_path, str | os.PathLike)
        or not isinstance(os.fspath(source_path), str)
        or not os.fspath(source_path)
        or "\x00" in os.fspath(source_path)
    ):
        raise InvalidInputError(
            "source_path must be a path to a directory or a tar archive",
            hint="pass a non-empty path (str or pathlib.Path) without NUL bytes",
        )
    given = Path(source_path).expanduser()
    try:
        path = given.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError):
        raise InvalidInputError(
            f"source_path {given} does not exist",
            hint="pass an existing directory or .tar/.tar.gz/.tar.bz2/.tar.xz file",
        ) from None
    except (OSError, RuntimeError) as exc:
        raise InvalidInputError(f"source_path {given} cannot be resolved: {exc}") from None
    if path.is_dir():
        return "directory", path
    if path.is_file():
        return "tar_archive", path
    raise InvalidInputError(
        f"source_path {given} is neither a directory nor a regular file",
        hint="pass a directory or a tar archive",
    )


def seed_tree(
    staging: Path,
    source_path: str | os.PathLike[str] | None,
    *,
    exclude: Sequence[str] = (),
    seed_limits: SeedLimits | None = None,
    destination: str = limits.TASK_WORKSPACE,
) -> SeedResult:
    """Validate ``source_path`` and extract it into ``staging`` (an empty folder).

    On error the caller discards ``staging``; nothing is written elsewhere.
    """
    caps = seed_limits or SeedLimits()
    if isinstance(exclude, str):
        exclude = [exclude]
    excluder = Excluder(exclude)
    started = time.monotonic()
    if source_path is None:
        return SeedResult("empty", None, destination, 0, 0, None, excluder.patterns)
    mode, path = resolve_source(source_path)
    extractor = Extractor(staging, caps)
    try:
        if mode == "directory":
            check_tree(path, excluder, caps)
            digest = copy_tree(path, extractor, excluder)
        else:
            try:
                fh = path.open("rb")
            except OSError as exc:
                raise InvalidInputError(f"cannot read {path}: {exc.strerror}") from None
            with fh:
                digest = extract_tar_stream(fh, extractor, excluder)
    except PyroError:
        raise
    except OSError as exc:
        raise _write_error(exc, staging) from exc
    return SeedResult(
        mode=mode,
        source_path=str(path),
        destination=destination,
        entry_count=extractor.entry_count,
        bytes_written=extractor.bytes_written,
        sha256=digest,
        exclude=excluder.patterns,
        seed_ms=int((time.monotonic() - started) * 1000),
    )


def _write_error(exc: OSError, staging: Path) -> PyroError:
    from pyro_mcp.records import state_dir_error

    return state_dir_error(staging.parent, exc)


def build_workspace_image(tree: Path, image: Path, *, entry_count: int) -> None:
    """Write ``tree`` into a fresh ext4 image of :data:`WORKSPACE_DISK_MIB` (sparse).

    mke2fs discards (punches) the file first, so inode tables read as zero and
    are flagged so: the guest runs no lazy-init thread and the file stays small.
    """
    if shutil.which("mkfs.ext4") is None:
        raise StateError(
            "mkfs.ext4 is not installed", hint="install e2fsprogs: apt-get install e2fsprogs"
        )
    inodes = max(262_144, entry_count + 65_536)
    image.unlink(missing_ok=True)
    with image.open("wb") as fh:
        fh.truncate(WORKSPACE_DISK_MIB << 20)
    os.chmod(tree, 0o755)  # noqa: S103 - becomes /workspace's own mode; parent is 0700
    mkfs = [
        "mkfs.ext4", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0",
        "-N", str(inodes), "-L", IMAGE_LABEL,
        # The file is new and sparse (reads as zeros): no need to zero the journal
        # or inode tables, which stay flagged as zeroed, so the guest runs no lazy init.
        "-E", "root_owner=0:0,lazy_itable_init=1,lazy_journal_init=1",
        "-d", str(tree), str(image), f"{WORKSPACE_DISK_MIB}M",
    ]  # fmt: skip
    proc = subprocess.run(mkfs, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        message = (proc.stderr or proc.stdout).strip()
        if "Could not allocate" in message or "No space left" in message:
            raise UnsafeSeedError(
                f"the seed does not fit the {WORKSPACE_DISK_MIB} MiB workspace disk",
                hint="seed less data",
                details={"rule": "total_size", "member": ""},
            )
        raise StateError(f"building the workspace disk failed: {message}")
    _remove_lost_found(image, tree)


def _remove_lost_found(image: Path, tree: Path) -> None:
    """mke2fs always makes /lost+found; drop it unless the source had one, so
    /workspace lists exactly what was seeded (e2fsck recreates it if needed)."""
    if (tree / "lost+found").exists() or shutil.which("debugfs") is None:
        return
    subprocess.run(
        ["debugfs", "-w", "-R", "rmdir lost+found", str(image)],
        capture_output=True,
        check=False,
    )
