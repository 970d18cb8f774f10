"""Tasks whose /workspace is a host folder (``workspace_kind`` "directory").

``<task>/workspace/`` is a copy of the kept seed folder ``<task>/seed/``
(mode 0755, inside the task's 0700 folder; a reset copies it again). Two
guests use it:

* :class:`DirectoryVMRuntime`, a long-lived sandbox (gvisor): the VM's folder
  gets a ``workspace`` symlink to it, which the sandbox bind-mounts;
* :class:`DirectorySandboxRuntime`, a sandbox per command (host_compat):
  each command runs in a fresh bubblewrap sandbox with the folder bound at
  /workspace and the environment's unpacked root read-only at /. Nothing runs
  between commands, so the task is "ready" rather than "running".

The guest writes this folder: the host must treat what it finds there as
untrusted (no following links out of it).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pyro_mcp.commands import BASE_ENV, ExecOptions, build_argv
from pyro_mcp.fsio import copy_into_place
from pyro_mcp.limits import TASK_WORKSPACE
from pyro_mcp.manager import ExecOutcome, VMManager
from pyro_mcp.models import TaskStatus
from pyro_mcp.progress import ProgressEvent, ProgressFn
from pyro_mcp.records import RecordStore, TaskRecord, state_dir_error
from pyro_mcp.tasks.runtime import SEED, VMGuest, check_seed_kept
from pyro_mcp.vmm.base import SandboxBackend

if TYPE_CHECKING:
    from pyro_mcp.guest.channel import AgentChannel

FOLDER = "workspace"


def _copy_seed(task_dir: Path) -> None:
    folder = task_dir / FOLDER
    copy_into_place(task_dir / SEED, folder)
    os.chmod(folder, 0o755)  # noqa: S103 - /workspace's mode; the task folder is 0700


class DirectoryVMRuntime(VMGuest):
    def prepare_workspace(self, task_dir: Path, seed: Path, entry_count: int) -> None:
        del seed, entry_count
        _copy_seed(task_dir)

    def restore_workspace(self, task_dir: Path) -> None:
        _copy_seed(task_dir)

    def attach(self, task_dir: Path, vm_dir: Path) -> None:
        os.symlink(task_dir / FOLDER, vm_dir / FOLDER)


class DirectorySandboxRuntime:
    def __init__(
        self, backend: SandboxBackend, vms: VMManager, records: RecordStore[TaskRecord]
    ) -> None:
        self.backend = backend
        self.vms = vms
        self.records = records

    reset_reverts_guest = False  # nothing runs between commands: only /workspace is kept

    def prepare_workspace(self, task_dir: Path, seed: Path, entry_count: int) -> None:
        del seed, entry_count
        _copy_seed(task_dir)

    def start(self, record: TaskRecord, progress: ProgressFn) -> None:
        state = record.runtime
        env = self.vms.store.ensure(record.config.environment, progress=progress)
        state.environment_version = env.version
        state.hostfs = str(self.backend.prepare_root(env, progress))
        state.acceleration = self.backend.probe().acceleration or "none"
        state.status = "ready"

    def _root(self, record: TaskRecord, progress: ProgressFn) -> Path:
        root = Path(record.runtime.hostfs or "")
        if not (root / "usr").is_dir():  # the cached tree was pruned: unpack it again
            installed = self.vms.store.ensure(record.config.environment, progress=progress)
            root = self.backend.prepare_root(installed, progress)
        return root

    def exec(
        self,
        record: TaskRecord,
        command: str | list[str],
        options: ExecOptions,
        progress: ProgressFn,
    ) -> tuple[TaskRecord, ExecOutcome]:
        root = self._root(record, progress)
        data = self.backend.run(
            root,
            self.records.folder(record.record_id) / FOLDER,
            build_argv(command, options.env),
            cwd=options.cwd_or(TASK_WORKSPACE),
            env={**BASE_ENV, **options.env},
            timeout_seconds=options.timeout_seconds,
            stdout_cap=options.stdout_cap,
            stderr_cap=options.stderr_cap,
            stdin=options.stdin.chunks() if options.stdin is not None else None,
            on_output=options.emit if options.streaming else None,
        )
        return record, ExecOutcome(**data)

    def observed_status(self, record: TaskRecord) -> tuple[TaskStatus, str | None]:
        return record.runtime.status, record.runtime.detail

    def discard(self, record: TaskRecord) -> None:
        del record  # nothing runs between commands

    @contextlib.contextmanager
    def files(self, record: TaskRecord, progress: ProgressFn) -> Iterator[AgentChannel]:
        folder = self.records.folder(record.record_id) / FOLDER
        with self.backend.files(self._root(record, progress), folder) as channel:
            yield channel

    def reset(self, record: TaskRecord, progress: ProgressFn) -> None:
        """A new copy of the seed. Commands of this task still running in other
        processes keep the old folder (now removed) until they end."""
        task_dir = self.records.folder(record.record_id)
        check_seed_kept(task_dir)
        progress(ProgressEvent("reset", "restoring /workspace from the seed"))
        try:
            _copy_seed(task_dir)
        except OSError as exc:
            raise state_dir_error(task_dir, exc) from exc
