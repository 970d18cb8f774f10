"""Tasks: persistent workspaces that keep their files across commands.

A task is a folder ``<state>/tasks/<task_id>/`` holding its record
(``task.json``, atomic and versioned) and its workspace:

* microVM tasks (qemu): ``workspace.img``, an ext4 image built on the host from
  the seed (see :mod:`pyro_mcp.workspace.seed`), the VM's second disk (a hard
  link in the VM's folder), which the guest agent mounts at /workspace.
* gVisor tasks: ``workspace/``, a folder; the VM's folder gets a ``workspace``
  symlink to it, which the sandbox bind-mounts at /workspace.
* host_compat tasks: ``workspace/``, a folder bound at /workspace in a
  bubblewrap sandbox per command (:mod:`pyro_mcp.vmm.host_compat`).

The task's VM is an ordinary VM (``<state>/vms/<vm_id>``) with no owner
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
import math
import os
import secrets
import shutil
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from pyro_mcp import limits, paths
from pyro_mcp.commands import ExecOptions, build_argv
from pyro_mcp.control import MountSpec
from pyro_mcp.errors import (
    BackendUnavailableError,
    InvalidInputError,
    NotFoundError,
    PyroError,
    StateError,
    VMStateError,
)
from pyro_mcp.manager import ExecOutcome, VMManager
from pyro_mcp.models import (
    ExecResult,
    ReapResult,
    TaskDeleteResult,
    TaskExecResult,
    TaskInfo,
    WorkspaceSeed,
)
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress
from pyro_mcp.state import (
    ProcessId,
    read_json,
    record_lock,
    remove_orphan_locks,
    write_json_atomic,
)
from pyro_mcp.vmm import host_compat
from pyro_mcp.vmm.base import VMPaths
from pyro_mcp.workspace.archive import SeedLimits
from pyro_mcp.workspace.seed import build_workspace_image, resolve_source, seed_tree

HOST_COMPAT = host_compat.NAME
#: Backends whose /workspace is a host folder (bind mount) rather than a disk image.
DIRECTORY_BACKENDS = frozenset({"gvisor", HOST_COMPAT})
WORKSPACE_MOUNT = MountSpec("/dev/vdb", limits.TASK_WORKSPACE, "ext4", readonly=False)
INCOMPLETE_GRACE_S = 60.0


def execution_mode(backend: str) -> str:
    """What a result's ``execution_mode`` says for ``backend`` (see pyro_mcp.vmm)."""
    from pyro_mcp import vmm

    if backend == HOST_COMPAT:
        return host_compat.EXECUTION_MODE
    modes = getattr(vmm, "EXECUTION_MODES", {})
    return str(modes.get(backend, "microvm"))


