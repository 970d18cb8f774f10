"""An installed environment's root filesystem unpacked into a folder, once per image.

The gvisor backend and host_compat run guests on a folder, not a disk image:
the same ``rootfs.ext4`` the VM backends boot, unpacked with ``debugfs rdump``
(no mount, no loop device, no root needed) into
``<cache>/hostfs/<install folder>-<first 16 hex of the image's sha256>/``.
A rebuilt image gets a new folder; ``EnvironmentStore.prune`` (and ``pyro env
prune``) removes the folders of images no longer installed.

Users treat the folder as read-only (gvisor lays a private overlay on it,
bubblewrap binds it read-only). A folder is complete when it holds
:data:`READY_MARK`; it is built in a ``.tmp-`` folder under a per-folder lock
and renamed into place, so a reader never sees half a tree.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from filelock import FileLock

from pyro_mcp import paths
from pyro_mcp.environments.cachefs import TMP_PREFIX, new_tmp_dir, try_lock
from pyro_mcp.environments.tools import remove_tree
from pyro_mcp.errors import EnvironmentBuildError, PyroError
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress

TREES_DIRNAME = "hostfs"
#: Written last into a complete tree (and visible to the guest as ``/.pyro-hostfs-ready``).
READY_MARK = ".pyro-hostfs-ready"
#: Mount points the sandboxes bind over; made if the image lacks them.
MOUNT_POINTS = ("workspace", "tmp", "run", "root", "dev", "proc")

_TMP_TREE = re.compile(re.escape(TMP_PREFIX) + r"(.+)-[0-9a-f]{8}")


class UnpackableImage(Protocol):
    """What :func:`ensure_rootfs_tree` needs of an install (an ``InstalledEnvironment``)."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def path(self) -> Path: ...  # <cache>/environments/<install folder>
    @property
    def rootfs(self) -> Path: ...
    @property
    def rootfs_sha256(self) -> str: ...


def hostfs_root(cache_root: Path | None = None) -> Path:
    """Where the unpacked trees of the cache at ``cache_root`` (default: cache_dir()) live."""
    return (cache_root or paths.cache_dir()) / TREES_DIRNAME


def tree_dirname(install_dirname: str, rootfs_sha256: str) -> str:
    """The tree folder's name for an install's current image."""
    return f"{install_dirname}-{rootfs_sha256[:16]}"


def ensure_rootfs_tree(env: UnpackableImage, progress: ProgressFn = no_progress) -> Path:
    """``env``'s root filesystem unpacked into a cached folder (unpacked on first use).

    The folder lives in the same cache as the install (``env.path`` is
    ``<cache>/environments/<install folder>``).
    """
    root = paths.ensure_private_dir(hostfs_root(env.path.parent.parent))
    final = root / tree_dirname(env.path.name, env.rootfs_sha256)
    if (final / READY_MARK).exists():
        return final
    if shutil.which("debugfs") is None:
        raise EnvironmentBuildError(
            "debugfs is not installed (needed to unpack the environment for host_compat/gvisor)",
            hint="install e2fsprogs: apt-get install e2fsprogs",
        )
    with FileLock(str(_lock_path(final))):
        if (final / READY_MARK).exists():
            return final
        progress(ProgressEvent("rootfs", f"unpacking {env.name}'s root filesystem (once)"))
        tmp = new_tmp_dir(root, final.name)
        tmp.chmod(0o700)
        try:
            _unpack(env, tmp)
            if final.exists():  # an incomplete tree (no ready mark) from before
                remove_tree(final)
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError, PyroError):
                remove_tree(tmp)
            raise
    return final


def _unpack(env: UnpackableImage, tmp: Path) -> None:
    proc = subprocess.run(
        ["debugfs", "-R", f"rdump / {tmp}", str(env.rootfs)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0 or not (tmp / "usr").is_dir():
        raise EnvironmentBuildError(
            f"unpacking {env.rootfs} failed: {proc.stderr.strip()[-2000:]}",
            hint="check the environment with `pyro env inspect --verify`",
        )
    for mount_point in MOUNT_POINTS:
        (tmp / mount_point).mkdir(mode=0o755, exist_ok=True)
    os.chmod(tmp, 0o755)  # noqa: S103 - the sandbox's /, read-only; the parent is 0700
    (tmp / READY_MARK).write_text(f"{env.name} {env.version} {env.rootfs_sha256}\n")


def _lock_path(tree: Path) -> Path:
    return tree.with_name(f".{tree.name}.lock")


def prune_rootfs_trees(
    keep: Iterable[Path | str] = (),
    *,
    root: Path | None = None,
    keep_prefixes: Iterable[str] = (),
) -> list[str]:
    """Remove the trees in ``root`` (default: :func:`hostfs_root`) other than ``keep``
    (paths or folder names) and those starting with one of ``keep_prefixes``, and
    interrupted unpacks. A tree being unpacked right now is left alone. Returns the
    removed paths."""
    root = root or hostfs_root()
    keep_names = {Path(k).name for k in keep}
    prefixes = tuple(keep_prefixes)
    removed: list[str] = []
    try:
        entries = sorted(root.iterdir())
    except FileNotFoundError:
        return []
    for entry in entries:
        if not entry.is_dir() or entry.is_symlink():
            continue  # lock files
        match = _TMP_TREE.fullmatch(entry.name)
        final = root / match.group(1) if match else entry
        if not match and (entry.name in keep_names or entry.name.startswith(prefixes)):
            continue
        lock = try_lock(_lock_path(final))
        if lock is None:
            continue  # being unpacked by another process
        try:
            remove_tree(entry)
            removed.append(str(entry))
        finally:
            lock.release()
    return removed


__all__ = [
    "READY_MARK",
    "TREES_DIRNAME",
    "UnpackableImage",
    "ensure_rootfs_tree",
    "hostfs_root",
    "prune_rootfs_trees",
    "tree_dirname",
]
