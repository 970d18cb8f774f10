"""Tasks whose /workspace is a disk: an ext4 image in a VM (``workspace_kind``
"disk", qemu).

``<task>/seed.img`` is built on the host from the kept seed folder (see
:mod:`pyro_mcp.workspace.seed`) and never attached to a guest;
``<task>/workspace.img`` is a copy of it (sparse, copy-on-write where the host
filesystem can), which each of the task's VMs gets as its second disk (a hard
link in the VM's folder, :attr:`VMPaths.workspace`), mounted by the guest agent
at /workspace (:data:`WORKSPACE_DISK_MOUNT`). A reset gives a new VM a fresh copy
of ``seed.img``: ``spare.img``, copied in the background after the task was made or
last reset, so the reset itself is a rename (a copy when the spare is not ready).
The host never reads ``workspace.img`` back: the guest may have written anything
into it.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from pathlib import Path

from pyro_mcp.fsio import copy_into_place
from pyro_mcp.tasks.runtime import VMGuest
from pyro_mcp.vmm.base import WORKSPACE_DISK_MOUNT, VMPaths
from pyro_mcp.workspace.seed import build_workspace_image

IMAGE = "workspace.img"
SEED_IMAGE = "seed.img"
SPARE_IMAGE = "spare.img"


class DiskRuntime(VMGuest):
    mounts = (WORKSPACE_DISK_MOUNT,)

    def prepare_workspace(self, task_dir: Path, seed: Path, entry_count: int) -> None:
        build_workspace_image(seed, task_dir / SEED_IMAGE, entry_count=entry_count)
        self.restore_workspace(task_dir)

    def restore_workspace(self, task_dir: Path) -> None:
        try:
            os.rename(task_dir / SPARE_IMAGE, task_dir / IMAGE)  # a whole copy, or absent
        except FileNotFoundError:
            copy_into_place(task_dir / SEED_IMAGE, task_dir / IMAGE)
        _copy_spare(task_dir)

    def attach(self, task_dir: Path, vm_dir: Path) -> None:
        disk = VMPaths(vm_dir).workspace
        try:
            os.link(task_dir / IMAGE, disk)
        except OSError:
            os.symlink(task_dir / IMAGE, disk)


def _copy_spare(task_dir: Path) -> None:
    """Start copying ``seed.img`` to ``spare.img`` for the next reset, detached: ``cp``
    to a private name, then a rename, so ``spare.img`` is whole or absent. A copy cut
    short (the task deleted, the host stopped) leaves nothing a reset would take."""
    tmp = task_dir / f".{SPARE_IMAGE}.{os.getpid()}.{time.monotonic_ns()}"
    script = 'cp --reflink=auto --sparse=always "$1" "$2" && mv -f "$2" "$3" || rm -f "$2"'
    with contextlib.suppress(OSError):
        subprocess.Popen(
            ["sh", "-c", script, "sh", str(task_dir / SEED_IMAGE), str(tmp),
             str(task_dir / SPARE_IMAGE)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )  # fmt: skip
