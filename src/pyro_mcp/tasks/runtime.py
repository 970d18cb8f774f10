"""The task runtime: how a task's commands reach its workspace.

One interface, :class:`TaskRuntime`, with an implementation per kind of
workspace (the backend's ``workspace_kind``):

* "disk" (:mod:`pyro_mcp.tasks.vm_runtime`): ``workspace.img``, an ext4 image
  built on the host from the seed, the VM's second disk, mounted at /workspace
  by the guest agent (qemu);
* "directory" (:mod:`pyro_mcp.tasks.dir_runtime`): ``workspace/``, a host
  folder, bind-mounted into a long-lived sandbox (gvisor) or into a fresh
  bubblewrap sandbox per command (host_compat).

The task manager (:mod:`pyro_mcp.tasks.manager`) validates, seeds, records,
locks and reaps; it picks the runtime with :func:`runtime_for` and never looks
at a backend's name. Runtimes that keep a VM share :class:`VMGuest`: the VM has
no owner process and the task's TTL, and if it is gone (host reboot, crash,
``pyro vm delete``) the next exec starts a new one over the same workspace.

Every task keeps its seed, as pyro wrote it, in ``<task>/seed/`` (never
given to the guest): :meth:`TaskRuntime.prepare_workspace` makes the workspace
from it, :meth:`TaskRuntime.reset` makes it again, and ``task_diff`` compares
against it. File operations (:mod:`pyro_mcp.workspace.files`, diff, export) go
through :meth:`TaskRuntime.files`, a channel to the guest agent: the host never
parses a guest-written filesystem or walks a folder a guest wrote.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from pyro_mcp import limits
from pyro_mcp.commands import ExecOptions
from pyro_mcp.errors import InvalidInputError, NotFoundError, PyroError, StateError, VMStateError
from pyro_mcp.manager import ExecOutcome, VMManager
from pyro_mcp.models import TaskStatus
from pyro_mcp.progress import ProgressEvent, ProgressFn
from pyro_mcp.records import RecordStore, TaskRecord, state_dir_error
from pyro_mcp.vmm import backend_info, get_backend, get_sandbox_backend
from pyro_mcp.vmm.base import Backend, BackendInfo

if TYPE_CHECKING:
    from pyro_mcp.guest.channel import AgentChannel

SEED = "seed"
"""The task folder's copy of the seed as pyro wrote it (host-only, never in a guest)."""


class TaskRuntime(Protocol):
    """A task's guest and workspace, as the task manager uses them."""

    @property
    def backend(self) -> BackendInfo: ...

    def prepare_workspace(self, task_dir: Path, seed: Path, entry_count: int) -> None:
        """Make the workspace this kind of runtime uses from the ``seed`` folder
        (``task_dir/seed``, kept), and what :meth:`reset` needs to make it again."""
        ...

    def start(self, record: TaskRecord, progress: ProgressFn) -> None:
        """Make the task usable (lock held): start its guest, or prepare what each
        command's sandbox needs. Sets ``status``, ``acceleration`` and, for a VM,
        ``vm_id`` and ``boot`` in ``record.runtime``."""
        ...

    def exec(
        self,
        record: TaskRecord,
        command: str | list[str],
        options: ExecOptions,
        progress: ProgressFn,
    ) -> tuple[TaskRecord, ExecOutcome]:
        """Run ``command`` (checked by the caller, like ``options``; ``cwd=None`` is
        /workspace) in the task, restarting its guest first if it is gone; returns the
        (possibly updated) record and the outcome."""
        ...

    def observed_status(self, record: TaskRecord) -> tuple[TaskStatus, str | None]:
        """(status, detail) as they are now, not as last recorded."""
        ...

    def discard(self, record: TaskRecord) -> None:
        """Stop whatever runs for the task (its folder is removed by the caller)."""
        ...

    def files(
        self, record: TaskRecord, progress: ProgressFn
    ) -> AbstractContextManager[AgentChannel]:
        """A channel to the guest agent for file operations (the guest restarted
        first if it is gone)."""
        ...

    def reset(self, record: TaskRecord, progress: ProgressFn) -> None:
        """Stop what runs in the task, make the workspace again from the kept seed and
        make the task usable (lock held; ``record.runtime`` updated)."""
        ...

    #: Whether :meth:`reset` also starts the rest of the guest's filesystem fresh.
    reset_reverts_guest: bool


def check_seed_kept(task_dir: Path) -> Path:
    """The task's kept seed folder; tasks made before pyro-mcp kept one have none."""
    seed = task_dir / SEED
    if not seed.is_dir():
        raise VMStateError(
            f"task {task_dir.name} has no kept seed (it was created by an older pyro-mcp)",
            hint="create a new task from the same source",
        )
    return seed


def runtime_for(backend: str, vms: VMManager, records: RecordStore[TaskRecord]) -> TaskRuntime:
    """The runtime for tasks on ``backend``, chosen by what the backend declares."""
    from pyro_mcp.tasks.dir_runtime import DirectorySandboxRuntime, DirectoryVMRuntime
    from pyro_mcp.tasks.vm_runtime import DiskRuntime

    info = backend_info(backend)
    if info.workspace_kind == "disk":
        return DiskRuntime(get_backend(backend), vms, records)
    if info.runs_vms:
        return DirectoryVMRuntime(get_backend(backend), vms, records)
    return DirectorySandboxRuntime(get_sandbox_backend(backend), vms, records)


