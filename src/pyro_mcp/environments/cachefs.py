"""The cache folder's housekeeping: per-item locks, swapping a folder into place, and
handing files a root build makes back to the user who owns the cache."""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout

from pyro_mcp.environments.tools import is_root, remove_tree
from pyro_mcp.errors import EnvironmentBuildError
from pyro_mcp.fsio import fsync_path
from pyro_mcp.progress import ProgressEvent, ProgressFn

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 3600.0  # how long to wait for another process's build
#: Folders being built, or moved aside to be deleted, start with this.
TMP_PREFIX = ".tmp-"


class Owner:
    """Hands files a root process creates in a user's cache back to that user.

    ``sudo env PYRO_CACHE_DIR=~/.cache/pyro-mcp pyro env pull`` builds as root
    into a folder the user owns; without this the user could not lock, prune or
    rebuild it afterwards.
    """

    def __init__(self, root: Path) -> None:
        self.uid: int | None = None
        self.gid: int | None = None
        if is_root():
            try:
                st = root.stat()
            except OSError:
                return
            if st.st_uid != 0:
                self.uid, self.gid = st.st_uid, st.st_gid

    def adopt(self, path: Path, *, recursive: bool = False) -> None:
        if self.uid is None or self.gid is None:
            return
        paths: Iterable[Path] = [path]
        if recursive and path.is_dir():
            paths = [path, *path.rglob("*")]
        for p in paths:
            try:
                os.lchown(p, self.uid, self.gid)
            except OSError as exc:
                log.debug("cannot chown %s: %s", p, exc)


@contextmanager
def locked(
    lock_path: Path, owner: Owner, progress: ProgressFn, stage: str, what: str
) -> Iterator[None]:
    """Hold ``lock_path``; while another process holds it, say so and wait (up to an hour)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    owner.adopt(lock_path.parent)
    lock = FileLock(str(lock_path), mode=0o664)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(ProgressEvent(stage, f"waiting for another process to finish {what}"))
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise EnvironmentBuildError(
                f"gave up waiting for the lock on {what} after {LOCK_TIMEOUT_S:.0f} s",
                hint=f"another pyro process holds {lock_path}; stop it or remove the lock",
            ) from None
    owner.adopt(lock_path)
    try:
        yield
    finally:
        lock.release()


def try_lock(lock_path: Path) -> FileLock | None:
    """The lock, acquired without waiting, or None when another process holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), mode=0o664)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def new_tmp_dir(parent: Path, stem: str) -> Path:
    """A fresh ``.tmp-<stem>-<8 hex>`` folder in ``parent`` (0755)."""
    tmp = parent / f"{TMP_PREFIX}{stem}-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o755)
    return tmp


def remove_aside(folder: Path) -> None:
    """Rename ``folder`` to a ``.tmp-...-old`` name, then delete it.

    Readers never see a half-deleted folder under its real name, and an
    interrupted delete leaves a folder that ``prune`` recognizes.
    """
    aside = _aside_name(folder)
    os.rename(folder, aside)
    remove_tree(aside)


def _aside_name(folder: Path) -> Path:
    return folder.with_name(f"{TMP_PREFIX}{folder.name}-{secrets.token_hex(4)}-old")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is moved aside and removed."""
    old: Path | None = None
    if final.exists():
        old = _aside_name(final)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if old is not None:
        remove_tree(old)


def allocated_bytes(folder: Path) -> int:
    """Host disk space the files under ``folder`` take (sparse files count what is used)."""
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


__all__ = [
    "LOCK_TIMEOUT_S",
    "TMP_PREFIX",
    "Owner",
    "allocated_bytes",
    "locked",
    "new_tmp_dir",
    "now_iso",
    "remove_aside",
    "replace_dir",
    "try_lock",
]
