"""Tasks: persistent workspaces that keep their files across commands.

A task is a folder ``<state>/tasks/<task_id>/`` holding its record
(``task.json``, a :class:`~pyro_mcp.records.TaskRecord` in the shared
:class:`~pyro_mcp.records.RecordStore`) and its workspace, whose
form is the backend's ``workspace_kind`` (see :mod:`pyro_mcp.tasks.runtime`):
an ext4 image in a VM (qemu) or a host folder (gvisor, host_compat).

A task's VM is an ordinary VM (``<state>/vms/<vm_id>``) with no owner
process, so it outlives the ``pyro`` process that made it; its TTL is the
task's. If the VM is gone (host reboot, crash, ``pyro vm delete``), the next
exec starts a new one, on the same backend, over the same workspace:
/workspace persists, the rest of the guest's filesystem starts fresh.

Lifecycle changes (create, VM restart, delete) hold the task's file lock;
execs do not, so several run at once. A create that fails (bad source, unsafe
archive, boot failure) removes the task's folder and its VM: nothing is left.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock

from pyro_mcp import limits
from pyro_mcp.commands import ExecOptions
from pyro_mcp.errors import (
    BackendUnavailableError,
    InvalidInputError,
    NotFoundError,
    StateError,
    VMStateError,
    hints,
)
from pyro_mcp.manager import VMManager
from pyro_mcp.models import (
    ExecResult,
    TaskDeleteResult,
    TaskExecResult,
    TaskInfo,
    TaskResetResult,
    WorkspaceSeed,
)
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress
from pyro_mcp.records import RecordStore, TaskConfig, TaskRecord, state_dir_error
from pyro_mcp.records import TaskRuntime as TaskState
from pyro_mcp.state import ProcessId
from pyro_mcp.tasks.dir_runtime import FOLDER as WORKSPACE_FOLDER
from pyro_mcp.tasks.runtime import SEED, TaskRuntime, check_seed_kept, runtime_for
from pyro_mcp.tasks.vm_runtime import IMAGE as DISK_IMAGE
from pyro_mcp.vmm import SANDBOX_BACKEND_NAMES, fallback_backend, get_sandbox_backend
from pyro_mcp.workspace.archive import SeedLimits
from pyro_mcp.workspace.seed import resolve_source, seed_tree

if TYPE_CHECKING:
    from pyro_mcp.guest.channel import AgentChannel


class TaskManager:
    """Create, use and remove tasks. Shares its state root with a :class:`VMManager`."""

    def __init__(self, vms: VMManager, *, allow_host_compat: bool = False) -> None:
        self.vms = vms
        self.records: RecordStore[TaskRecord] = RecordStore(
            vms.state_root / "tasks",
            kind="task",
            filename="task.json",
            decode=TaskRecord.from_dict,
            check_id=limits.check_task_id,
            list_hint=hints(
                cli="list tasks with `pyro task list`",
                sdk="list tasks with Pyro.list_tasks()",
                mcp="list tasks with the task_list tool",
            ),
        )
        self.allow_host_compat = allow_host_compat

    # -- helpers ------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The id of the task ``ref`` names: its id, its name, or a unique prefix of
        its id (``task-3fa`` or ``3fa``). Every method taking a task id takes any of
        these; unknown is a NotFoundError, ambiguous an InvalidInputError listing the
        candidates."""
        return self.records.resolve(ref, lambda record: record.config.name)

    @contextlib.contextmanager
    def _names_lock(self) -> Iterator[None]:
        """Held while a name is checked for uniqueness and the record carrying it written."""
        with FileLock(str(self.records.root / ".names.lock")):
            yield

    def _check_name_free(self, name: str, task_id: str) -> None:
        for other in self.records.records():
            if other.config.name == name and other.config.task_id != task_id:
                raise InvalidInputError(
                    f"a task named {name!r} exists already: {other.config.task_id}",
                    hint=f"pick another name, or delete that task first (`pyro task delete "
                    f"{name}`)",
                    details={"task_id": other.config.task_id},
                )

    def _runtime(self, backend: str) -> TaskRuntime:
        return runtime_for(backend, self.vms, self.records)

    def _choose_backend(self) -> str:
        """A sandbox backend (host_compat) only when asked for by name, or allowed and
        no VM backend works."""
        name = self.vms._backend_name
        if name in SANDBOX_BACKEND_NAMES:
            get_sandbox_backend(name).require()
            return name
        try:
            backend, _ = self.vms.resolve_backend()
        except BackendUnavailableError:
            if self.allow_host_compat:
                fallback = fallback_backend()
                fallback.require()
                return fallback.name
            raise  # its hint says how to opt in to host_compat
        return backend

    # -- create -------------------------------------------------------------
    def create(
        self,
        environment: str,
        *,
        source_path: str | os.PathLike[str] | None = None,
        vcpu_count: int = limits.DEFAULT_VCPU_COUNT,
        mem_mib: int = limits.DEFAULT_MEM_MIB,
        ttl_seconds: int = limits.DEFAULT_TASK_TTL_SECONDS,
        network: bool = False,
        exclude: Sequence[str] = (),
        seed_limits: SeedLimits | None = None,
        name: str | None = None,
        progress: ProgressFn = no_progress,
    ) -> TaskInfo:
        """Make a task, seed /workspace from ``source_path`` and start it. ``name``
        (unique among tasks) may stand for its id afterwards.

        Everything is validated before anything is written; a failure at any
        step removes whatever was made.
        """
        from pyro_mcp.environments.catalog import get_spec

        spec = get_spec(environment)
        limits.check_vcpu_count(vcpu_count)
        limits.check_mem_mib(mem_mib)
        limits.check_ttl(ttl_seconds)
        limits.check_network(network)
        if name is not None:
            limits.check_task_name(name)
        if isinstance(exclude, str):
            exclude = [exclude]
        if not isinstance(exclude, Sequence) or not all(isinstance(p, str) for p in exclude):
            raise InvalidInputError(
                "exclude must be a list of glob patterns (strings)",
                hint="e.g. exclude=['.git', '*.pyc']",
            )
        if seed_limits is not None and not isinstance(seed_limits, SeedLimits):
            raise InvalidInputError(
                "seed_limits must be a SeedLimits", hint="pass SeedLimits(...) or None"
            )
        if source_path is not None:
            resolve_source(source_path)
        backend = self._choose_backend()
        runtime = self._runtime(backend)

        task_id, task_dir = self.records.create_folder()
        now = time.time()
        record = TaskRecord(
            TaskConfig(
                task_id=task_id,
                environment=spec.name,
                vcpu_count=vcpu_count,
                mem_mib=mem_mib,
                network=network,
                ttl_seconds=ttl_seconds,
                created_at=now,
                expires_at=now + ttl_seconds,
                backend=backend,
                execution_mode=runtime.backend.execution_mode,
                name=name,
            ),
            TaskState(environment_version=spec.version, creator=ProcessId.of(os.getpid())),
        )
        # The lock's file goes with the folder when a failed create removes it.
        with self.records.lock(task_id):
            try:
                if name is None:
                    self.records.save(record)
                else:
                    with self._names_lock():
                        self._check_name_free(name, task_id)
                        self.records.save(record)
                staging = task_dir / SEED
                try:
                    staging.mkdir(mode=0o700)
                except OSError as exc:
                    raise state_dir_error(task_dir, exc) from exc
                progress(ProgressEvent("seed", "preparing /workspace"))
                seed = seed_tree(staging, source_path, exclude=exclude, seed_limits=seed_limits)
                record = TaskRecord(replace(record.config, workspace_seed=seed), record.runtime)
                if seed.mode != "empty":
                    progress(
                        ProgressEvent(
                            "seed",
                            f"seeded {seed.entry_count} entries, {seed.bytes_written} bytes "
                            f"in {seed.seed_ms} ms",
                        )
                    )
                try:
                    runtime.prepare_workspace(task_dir, staging, seed.entry_count)
                except OSError as exc:
                    raise state_dir_error(task_dir, exc) from exc
                runtime.start(record, progress)
                record.runtime.creator = None
                self.records.save(record)
            except BaseException:
                self._discard(task_id, record)
                raise
        return self._info(record)

    def _discard(self, task_id: str, record: TaskRecord | None) -> None:
        """Stop a task's guest and remove its folder (failed create, delete, reap);
        without a (readable) record there is only the folder to remove."""
        if record is not None:
            with contextlib.suppress(InvalidInputError):
                self._runtime(record.config.backend).discard(record)
        self.records.remove(task_id)

    # -- exec ---------------------------------------------------------------
    def exec(
        self,
        task_id: str,
        command: str | Sequence[str],
        options: ExecOptions | None = None,
        *,
        progress: ProgressFn = no_progress,
    ) -> TaskExecResult:
        """Run one command in the task (default cwd /workspace). A timeout or a
        cancel kills the command; the task stays."""
        cmd = limits.check_command(command)
        opts = options or ExecOptions()
        task_id = self.resolve(task_id)
        record = self._usable(task_id)
        record, outcome = self._runtime(record.config.backend).exec(record, cmd, opts, progress)
        config, state = record.config, record.runtime
        return TaskExecResult(
            task_id=task_id,
            vm_id=state.vm_id,
            environment=config.environment,
            environment_version=state.environment_version,
            command=cmd,
            **outcome.result_fields(),
            execution_mode=config.execution_mode,
            backend=config.backend,
            acceleration=state.acceleration or "none",
            boot=state.boot,
        ).with_bytes(outcome.stdout, outcome.stderr)

    def _usable(self, task_id: str) -> TaskRecord:
        record = self.records.load(task_id)
        if record.runtime.status == "creating":
            raise VMStateError(
                f"task {task_id} is still being created", hint="wait for task create to finish"
            )
        if time.time() >= record.config.expires_at:
            raise VMStateError(
                f"task {task_id} has outlived its TTL and is being removed",
                hint="create a new task",
            )
        return record

    @contextlib.contextmanager
    def files(
        self, task_id: str, *, progress: ProgressFn = no_progress
    ) -> Iterator[tuple[TaskRecord, AgentChannel]]:
        """The task's record and a channel to its guest agent for file operations
        (:mod:`pyro_mcp.workspace.files`); the guest is restarted first if gone."""
        record = self._usable(self.resolve(task_id))
        with self._runtime(record.config.backend).files(record, progress) as channel:
            yield record, channel

    def seed_folder(self, task_id: str) -> Path:
        """The task's kept seed (what ``diff`` compares with)."""
        return check_seed_kept(self.records.folder(self.resolve(task_id)))

    # -- reset --------------------------------------------------------------
    def reset(self, task_id: str, *, progress: ProgressFn = no_progress) -> TaskResetResult:
        """Put /workspace back to the task's seed (kept at create), stopping what runs.
        On VM backends this is a new VM: the rest of the guest starts fresh too."""
        started = time.monotonic()
        task_id = self.resolve(task_id)
        self._usable(task_id)
        with self.records.lock(task_id):
            record = self._usable(task_id)
            runtime = self._runtime(record.config.backend)
            try:
                runtime.reset(record, progress)
            except BaseException:
                # The workspace is the old one or the seed, never a mix (copy_into_place);
                # a VM that did not start is started again by the next call.
                record.runtime.detail = "the last reset failed; reset again or delete the task"
                self.records.save(record)
                raise
            record.runtime.detail = "reset to its seed" + (
                "; the rest of the guest filesystem started fresh"
                if runtime.reset_reverts_guest
                else ""
            )
            self.records.save(record)
        seed = record.config.workspace_seed
        status, _ = runtime.observed_status(record)
        return TaskResetResult(
            task_id=task_id,
            status=status,
            workspace_seed_mode=seed.mode if seed else "empty",
            guest_reverted=runtime.reset_reverts_guest,
            vm_id=record.runtime.vm_id,
            boot=record.runtime.boot,
            duration_ms=int((time.monotonic() - started) * 1000),
        )

    # -- queries ------------------------------------------------------------
    def _info(self, record: TaskRecord) -> TaskInfo:
        config, state = record.config, record.runtime
        status, detail = self._runtime(config.backend).observed_status(record)
        seed = config.workspace_seed
        return TaskInfo(
            task_id=config.task_id,
            name=config.name,
            environment=config.environment,
            environment_version=state.environment_version,
            status=status,
            execution_mode=config.execution_mode,
            backend=config.backend,
            acceleration=state.acceleration or "none",
            vm_id=state.vm_id,
            vcpu_count=config.vcpu_count,
            mem_mib=config.mem_mib,
            network=config.network,
            ttl_seconds=config.ttl_seconds,
            created_at=datetime.fromtimestamp(config.created_at, UTC),
            expires_at=datetime.fromtimestamp(config.expires_at, UTC),
            workspace_path=limits.TASK_WORKSPACE,
            workspace_seed=WorkspaceSeed(**seed.to_dict())
            if seed
            else WorkspaceSeed(
                mode="empty",
                source_path=None,
                destination=limits.TASK_WORKSPACE,
                entry_count=0,
                bytes_written=0,
                sha256=None,
            ),
            boot=state.boot,
            detail=detail,
        )

    def status(self, task_id: str) -> TaskInfo:
        return self._info(self.records.load(self.resolve(task_id)))

    def list(self) -> list[TaskInfo]:
        out = []
        for record in self.records.records():
            with contextlib.suppress(InvalidInputError):  # a backend this version lacks
                out.append(self._info(record))
        return out

    # -- removal ------------------------------------------------------------
    def delete(self, task_id: str) -> TaskDeleteResult:
        """Stop the task's VM and remove it with its workspace. A second delete
        of the same task is a NotFoundError."""
        task_id = self.resolve(task_id)
        task_dir = self.records.folder(task_id)
        with self.records.lock(task_id):
            try:
                record: TaskRecord | None = self.records.load(task_id)
            except NotFoundError:
                if not task_dir.exists():
                    raise
                record = None  # a folder without a record: a create cut short
            except StateError:
                record = None
            self._discard(task_id, record)
        return TaskDeleteResult(task_id=task_id, deleted=True)

    @staticmethod
    def _reap_reason(record: TaskRecord, now: float) -> str | None:
        if now >= record.config.expires_at:
            return "ttl_expired"
        creator = record.runtime.creator
        if record.runtime.status == "creating" and (creator is None or not creator.alive()):
            return "create_interrupted"
        return None

    def reap_expired(self) -> dict[str, str]:
        """Remove tasks past their TTL, creates interrupted by a dead process, and
        folders without a record. Returns the ids removed, with why."""

        def delete(task_id: str, _reason: str) -> None:
            self.delete(task_id)

        return self.records.reap(self._reap_reason, delete)

    def _unrestartable(self, record: TaskRecord) -> str | None:
        """Why a task can never run a command again, or None: its backend is one this
        version lacks, or its workspace is gone (a VM can be restarted over a
        workspace, never without one)."""
        if record.runtime.status == "creating":
            return None
        try:
            self._runtime(record.config.backend)
        except InvalidInputError:
            return "backend_unknown"
        task_dir = self.records.folder(record.config.task_id)
        if not (task_dir / DISK_IMAGE).is_file() and not (task_dir / WORKSPACE_FOLDER).is_dir():
            return "workspace_missing"
        return None

    def prune(self, *, dry_run: bool = False) -> dict[str, str]:
        """Remove every task that cannot be used again, with why: past its TTL
        (``ttl_expired``), a create cut short by its process's death
        (``create_interrupted``), a folder left without a record for over a minute
        (``incomplete``), a backend this version lacks (``backend_unknown``) or a
        workspace gone (``workspace_missing``). A task whose VM merely stopped is
        kept: its next exec starts a new VM. ``dry_run``: only say what would go."""

        def why(record: TaskRecord, now: float) -> str | None:
            return self._reap_reason(record, now) or self._unrestartable(record)

        def delete(task_id: str, _reason: str) -> None:
            self.delete(task_id)

        return self.records.reap(why, delete, dry_run=dry_run)

    # -- one-shot in a sandbox backend (host_compat) ------------------------------------------
    def run_host_compat(
        self,
        environment: str,
        command: str | Sequence[str],
        options: ExecOptions | None = None,
        *,
        progress: ProgressFn = no_progress,
    ) -> ExecResult:
        """``run_in_vm``'s counterpart when the user opted in to host_compat: a
        throwaway host_compat task, always deleted."""
        from pyro_mcp.models import CleanupInfo, CommandResult

        cmd = limits.check_command(command)
        opts = options or ExecOptions()
        if opts.cwd is None:  # a one-shot run's default is a VM's, not a task's
            opts = replace(opts, cwd="/root")
        info = self.create(environment, ttl_seconds=limits.MIN_TTL_SECONDS * 6, progress=progress)
        try:
            result = self.exec(info.task_id, cmd, opts, progress=progress)
        finally:
            with contextlib.suppress(NotFoundError):
                self.delete(info.task_id)
        return ExecResult(
            vm_id=info.task_id,
            **result.model_dump(include=set(CommandResult.model_fields)),
            boot="cold",
            cleanup=CleanupInfo(deleted=True, reason="run finished"),
        ).with_bytes(result.stdout_bytes, result.stderr_bytes)

    def selects_host_compat(self) -> bool:
        """Whether a one-shot run should go to host_compat (asked for by name, or
        allowed and no VM backend works)."""
        if self.vms._backend_name in SANDBOX_BACKEND_NAMES:
            return True
        if not self.allow_host_compat:
            return False
        try:
            self.vms.resolve_backend()
        except BackendUnavailableError:
            return True
        return False
