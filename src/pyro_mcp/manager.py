"""VM lifecycle: create, start, exec, stop, delete, list, reap.

Each VM is one folder under ``<state>/vms/<vm_id>`` holding its typed record
(``vm.json``, see :mod:`pyro_mcp.records`), its launch record, its disks and
the sockets of its supervisor. Lifecycle changes hold the VM's file lock;
execs go straight to the supervisor (:mod:`pyro_mcp.control`), which runs
several at once. Nothing here names a backend: what differs between backends
lives behind :mod:`pyro_mcp.vmm`.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from pyro_mcp import control, limits, paths, supervision
from pyro_mcp.commands import VM_DEFAULT_CWD, ExecOptions, build_argv
from pyro_mcp.errors import (
    BackendUnavailableError,
    GuestProtocolError,
    InvalidInputError,
    LimitError,
    NotFoundError,
    PyroError,
    StateError,
    VMStateError,
)
from pyro_mcp.models import BootKind, CleanupInfo, ExecResult, VMInfo
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress
from pyro_mcp.records import RecordStore, VMConfig, VMRecord, VMRuntime, state_dir_error
from pyro_mcp.state import ProcessId, read_json
from pyro_mcp.vmm import BackendChoice, execution_mode, get_backend
from pyro_mcp.vmm.base import LaunchPlan, VMPaths

if TYPE_CHECKING:
    from pyro_mcp.guest.channel import AgentChannel

DEFAULT_BOOT_TIMEOUT = 90.0
HOST_COMPAT_OPT_IN = (
    "or, without a VM, opt in to running on this host confined by bubblewrap (weaker "
    "isolation): `pyro --backend host_compat ...` (SDK: Pyro(allow_host_compat=True))"
)


@dataclass(frozen=True)
class ExecOutcome:
    """What came back from one command, before it becomes a typed result."""

    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    duration_ms: int

    def result_fields(self) -> dict[str, Any]:
        """The output fields every :class:`~pyro_mcp.models.CommandResult` has (the
        bytes decoded as UTF-8 with replacement characters)."""
        return {
            "stdout": self.stdout.decode("utf-8", "replace"),
            "stderr": self.stderr.decode("utf-8", "replace"),
            "stdout_truncated": self.stdout_truncated,
            "stderr_truncated": self.stderr_truncated,
            "exit_code": self.exit_code,
            "timed_out": self.timed_out,
            "duration_ms": self.duration_ms,
        }


class VMManager:
    def __init__(
        self,
        *,
        state_root: Path | None = None,
        store: Any | None = None,
        backend: str | None = None,
    ) -> None:
        self.state_root = state_root or paths.state_dir()
        self.vms_dir = self.state_root / "vms"
        self.records: RecordStore[VMRecord] = RecordStore(
            self.vms_dir,
            kind="VM",
            filename="vm.json",
            decode=VMRecord.from_dict,
            check_id=limits.check_vm_id,
            list_hints={
                "cli": "list VMs with `pyro vm list`",
                "sdk": "list VMs with list_vms()",
                "mcp": "call vm_list to see the VMs",
            },
        )
        self._store = store
        self._backend_name = backend or os.environ.get("PYRO_BACKEND") or "auto"

    # -- helpers ------------------------------------------------------------
    @property
    def store(self) -> Any:
        if self._store is None:
            from pyro_mcp.environments.store import EnvironmentStore

            self._store = EnvironmentStore()
        return self._store

    def resolve_backend(self) -> tuple[str, str]:
        """(backend name, acceleration) after automatic selection."""
        choice = self.backend_choice()
        return choice.name, choice.acceleration

    def backend_choice(self) -> BackendChoice:
        """The backend new VMs get, its acceleration, and why (``pyro doctor`` shows it)."""
        from pyro_mcp.vmm import BACKEND_NAMES, SANDBOX_BACKEND_NAMES, choose_auto

        name = self._backend_name
        if name in SANDBOX_BACKEND_NAMES:
            raise InvalidInputError(
                "the host_compat backend runs tasks and one-shot runs only, not VMs",
                hint="use `pyro task ...` or `pyro run`, or pick a VM backend (auto, qemu)",
            )
        if name != "auto" and name not in BACKEND_NAMES:
            raise InvalidInputError(
                f"unknown backend {name!r}",
                hint=f"choose one of: auto, {', '.join(BACKEND_NAMES)}, host_compat",
            )
        if name == "auto":
            try:
                return choose_auto()
            except BackendUnavailableError as exc:
                raise BackendUnavailableError(
                    exc.message, hint=f"{exc.hint}; {HOST_COMPAT_OPT_IN}"
                ) from None
        probe = get_backend(name).probe()
        if not probe.available:
            raise BackendUnavailableError(
                f"backend {name} is not usable here: {probe.reason}",
                hint="; ".join([*probe.advice, HOST_COMPAT_OPT_IN])
                if probe.advice
                else f"run `pyro doctor` for details; {HOST_COMPAT_OPT_IN}",
            )
        return BackendChoice(name, probe.acceleration or "tcg", f"requested: {probe.reason}")

    # -- lifecycle ----------------------------------------------------------
    def create(
        self,
        environment: str,
        *,
        vcpu_count: int = limits.DEFAULT_VCPU_COUNT,
        mem_mib: int = limits.DEFAULT_MEM_MIB,
        ttl_seconds: int = limits.DEFAULT_TTL_SECONDS,
        network: bool = False,
        owner_pid: int | None = None,
        mounts: Sequence[control.MountSpec | Mapping[str, Any]] = (),
    ) -> VMInfo:
        """Define a VM (no boot yet). Validates everything before writing anything."""
        from pyro_mcp.environments.catalog import get_spec

        spec = get_spec(environment)
        limits.check_vcpu_count(vcpu_count)
        limits.check_mem_mib(mem_mib)
        limits.check_ttl(ttl_seconds)
        limits.check_network(network)
        backend, accel = self.resolve_backend()
        owner = ProcessId.of(owner_pid) if owner_pid is not None else None
        vm_id, _ = self.records.create_folder()
        now = time.time()
        record = VMRecord(
            VMConfig(
                vm_id=vm_id,
                environment=spec.name,
                vcpu_count=vcpu_count,
                mem_mib=mem_mib,
                network=network,
                ttl_seconds=ttl_seconds,
                created_at=now,
                expires_at=now + ttl_seconds,
                backend=backend,
                acceleration=accel,
                owner=owner,
                mounts=tuple(
                    m if isinstance(m, control.MountSpec) else control.MountSpec.from_dict(dict(m))
                    for m in mounts
                ),
            ),
            VMRuntime(environment_version=spec.version),
        )
        try:
            self.records.save(record)
        except BaseException:
            self.records.remove(vm_id)
            raise
        return self._info(record)

    def start(self, vm_id: str, progress: ProgressFn = no_progress) -> VMInfo:
        with self.records.lock(vm_id):
            record = self.records.load(vm_id)
            if record.runtime.status == "running" and self._supervisor_alive(record):
                raise VMStateError(f"VM {vm_id} is already running")
            if time.time() >= record.config.expires_at:
                raise VMStateError(
                    f"VM {vm_id} has outlived its TTL", hint="delete it and create a new one"
                )
            launch, version = self._prepare_launch(record, progress)
            with self._vm_slot(vm_id):
                record = record.with_runtime(
                    status="starting",
                    starter=ProcessId.of(os.getpid()),
                    environment_version=version,
                )
                self.records.save(record)
            try:
                try:
                    progress(
                        ProgressEvent("boot", f"booting {record.config.environment} ({vm_id})")
                    )
                    ready = supervision.spawn(self.records.folder(vm_id), launch, progress)
                except OSError as exc:
                    raise state_dir_error(self.vms_dir / vm_id, exc) from exc
            except PyroError as exc:
                with contextlib.suppress(StateError):
                    self.records.save(record.with_runtime(status="failed", detail=exc.message))
                raise
            record = record.with_runtime(
                status="running",
                boot=ready.boot,
                supervisor=ready.supervisor,
                vmm=ready.vmm,
                detail=None,
            )
            self.records.save(record)
            return self._info(record)

    @contextlib.contextmanager
    def _vm_slot(self, vm_id: str) -> Iterator[None]:
        """Enforce the cap on running VMs (``limits.max_vms``) across processes: the
        count and the caller's switch to "starting" happen under one short lock."""
        cap = limits.max_vms()
        with FileLock(str(self.vms_dir / ".start.lock")):
            running = self.running_count(exclude=vm_id)
            if running >= cap:
                raise LimitError(
                    f"{running} VMs are already running in {self.state_root} (the limit is {cap})",
                    hint=f"delete VMs or tasks you no longer need (`pyro vm list`), or raise "
                    f"the limit with {limits.MAX_VMS_ENV}=<n>",
                    details={"running": running, "limit": cap},
                )
            yield

    def running_count(self, exclude: str | None = None) -> int:
        """VMs of this state folder that are running or being started by a live process."""
        count = 0
        for record in self.records.records():
            if record.record_id == exclude:
                continue
            runtime = record.runtime
            if runtime.status not in ("running", "starting"):
                continue
            starter = runtime.starter
            if self._supervisor_alive(record) or (
                runtime.status == "starting" and starter is not None and starter.alive()
            ):
                count += 1
        return count

    def _plan(
        self,
        backend: str,
        acceleration: str,
        environment: str,
        *,
        vcpu_count: int,
        mem_mib: int,
        network: bool,
        mounts: Sequence[control.MountSpec] = (),
        vm_dir: Path | None = None,
        progress: ProgressFn,
    ) -> tuple[Any, LaunchPlan]:
        """(the installed environment, what the backend prepared to start it)."""
        env = self.store.ensure(environment, progress=progress)
        plan = get_backend(backend).prepare(
            env,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            network=network,
            acceleration=acceleration,
            mounts=[m.to_dict() for m in mounts],
            paths=VMPaths(vm_dir) if vm_dir is not None else None,
            progress=progress,
        )
        return env, plan

    def _prepare_launch(self, record: VMRecord, progress: ProgressFn) -> tuple[control.Launch, str]:
        """The launch record for ``record`` and the environment version it boots."""
        config = record.config
        env, plan = self._plan(
            config.backend,
            config.acceleration,
            config.environment,
            vcpu_count=config.vcpu_count,
            mem_mib=config.mem_mib,
            network=config.network,
            mounts=config.mounts,
            vm_dir=self.vms_dir / config.vm_id,
            progress=progress,
        )
        launch = control.Launch.from_plan(
            config.backend,
            plan,
            expires_at=config.expires_at,
            owner=config.owner,
            boot_timeout=DEFAULT_BOOT_TIMEOUT,
        )
        return launch, env.version

    def prepare(
        self,
        environment: str,
        *,
        vcpu_count: int = limits.DEFAULT_VCPU_COUNT,
        mem_mib: int = limits.DEFAULT_MEM_MIB,
        progress: ProgressFn = no_progress,
    ) -> str | None:
        """Do ahead what a first run of this configuration needs: the environment and
        whatever the backend prepares (agent, initramfs or unpacked tree, warm-start
        snapshot). Returns the snapshot's folder, or None where the backend has none."""
        limits.check_vcpu_count(vcpu_count)
        limits.check_mem_mib(mem_mib)
        backend, accel = self.resolve_backend()
        _, plan = self._plan(
            backend,
            accel,
            environment,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            network=False,
            progress=progress,
        )
        return str(plan.restore.directory) if plan.restore else None

    def exec(
        self,
        vm_id: str,
        command: str | Sequence[str],
        options: ExecOptions | None = None,
        *,
        default_cwd: str = VM_DEFAULT_CWD,
        progress: ProgressFn = no_progress,
    ) -> ExecOutcome:
        """Run one command in a running VM. ``options`` come validated
        (:meth:`ExecOptions.checked`); their ``cwd=None`` means ``default_cwd``."""
        cmd = limits.check_command(command)
        opts = options or ExecOptions()
        record = self.records.load(vm_id)
        if record.runtime.status != "running" or not self._supervisor_alive(record):
            raise VMStateError(
                f"VM {vm_id} is not running (status: {self._effective_status(record)[0]})",
                hint="start it first, or use run_in_vm for a one-shot command",
            )
        request = control.ExecRequest(
            argv=tuple(build_argv(cmd, opts.env)),
            cwd=opts.cwd_or(default_cwd),
            env=opts.guest_env(),
            timeout_ms=opts.timeout_seconds * 1000,
            stdout_cap=opts.stdout_cap,
            stderr_cap=opts.stderr_cap,
            stdin=opts.stdin is not None,
        )
        stdin = opts.stdin.chunks() if opts.stdin is not None else None
        for event in supervision.request(self.records.folder(vm_id), request, stdin):
            if isinstance(event, control.Heartbeat):
                elapsed = event.elapsed_ms / 1000
                progress(ProgressEvent("exec", f"command running ({elapsed:.0f} s)", elapsed, None))
                continue
            if isinstance(event, control.Failed):
                error = event.error
                if isinstance(error, GuestProtocolError):
                    error = _ttl_error(record) or error
                raise error
            if isinstance(event, control.ExecDone):
                return ExecOutcome(
                    exit_code=event.exit_code,
                    stdout=event.stdout,
                    stderr=event.stderr,
                    stdout_truncated=event.stdout_truncated,
                    stderr_truncated=event.stderr_truncated,
                    timed_out=event.timed_out,
                    duration_ms=event.duration_ms,
                )
            raise VMStateError(f"VM {vm_id}'s supervisor answered {type(event).__name__}")
        raise _ttl_error(record) or GuestProtocolError(
            f"VM {vm_id} stopped while running the command"
        )

    @contextlib.contextmanager
    def files(self, vm_id: str) -> Iterator[AgentChannel]:
        """A channel to a running VM's guest agent for file operations (see
        :func:`pyro_mcp.supervision.tunnel`)."""
        record = self.records.load(vm_id)
        if record.runtime.status != "running" or not self._supervisor_alive(record):
            raise VMStateError(
                f"VM {vm_id} is not running (status: {self._effective_status(record)[0]})",
                hint="start it first",
            )
        with supervision.tunnel(self.records.folder(vm_id)) as channel:
            yield channel

    def stop(self, vm_id: str) -> VMInfo:
        with self.records.lock(vm_id):
            record = self.records.load(vm_id)
            self._stop(record)
            record = record.with_runtime(status="stopped", detail="stopped by request")
            self.records.save(record)
            return self._info(record)

    def delete(self, vm_id: str) -> None:
        """Stop the VM (if it runs) and remove its folder; a missing VM is a NotFoundError."""
        vm_dir = self.records.folder(vm_id)
        with self.records.lock(vm_id):
            try:
                record: VMRecord | None = self.records.load(vm_id)
            except NotFoundError:
                if not vm_dir.exists():
                    raise self.records.not_found(vm_id) from None
                record = None
            except StateError:
                record = None
            if record is not None:
                # "deleted": the supervisor leaves the folder alone, it is removed here.
                self._stop(record, wait_exit=False, reason="deleted")
            self.records.remove(vm_id)

    def _stop(self, record: VMRecord, *, wait_exit: bool = True, reason: str = "stopped") -> None:
        supervision.stop(
            self.records.folder(record.record_id),
            record.runtime.supervisor,
            record.runtime.vmm,
            wait_exit=wait_exit,
            reason=reason,
        )

    # -- queries ------------------------------------------------------------
    def _supervisor_alive(self, record: VMRecord) -> bool:
        sup = record.runtime.supervisor
        return sup is not None and sup.alive()

    def _effective_status(self, record: VMRecord) -> tuple[str, str | None]:
        status = record.runtime.status
        if status in ("running", "starting") and not self._supervisor_alive(record):
            reason = None
            with contextlib.suppress(FileNotFoundError, StateError, InvalidInputError):
                exit_file = self.records.folder(record.record_id) / "exit.json"
                reason = read_json(exit_file).get("reason")
            return "stopped", f"the VM exited ({reason or 'supervisor gone'})"
        return status, record.runtime.detail

    def _info(self, record: VMRecord) -> VMInfo:
        status, detail = self._effective_status(record)
        config, runtime = record.config, record.runtime
        return VMInfo(
            vm_id=config.vm_id,
            environment=config.environment,
            environment_version=runtime.environment_version,
            status=status,  # type: ignore[arg-type]
            vcpu_count=config.vcpu_count,
            mem_mib=config.mem_mib,
            network=config.network,
            ttl_seconds=config.ttl_seconds,
            created_at=config.created_at,
            expires_at=config.expires_at,
            backend=config.backend,
            acceleration=config.acceleration,
            boot=runtime.boot,  # type: ignore[arg-type]
            detail=detail,
        )

    def status(self, vm_id: str) -> VMInfo:
        return self._info(self.records.load(vm_id))

    def list(self) -> builtins.list[VMInfo]:
        return [self._info(record) for record in self.records.records()]

    def reap_expired(self) -> dict[str, str]:
        """Delete VMs past their TTL, ephemeral VMs whose owner died, and debris.
        Returns the ids removed, with why."""

        def why(record: VMRecord, now: float) -> str | None:
            if now >= record.config.expires_at:
                return "ttl_expired"
            owner = record.config.owner
            if owner is not None and not owner.alive():
                return "owner_exited"
            return None

        return self.records.reap(why, lambda vm_id, _reason: self.delete(vm_id))

    # -- one-shot -----------------------------------------------------------
    def run(
        self,
        environment: str,
        command: str | Sequence[str],
        options: ExecOptions | None = None,
        *,
        vcpu_count: int = limits.DEFAULT_VCPU_COUNT,
        mem_mib: int = limits.DEFAULT_MEM_MIB,
        ttl_seconds: int = limits.DEFAULT_TTL_SECONDS,
        network: bool = False,
        vm: VMInfo | None = None,
        progress: ProgressFn = no_progress,
    ) -> ExecResult:
        """Create, start, exec, and always delete — even on error or Ctrl-C.

        ``vm`` is an already started VM of this configuration (from a warm pool)
        to use instead of creating one; it is deleted all the same.
        """
        cmd = limits.check_command(command)
        limits.check_ttl(ttl_seconds)
        info = vm or self.create(
            environment,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            ttl_seconds=ttl_seconds,
            network=network,
            owner_pid=os.getpid(),
        )
        try:
            started = vm or self.start(info.vm_id, progress=progress)
            outcome = self.exec(info.vm_id, cmd, options, progress=progress)
        finally:
            with contextlib.suppress(NotFoundError):
                self.delete(info.vm_id)
        return self.result(started, cmd, outcome, deleted=True, reason="run finished")

    def result(
        self,
        info: VMInfo,
        command: str | builtins.list[str],
        outcome: ExecOutcome,
        *,
        deleted: bool | None,
        reason: str = "",
    ) -> ExecResult:
        boot: BootKind = info.boot or "cold"
        return ExecResult(
            vm_id=info.vm_id,
            environment=info.environment,
            environment_version=info.environment_version,
            command=command,
            **outcome.result_fields(),
            execution_mode=execution_mode(info.backend),
            backend=info.backend,
            acceleration=info.acceleration,
            boot=boot,
            cleanup=None if deleted is None else CleanupInfo(deleted=deleted, reason=reason),
        )


def _ttl_error(record: VMRecord) -> VMStateError | None:
    """The error to report when a VM vanished mid-command because its TTL ran out."""
    if time.time() < record.config.expires_at:
        return None
    return VMStateError(
        f"VM {record.record_id} reached its TTL ({record.config.ttl_seconds} s) while the "
        "command ran, and was deleted",
        hint="create the VM with a larger ttl_seconds, or run shorter commands",
    )