class TaskManager:
    """Create, use and remove tasks. Shares its state root with a :class:`VMManager`."""

    def __init__(self, vms: VMManager, *, allow_host_compat: bool = False) -> None:
        self.vms = vms
        self.tasks_dir = vms.state_root / "tasks"
        self.allow_host_compat = allow_host_compat

    # -- helpers ------------------------------------------------------------
    def _task_dir(self, task_id: str) -> Path:
        return self.tasks_dir / limits.check_task_id(task_id)

    def _lock(self, task_id: str) -> contextlib.AbstractContextManager[None]:
        task_dir = self._task_dir(task_id)
        return record_lock(self.tasks_dir / f".{task_id}.lock", task_dir)

    def _load(self, task_id: str) -> dict[str, Any]:
        task_dir = self._task_dir(task_id)
        try:
            return read_json(task_dir / "task.json")
        except FileNotFoundError:
            raise NotFoundError(
                f"task {task_id} does not exist (it may have been deleted, or reaped after "
                "its TTL)",
                hint="list tasks with `pyro task list`",
            ) from None

    def _save(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.tasks_dir / record["task_id"] / "task.json", record)

    def _choose_backend(self) -> str:
        """``host_compat`` only when asked for by name, or allowed and no VM works."""
        name = self.vms._backend_name
        if name == HOST_COMPAT:
            host_compat.require()
            return HOST_COMPAT
        try:
            backend, _ = self.vms.resolve_backend()
        except BackendUnavailableError:
            if self.allow_host_compat:
                host_compat.require()
                return HOST_COMPAT
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
        progress: ProgressFn = no_progress,
    ) -> TaskInfo:
        """Make a task, seed /workspace from ``source_path`` and start it.

        Everything is validated before anything is written; a failure at any
        step removes whatever was made.
        """
        from pyro_mcp.environments.catalog import get_spec

        spec = get_spec(environment)
        limits.check_vcpu_count(vcpu_count)
        limits.check_mem_mib(mem_mib)
        limits.check_ttl(ttl_seconds)
        limits.check_network(network)
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

        try:
            paths.ensure_private_dir(self.tasks_dir)
        except OSError as exc:
            raise StateError(
                f"cannot create the task state folder {self.tasks_dir}: {exc.strerror}",
                hint="set PYRO_STATE_DIR to a writable folder",
            ) from exc
        task_id = f"task-{secrets.token_hex(6)}"
        task_dir = self.tasks_dir / task_id
        now = time.time()
        creator = ProcessId.of(os.getpid())
        record: dict[str, Any] = {
            "task_id": task_id,
            "environment": spec.name,
            "environment_version": spec.version,
            "status": "creating",
            "creator": creator.to_dict() if creator else None,
            "backend": backend,
            "acceleration": "none" if backend == HOST_COMPAT else None,
            "execution_mode": execution_mode(backend),
            "vm_id": None,
            "boot": None,
            "vcpu_count": vcpu_count,
            "mem_mib": mem_mib,
            "network": network,
            "ttl_seconds": ttl_seconds,
            "created_at": now,
            "expires_at": now + ttl_seconds,
            "workspace_seed": None,
            "hostfs": None,
            "detail": None,
        }
        task_dir.mkdir(mode=0o700)
        try:
            with self._lock(task_id):
                self._save(record)
                staging = task_dir / "workspace"
                staging.mkdir(mode=0o700)
                progress(ProgressEvent("seed", "preparing /workspace"))
                seed = seed_tree(staging, source_path, exclude=exclude, seed_limits=seed_limits)
                record["workspace_seed"] = seed.to_dict()
                if seed.mode != "empty":
                    progress(
                        ProgressEvent(
                            "seed",
                            f"seeded {seed.entry_count} entries, {seed.bytes_written} bytes "
                            f"in {seed.seed_ms} ms",
                        )
                    )
                if backend in DIRECTORY_BACKENDS:
                    os.chmod(staging, 0o755)  # noqa: S103 - /workspace's mode; parent is 0700
                if backend == HOST_COMPAT:
                    env = self.vms.store.ensure(spec.name, progress=progress)
                    record["environment_version"] = env.version
                    record["hostfs"] = str(host_compat.ensure_rootfs_tree(env, progress))
                    record["status"] = "ready"
                elif backend in DIRECTORY_BACKENDS:
                    self._start_vm(record, progress)
                    record["status"] = "running"
                else:
                    build_workspace_image(
                        staging, task_dir / "workspace.img", entry_count=seed.entry_count
                    )
                    shutil.rmtree(staging)
                    self._start_vm(record, progress)
                    record["status"] = "running"
                record["creator"] = None
                self._save(record)
        except BaseException:
            self._discard(record)
            with contextlib.suppress(OSError):  # released above; nobody else knows the id
                (self.tasks_dir / f".{task_id}.lock").unlink(missing_ok=True)
            raise
        return self._info(record)

    def _discard(self, record: dict[str, Any]) -> None:
        """Remove a task's VM and folder (failed create, delete, reap)."""
        vm_id = record.get("vm_id")
        if vm_id:
            with contextlib.suppress(NotFoundError, InvalidInputError, OSError, StateError):
                self.vms.delete(vm_id, reason="task removed")
        shutil.rmtree(self.tasks_dir / record["task_id"], ignore_errors=True)

    def _start_vm(self, record: dict[str, Any], progress: ProgressFn) -> None:
        """Create and boot a VM for the task on its workspace image (lock held)."""
        remaining = math.ceil(record["expires_at"] - time.time())
        if remaining <= 0:
            raise VMStateError(
                f"task {record['task_id']} has outlived its TTL", hint="create a new task"
            )
        # Always the task's own backend (a restart must not switch it).
        vms = VMManager(
            state_root=self.vms.state_root, store=self.vms.store, backend=record["backend"]
        )
        on_disk = record["backend"] not in DIRECTORY_BACKENDS
        info = vms.create(
            record["environment"],
            vcpu_count=record["vcpu_count"],
            mem_mib=record["mem_mib"],
            # The task's reaper removes it at the task's TTL in any case.
            ttl_seconds=max(remaining, limits.MIN_TTL_SECONDS),
            network=record["network"],
            mounts=[WORKSPACE_MOUNT] if on_disk else [],
        )
        record["vm_id"] = info.vm_id
        record["acceleration"] = info.acceleration
        self._save(record)
        task_dir = self.tasks_dir / record["task_id"]
        vm_dir = vms.vms_dir / info.vm_id
        if on_disk:
            disk = VMPaths(vm_dir).workspace
            try:
                os.link(task_dir / "workspace.img", disk)
            except OSError:
                os.symlink(task_dir / "workspace.img", disk)
        else:
            os.symlink(task_dir / "workspace", vm_dir / "workspace")
        started = vms.start(info.vm_id, progress=progress)
        record["boot"] = started.boot
        record["environment_version"] = started.environment_version

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
        record = self._load(task_id)
        if record["status"] == "creating":
            raise VMStateError(
                f"task {task_id} is still being created", hint="wait for task create to finish"
            )
        if time.time() >= float(record["expires_at"]):
            raise VMStateError(
                f"task {task_id} has outlived its TTL and is being removed",
                hint="create a new task",
            )
        if record["backend"] == HOST_COMPAT:
            outcome = self._exec_host_compat(record, cmd, opts, progress)
        else:
            record = self._ensure_vm(task_id, record, progress)
            outcome = self.vms.exec(
                record["vm_id"],
                cmd,
                opts,
                default_cwd=limits.TASK_WORKSPACE,
                progress=progress,
            )
        return TaskExecResult(
            task_id=task_id,
            vm_id=record.get("vm_id"),
            environment=record["environment"],
            environment_version=record["environment_version"],
            command=cmd,
            stdout=outcome.stdout.decode("utf-8", "replace"),
            stderr=outcome.stderr.decode("utf-8", "replace"),
            stdout_truncated=outcome.stdout_truncated,
            stderr_truncated=outcome.stderr_truncated,
            exit_code=outcome.exit_code,
            timed_out=outcome.timed_out,
            duration_ms=outcome.duration_ms,
            execution_mode=record["execution_mode"],
            backend=record["backend"],
            acceleration=record["acceleration"] or "none",
            boot=record.get("boot"),
        )

    def _vm_running(self, record: dict[str, Any]) -> bool:
        vm_id = record.get("vm_id")
        if not vm_id:
            return False
        try:
            return self.vms.status(vm_id).status == "running"
        except (NotFoundError, StateError):
            return False

    def _ensure_vm(
        self, task_id: str, record: dict[str, Any], progress: ProgressFn
    ) -> dict[str, Any]:
        """The task's record with a running VM, starting a new one if it is gone."""
        if self._vm_running(record):
            return record
        with self._lock(task_id):
            record = self._load(task_id)
            if self._vm_running(record):
                return record
            old = record.get("vm_id")
            reason = self._vm_gone_reason(old)
            if old:
                with contextlib.suppress(NotFoundError, InvalidInputError, StateError):
                    self.vms.delete(old, reason="task VM restart")
            progress(ProgressEvent("boot", f"task {task_id}: its VM {reason}; starting a new one"))
            record["vm_id"] = None
            try:
                self._start_vm(record, progress)
            except PyroError as exc:
                record["detail"] = f"starting a new VM failed: {exc.message}"
                self._save(record)
                raise
            record["detail"] = (
                f"VM restarted: the previous one {reason}; /workspace was kept, the rest of "
                "the guest filesystem started fresh"
            )
            self._save(record)
            return record

    def _vm_gone_reason(self, vm_id: str | None) -> str:
        if not vm_id:
            return "was never started"
        try:
            info = self.vms.status(vm_id)
        except (NotFoundError, StateError):
            return "no longer exists"
        return f"stopped ({info.detail or info.status})"

    def _exec_host_compat(
        self,
        record: dict[str, Any],
        cmd: str | list[str],
        opts: ExecOptions,
        progress: ProgressFn,
    ) -> ExecOutcome:
        rootfs = Path(record["hostfs"] or "")
        if not (rootfs / "usr").is_dir():
            env = self.vms.store.ensure(record["environment"], progress=progress)
            rootfs = host_compat.ensure_rootfs_tree(env, progress)
        data = host_compat.run(
            rootfs,
            self.tasks_dir / record["task_id"] / "workspace",
            build_argv(cmd, opts.env),
            cwd=opts.cwd_or(limits.TASK_WORKSPACE),
            env=dict(item.split("=", 1) for item in opts.guest_env()),
            timeout_seconds=opts.timeout_seconds,
            stdout_cap=opts.stdout_cap,
            stderr_cap=opts.stderr_cap,
        )
        return ExecOutcome(**data)

    # -- queries ------------------------------------------------------------
    def _info(self, record: dict[str, Any]) -> TaskInfo:
        status = record["status"]
        detail = record.get("detail")
        if status in ("running", "stopped") and record["backend"] != HOST_COMPAT:
            if self._vm_running(record):
                status = "running"
            else:
                status = "stopped"
                detail = (
                    f"its VM {self._vm_gone_reason(record.get('vm_id'))}; the next exec starts "
                    "a new one on the same /workspace"
                )
        seed = record.get("workspace_seed") or {
            "mode": "empty",
            "source_path": None,
            "destination": limits.TASK_WORKSPACE,
            "entry_count": 0,
            "bytes_written": 0,
            "sha256": None,
        }
        return TaskInfo(
            task_id=record["task_id"],
            environment=record["environment"],
            environment_version=record["environment_version"],
            status=status,
            execution_mode=record["execution_mode"],
            backend=record["backend"],
            acceleration=record.get("acceleration") or "none",
            vm_id=record.get("vm_id"),
            vcpu_count=record["vcpu_count"],
            mem_mib=record["mem_mib"],
            network=record["network"],
            ttl_seconds=record["ttl_seconds"],
            created_at=record["created_at"],
            expires_at=record["expires_at"],
            workspace_path=limits.TASK_WORKSPACE,
            workspace_seed=WorkspaceSeed(**seed),
            boot=record.get("boot"),
            detail=detail,
        )

    def status(self, task_id: str) -> TaskInfo:
        return self._info(self._load(task_id))

    def _task_dirs(self) -> list[Path]:
        try:
            return sorted(
                d for d in self.tasks_dir.iterdir() if d.is_dir() and d.name.startswith("task-")
            )
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(
                f"cannot read the task state folder {self.tasks_dir}: {exc.strerror}",
                hint="check its permissions, or set PYRO_STATE_DIR",
            ) from exc

    def list(self) -> list[TaskInfo]:
        out = []
        for task_dir in self._task_dirs():
            with contextlib.suppress(FileNotFoundError, StateError, KeyError, InvalidInputError):
                out.append(self._info(read_json(task_dir / "task.json")))
        return out

    # -- removal ------------------------------------------------------------
    def delete(self, task_id: str) -> TaskDeleteResult:
        """Stop the task's VM and remove it with its workspace. A second delete
        of the same task is a NotFoundError."""
        task_dir = self._task_dir(task_id)
        with self._lock(task_id):
            try:
                record: dict[str, Any] | None = read_json(task_dir / "task.json")
            except FileNotFoundError:
                if not task_dir.exists():
                    raise NotFoundError(
                        f"task {task_id} does not exist (it may have been deleted already, "
                        "or reaped after its TTL)",
                        hint="list tasks with `pyro task list`",
                    ) from None
                record = None
            except StateError:
                record = None
            self._discard(record or {"task_id": task_id})
        return TaskDeleteResult(task_id=task_id, deleted=True)

    def reap_expired(self) -> ReapResult:
        """Remove tasks past their TTL, creates interrupted by a dead process, and
        folders without a record."""
        reasons: dict[str, str] = {}
        now = time.time()
        for task_dir in self._task_dirs():
            task_id = task_dir.name
            try:
                record = read_json(task_dir / "task.json")
            except FileNotFoundError:
                with contextlib.suppress(OSError):
                    if now - task_dir.stat().st_mtime > INCOMPLETE_GRACE_S:
                        shutil.rmtree(task_dir, ignore_errors=True)
                        reasons[task_id] = "incomplete"
                continue
            except StateError:
                continue
            reason = None
            creator = ProcessId.from_dict(record.get("creator"))
            if now >= float(record.get("expires_at", 0)):
                reason = "ttl_expired"
            elif record.get("status") == "creating" and (creator is None or not creator.alive()):
                reason = "create_interrupted"
            if reason is None:
                continue
            with contextlib.suppress(NotFoundError, InvalidInputError):
                self.delete(task_id)
                reasons[task_id] = reason
        remove_orphan_locks(self.tasks_dir, "task-")
        return ReapResult(reaped=sorted(reasons), reasons=reasons)

    # -- one-shot in host_compat ---------------------------------------------
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
        )

    def selects_host_compat(self) -> bool:
        """Whether a one-shot run should go to host_compat (asked for by name, or
        allowed and no VM backend works)."""
        if self.vms._backend_name == HOST_COMPAT:
            return True
        if not self.allow_host_compat:
            return False
        try:
            self.vms.resolve_backend()
        except BackendUnavailableError:
            return True
        return False
