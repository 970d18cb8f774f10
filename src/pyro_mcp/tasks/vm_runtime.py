"""Tasks whose /workspace is a disk: an ext4 image in a VM (``workspace_kind``
"disk", qemu).

``<task>/seed.img`` is built on the host from the kept seed folder (see
:mod:`pyro_mcp.workspace.seed`) and never attached to a guest;
``<task>/workspace.img`` is a copy of it (sparse, copy-on-write where the host
filesystem can), which each of the task's VMs gets as its second disk (a hard
link in the VM's folder, :attr:`VMPaths.workspace`), mounted by the guest agent
at /workspace (:data:`WORKSPACE_DISK_MOUNT`). A reset copies ``seed.img`` again
under a new VM. The host never reads ``workspace.img`` back: the guest may have
written anything into it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pyro_mcp.fsio import copy_into_place
from pyro_mcp.tasks.runtime import VMGuest
from pyro_mcp.vmm.base import WORKSPACE_DISK_MOUNT, VMPaths
from pyro_mcp.workspace.seed import build_workspace_image

IMAGE = "workspace.img"
SEED_IMAGE = "seed.img"


class DiskRuntime(VMGuest):
    mounts = (WORKSPACE_DISK_MOUNT,)

    def prepare_workspace(self, task_dir: Path, seed: Path, entry_count: int) -> None:
        build_workspace_image(seed, task_dir / SEED_IMAGE, entry_count=entry_count)
        self.restore_workspace(task_dir)

    def restore_workspace(self, task_dir: Path) -> None:
        copy_into_place(task_dir / SEED_IMAGE, task_dir / IMAGE)

    def attach(self, task_dir: Path, vm_dir: Path) -> None:
        disk = VMPaths(vm_dir).workspace
        try:
            os.link(task_dir / IMAGE, disk)
        except OSError:
            os.symlink(task_dir / IMAGE, disk)