class VMGuest:
    """A long-lived VM per task, started again over the same workspace when gone.
    Subclasses say how the workspace is attached (:meth:`attach`) and mounted."""

    #: What the guest agent mounts at INIT.
    mounts: tuple[Mapping[str, Any], ...] = ()
    reset_reverts_guest = True  # a reset is a new VM

    def __init__(self, backend: Backend, vms: VMManager, records: RecordStore[TaskRecord]) -> None:
        self.backend = backend
        self.vms = vms
        self.records = records

    def attach(self, task_dir: Path, vm_dir: Path) -> None:
        """Give the VM's folder (before its start) the task's workspace."""
        raise NotImplementedError

    def restore_workspace(self, task_dir: Path) -> None:
        """Make the workspace again from what :meth:`prepare_workspace` kept."""
        raise NotImplementedError

    @contextlib.contextmanager
    def files(self, record: TaskRecord, progress: ProgressFn) -> Iterator[AgentChannel]:
        record = self._ensure_vm(record, progress)
        with self.vms.files(str(record.runtime.vm_id)) as channel:
            yield channel

    def reset(self, record: TaskRecord, progress: ProgressFn) -> None:
        task_dir = self.records.folder(record.record_id)
        check_seed_kept(task_dir)
        self.discard(record)
        record.runtime.vm_id = None
        progress(ProgressEvent("reset", "restoring /workspace from the seed"))
        try:
            self.restore_workspace(task_dir)
        except OSError as exc:
            raise state_dir_error(task_dir, exc) from exc
        self._start_vm(record, progress)
        record.runtime.status = "running"

    def start(self, record: TaskRecord, progress: ProgressFn) -> None:
        self._start_vm(record, progress)
        record.runtime.status = "running"

    def _start_vm(self, record: TaskRecord, progress: ProgressFn) -> None:
        """Create and boot a VM for the task on its workspace (lock held)."""
        config, state = record.config, record.runtime
        remaining = math.ceil(config.expires_at - time.time())
        if remaining <= 0:
            raise VMStateError(
                f"task {config.task_id} has outlived its TTL", hint="create a new task"
            )
        # Always the task's own backend (a restart must not switch it).
        vms = VMManager(
            state_root=self.vms.state_root, store=self.vms.store, backend=self.backend.name
        )
        info = vms.create(
            config.environment,
            vcpu_count=config.vcpu_count,
            mem_mib=config.mem_mib,
            # The task's reaper removes it at the task's TTL in any case.
            ttl_seconds=max(remaining, limits.MIN_TTL_SECONDS),
            network=config.network,
            mounts=self.mounts,
        )
        state.vm_id = info.vm_id
        state.acceleration = info.acceleration
        self.records.save(record)
        vm_dir = vms.records.folder(info.vm_id)
        try:
            self.attach(self.records.folder(config.task_id), vm_dir)
        except OSError as exc:
            raise state_dir_error(vm_dir, exc) from exc
        started = vms.start(info.vm_id, progress=progress)
        state.boot = started.boot
        state.environment_version = started.environment_version

    def exec(
        self,
        record: TaskRecord,
        command: str | list[str],
        options: ExecOptions,
        progress: ProgressFn,
    ) -> tuple[TaskRecord, ExecOutcome]:
        record = self._ensure_vm(record, progress)
        outcome = self.vms.exec(
            str(record.runtime.vm_id),
            command,
            options,
            default_cwd=limits.TASK_WORKSPACE,
            progress=progress,
        )
        return record, outcome

    def _vm_running(self, record: TaskRecord) -> bool:
        vm_id = record.runtime.vm_id
        if not vm_id:
            return False
        try:
            return self.vms.status(vm_id).status == "running"
        except (NotFoundError, StateError):
            return False

    def _ensure_vm(self, record: TaskRecord, progress: ProgressFn) -> TaskRecord:
        """The task's record with a running VM, starting a new one if it is gone."""
        if self._vm_running(record):
            return record
        task_id = record.record_id
        with self.records.lock(task_id):
            record = self.records.load(task_id)
            if self._vm_running(record):
                return record
            old = record.runtime.vm_id
            reason = self._vm_gone_reason(old)
            if old:
                with contextlib.suppress(NotFoundError, InvalidInputError, StateError):
                    self.vms.delete(old)
            progress(ProgressEvent("boot", f"task {task_id}: its VM {reason}; starting a new one"))
            record.runtime.vm_id = None
            try:
                self._start_vm(record, progress)
            except PyroError as exc:
                record.runtime.detail = f"starting a new VM failed: {exc.message}"
                self.records.save(record)
                raise
            record.runtime.detail = (
                f"VM restarted: the previous one {reason}; /workspace was kept, the rest of "
                "the guest filesystem started fresh"
            )
            self.records.save(record)
            return record

    def _vm_gone_reason(self, vm_id: str | None) -> str:
        if not vm_id:
            return "was never started"
        try:
            info = self.vms.status(vm_id)
        except (NotFoundError, StateError):
            return "no longer exists"
        return f"stopped ({info.detail or info.status})"

    def observed_status(self, record: TaskRecord) -> tuple[TaskStatus, str | None]:
        status = record.runtime.status
        detail = record.runtime.detail
        if status not in ("running", "stopped"):
            return status, detail
        if self._vm_running(record):
            return "running", detail
        return "stopped", (
            f"its VM {self._vm_gone_reason(record.runtime.vm_id)}; the next exec starts "
            "a new one on the same /workspace"
        )

    def discard(self, record: TaskRecord) -> None:
        vm_id = record.runtime.vm_id
        if vm_id:
            with contextlib.suppress(NotFoundError, InvalidInputError, OSError, StateError):
                self.vms.delete(vm_id)
