"""Tasks whose /workspace is a disk: an ext4 image in a VM (``workspace_kind``
"disk", qemu).

``<task>/workspace.img`` is built on the host from the seed (see
:mod:`pyro_mcp.workspace.seed`); each of the task's VMs gets it as its second
disk (a hard link in the VM's folder, :attr:`VMPaths.workspace`), which the
guest agent mounts at /workspace (:data:`WORKSPACE_DISK_MOUNT`). The host never
reads the image back: the guest may have written anything into it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pyro_mcp.tasks.runtime import VMGuest
from pyro_mcp.vmm.base import WORKSPACE_DISK_MOUNT, VMPaths
from pyro_mcp.workspace.seed import build_workspace_image

IMAGE = "workspace.img"


class DiskRuntime(VMGuest):
    mounts = (WORKSPACE_DISK_MOUNT,)

    def prepare_workspace(self, task_dir: Path, staging: Path, entry_count: int) -> None:
        build_workspace_image(staging, task_dir / IMAGE, entry_count=entry_count)
        shutil.rmtree(staging)

    def attach(self, task_dir: Path, vm_dir: Path) -> None:
        disk = VMPaths(vm_dir).workspace
        try:
            os.link(task_dir / IMAGE, disk)
        except OSError:
            os.symlink(task_dir / IMAGE, disk)
