"""The Python SDK: ``from pyro_mcp import Pyro``.

    pyro = Pyro()
    result = pyro.run_in_vm("debian:12", "uname -a")
    print(result.stdout, result.exit_code)

Every method validates its arguments and raises a :class:`pyro_mcp.PyroError`
subclass with a message and hint; a failing command is a normal result.
Wherever a method takes a ``task_id``, the task's name or a unique prefix of its id
(``task-3fa`` or ``3fa``) does as well.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Literal

from pyro_mcp import limits
from pyro_mcp.commands import ExecOptions, OutputFn, StdinSource
from pyro_mcp.errors import PyroError, VMStateError, hints
from pyro_mcp.manager import VMManager
from pyro_mcp.models import (
    ExecResult,
    NetworkInfo,
    ReapResult,
    TaskDeleteResult,
    TaskExecResult,
    TaskInfo,
    TaskPruneResult,
    TaskResetResult,
    VMInfo,
)
from pyro_mcp.progress import ProgressFn, no_progress
from pyro_mcp.tasks import TaskManager

if TYPE_CHECKING:
    from pyro_mcp.config import Settings
    from pyro_mcp.handle import Task
    from pyro_mcp.pool import WarmPool
    from pyro_mcp.tasks.files import TaskFiles
    from pyro_mcp.workspace.archive import SeedLimits
    from pyro_mcp.workspace.diff import DiffResult
    from pyro_mcp.workspace.export import ExportResult
    from pyro_mcp.workspace.files import (
        FileEditResult,
        FileListResult,
        FileReadResult,
        FileWriteResult,
    )


class Pyro:
    """Entry point of the SDK. Cheap to create; reaps leftovers of dead processes."""

    def __init__(
        self,
        *,
        backend: str | None = None,
        state_dir: str | Path | None = None,
        progress: ProgressFn = no_progress,
        reap: bool = True,
        pool_size: int | None = None,
        pool_environment: str | None = None,
        allow_host_compat: bool = False,
    ) -> None:
        """``pool_size`` > 0 keeps that many VMs of ``pool_environment`` (default size)
        restored and warmed up in the background, for this object's one-shot runs.

        ``allow_host_compat=True`` (or ``backend="host_compat"``) opts in to running
        tasks and one-shot runs on the host, confined by bubblewrap, when no VM
        backend works; results then say ``execution_mode: "host_compat"``.

        ``backend``, ``pool_size`` and ``pool_environment`` left as None come from
        the environment variables, then the config file, then the built-ins (0 and
        "debian:12"); see docs/config.md and :attr:`settings`.

        Raises:
            InvalidInputError: a bad ``state_dir``, ``backend``, ``pool_size`` or
                ``pool_environment``, or a bad setting in the ``PYRO_*`` environment
                variables or the config file.
            NotFoundError: ``pool_environment`` is not in the catalog (with ``pool_size`` > 0).
        """
        from pyro_mcp import config

        root = limits.check_host_path("state_dir", state_dir) if state_dir is not None else None
        self._settings = settings = config.load()
        if backend is None:
            backend = settings.backend
        if pool_environment is None:
            pool_environment = settings.environment
        pool_size = limits.check_int(
            "pool_size", settings.pool_size if pool_size is None else pool_size, 0, 8
        )
        self._manager = VMManager(state_root=root, backend=backend)
        self._tasks = TaskManager(self._manager, allow_host_compat=allow_host_compat)
        self._progress = progress
        self._pool: WarmPool | None = None
        if reap:
            # Leftovers of dead processes; a reap that fails (e.g. a record of another
            # pyro-mcp version) must not stop this one from working.
            with contextlib.suppress(PyroError, OSError):
                self.reap_expired()
        if pool_size:
            from pyro_mcp.environments.catalog import get_spec
            from pyro_mcp.pool import PoolKey, WarmPool

            key = PoolKey(get_spec(pool_environment).name)
            self._pool = WarmPool(self._manager, key, pool_size)

    def close(self) -> None:
        """Tear down idle pool VMs now (they would die with this process anyway).

        Raises:
            Nothing: an idle pool VM that cannot be deleted is left to the reaper.
        """
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> Pyro:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def settings(self) -> Settings:
        """The defaults in effect for this object (env vars, config file, built-ins)."""
        return self._settings

    @property
    def pool(self) -> WarmPool | None:
        """The warm pool of one-shot VMs, if ``pool_size`` > 0."""
        return self._pool

    @property
    def manager(self) -> VMManager:
        """The VM manager under this object (internal; its API may change)."""
        return self._manager

    # -- environments -------------------------------------------------------
    def list_environments(self) -> list[dict[str, Any]]:
        """The catalog, with what is installed locally.

        Raises:
            Nothing: a damaged install is reported in its ``problems``, not raised.
        """
        from dataclasses import asdict

        return [asdict(info) for info in self._manager.store.list()]

    def pull_environment(self, environment: str, *, force: bool = False) -> dict[str, Any]:
        """Build (or re-verify) an environment, then take its warm-start snapshot for the
        default VM size, so the first run restores instead of booting cold.
        A snapshot that fails is not raised: the result's ``snapshot_error`` says why.

        Raises:
            InvalidInputError: ``environment`` is not a well-formed name.
            NotFoundError: ``environment`` is not in the catalog.
            EnvironmentBuildError: building or verifying it (or fetching its kernel) failed.
        """
        env = self._manager.store.pull(environment, progress=self._progress, force=force)
        data: dict[str, Any] = {"name": env.name, "version": env.version, "path": str(env.path)}
        try:
            data["snapshot"] = self._manager.prepare(env.name, progress=self._progress)
        except PyroError as exc:
            # The environment is fine; a run will say the same thing with its fix.
            data["snapshot"] = None
            data["snapshot_error"] = str(exc)
        return data

    def inspect_environment(self, environment: str, *, verify: bool = False) -> dict[str, Any]:
        """An environment's installed artifacts, their state (``verify`` re-hashes every
        file) and its warm-start snapshots in the cache (those taken of its installed
        root image; other environments' are left out).

        Raises:
            InvalidInputError: ``environment`` is not a well-formed name.
            NotFoundError: ``environment`` is not in the catalog (not installed is no error).
        """
        from dataclasses import asdict

        from pyro_mcp.vmm import list_snapshots

        info = asdict(self._manager.store.inspect(environment, verify=verify))
        folder = Path(info["path"]) if info["path"] else None
        info["snapshots"] = [
            snap
            for snap in list_snapshots()
            if folder is not None
            and snap.get("rootfs")
            and Path(str(snap["rootfs"])).parent == folder
        ]
        return info

    def prune_environments(self) -> list[str]:
        """Remove superseded or damaged installs, build leftovers, unpacked trees of
        images no longer installed, and stale snapshots. Returns what was removed.

        Raises:
            Nothing: no PyroError; a cache folder that cannot be changed surfaces as an OSError.
        """
        from pyro_mcp.vmm import prune_snapshots

        return [*self._manager.store.prune(), *prune_snapshots()]

    # -- one-shot -----------------------------------------------------------
    def run_in_vm(
        self,
        environment: str,
        command: str | Sequence[str],
        *,
        vcpu_count: int = limits.DEFAULT_VCPU_COUNT,
        mem_mib: int = limits.DEFAULT_MEM_MIB,
        timeout_seconds: int = limits.DEFAULT_TIMEOUT_SECONDS,
        ttl_seconds: int = limits.DEFAULT_TTL_SECONDS,
        network: bool = False,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdout_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stderr_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stdin: StdinSource = None,
        on_stdout: OutputFn | None = None,
        on_stderr: OutputFn | None = None,
    ) -> ExecResult:
        """Run one command in a fresh VM that is always deleted afterwards.

        ``command`` is a shell string (run by ``sh -lc``) or an exact argv list;
        ``cwd=None`` is the environment's own working directory (``/root``).
        ``stdin`` is the command's stdin: bytes, str (UTF-8), a binary file object or
        an iterable of bytes, streamed as the command reads it (None: empty). A
        command that exits without reading it all is fine: the rest is not read.
        ``on_stdout``/``on_stderr`` are called with each chunk of output (bytes) as
        it arrives, in order; the result still has it all (capped): ``stdout`` as
        text, ``stdout_bytes`` exact (likewise stderr). Caps: up to
        ``limits.MAX_OUTPUT_CAP`` bytes per stream.

        Raises:
            InvalidInputError: a bad command, option (size, TTL, cwd, env, caps, stdin,
                callbacks) or environment name.
            NotFoundError: ``environment`` is not in the catalog.
            EnvironmentBuildError: the environment could not be built.
            BackendUnavailableError: no backend can run it here (no KVM/QEMU/runsc, no opt-in to
                host_compat, or bubblewrap missing for host_compat).
            BootError: the guest did not come up.
            GuestProtocolError: the guest agent broke the protocol, or the VM stopped mid-command.
            VMStateError: the VM reached its TTL mid-command, or its supervisor misbehaved.
            LimitError: the cap on running VMs (``PYRO_MAX_VMS``) is reached.
            StateError: the state folder is unusable or full.
        """
        cmd = limits.check_command(command)
        opts = ExecOptions.checked(
            cwd=cwd,
            env=env,
            timeout_seconds=timeout_seconds,
            stdout_cap=stdout_cap,
            stderr_cap=stderr_cap,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        if self._tasks.selects_host_compat():
            return self._tasks.run_host_compat(environment, cmd, opts, progress=self._progress)
        pooled = None
        if self._pool is not None and not network:
            limits.check_ttl(ttl_seconds)
            pooled = self._pool.take(environment, vcpu_count, mem_mib)
        try:
            return self._manager.run(
                environment,
                cmd,
                opts,
                vcpu_count=vcpu_count,
                mem_mib=mem_mib,
                ttl_seconds=ttl_seconds,
                network=network,
                vm=pooled,
                progress=self._progress,
            )
        finally:
            if pooled is not None and self._pool is not None:
                self._pool.replenish()  # after the run, so the restore does not compete

    # -- lifecycle ----------------------------------------------------------
    def create_vm(
        self,
        environment: str,
        *,
        vcpu_count: int = limits.DEFAULT_VCPU_COUNT,
        mem_mib: int = limits.DEFAULT_MEM_MIB,
        ttl_seconds: int = limits.DEFAULT_TTL_SECONDS,
        network: bool = False,
    ) -> VMInfo:
        """Define a VM without booting it (inspect it, then ``start_vm`` + ``exec_vm``).

        Raises:
            InvalidInputError: a bad environment name, size, TTL or network flag, or the
                host_compat backend was chosen (it runs no VMs).
            NotFoundError: ``environment`` is not in the catalog.
            BackendUnavailableError: no VM backend works here.
            StateError: the state folder is unusable or full.
        """
        return self._manager.create(
            environment,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            ttl_seconds=ttl_seconds,
            network=network,
        )

    def start_vm(self, vm_id: str) -> VMInfo:
        """Boot a VM made by :meth:`create_vm` (``vm_id``: its full id).

        Raises:
            InvalidInputError: ``vm_id`` is not a VM id.
            NotFoundError: no such VM.
            VMStateError: the VM is already running or past its TTL.
            EnvironmentBuildError: its environment could not be built.
            BackendUnavailableError: its backend cannot run here.
            BootError: the guest did not come up.
            LimitError: the cap on running VMs (``PYRO_MAX_VMS``) is reached.
            StateError: its record is unreadable, or the state folder unusable or full.
        """
        return self._manager.start(vm_id, progress=self._progress)

    def exec_vm(
        self,
        vm_id: str,
        command: str | Sequence[str],
        *,
        timeout_seconds: int = limits.DEFAULT_TIMEOUT_SECONDS,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdout_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stderr_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stdin: StdinSource = None,
        on_stdout: OutputFn | None = None,
        on_stderr: OutputFn | None = None,
    ) -> ExecResult:
        """Run one command in a started VM, then delete the VM (its documented lifecycle).

        For repeated commands in one place, use tasks. ``stdin``, ``on_stdout`` and
        ``on_stderr`` as for :meth:`run_in_vm`.

        Raises:
            InvalidInputError: a bad command or option, or ``vm_id`` is not a VM id.
            NotFoundError: no such VM.
            VMStateError: the VM is not running (it is then left alone), reached its TTL
                mid-command, or its supervisor misbehaved.
            GuestProtocolError: the guest agent broke the protocol, or the VM stopped mid-command.
            StateError: its record is unreadable.
        """
        # Bad arguments or a VM that is not running leave the VM alone.
        cmd = limits.check_command(command)
        opts = ExecOptions.checked(
            cwd=cwd,
            env=env,
            timeout_seconds=timeout_seconds,
            stdout_cap=stdout_cap,
            stderr_cap=stderr_cap,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        info = self._manager.status(vm_id)
        if info.status != "running":
            raise VMStateError(
                f"VM {vm_id} is not running (status: {info.status})",
                hint="start it with start_vm first",
            )
        try:
            outcome = self._manager.exec(vm_id, cmd, opts, progress=self._progress)
        finally:
            with contextlib.suppress(PyroError):
                self._manager.delete(vm_id)
        return self._manager.result(info, cmd, outcome, deleted=True, reason="exec finished")

    def stop_vm(self, vm_id: str) -> VMInfo:
        """Stop a VM, keeping its record (``vm_id``: its full id).

        Raises:
            InvalidInputError: ``vm_id`` is not a VM id.
            NotFoundError: no such VM.
            StateError: its record is unreadable, or the state folder unusable or full.
        """
        return self._manager.stop(vm_id)

    def delete_vm(self, vm_id: str) -> dict[str, Any]:
        """Stop and remove a VM (``vm_id``: its id or a unique prefix of it).

        Raises:
            InvalidInputError: ``vm_id`` is malformed or a prefix of several VM ids.
            NotFoundError: no such VM.
            StateError: the state folder cannot be read.
        """
        vm_id = self._manager.records.resolve(vm_id)
        self._manager.delete(vm_id)
        return {"vm_id": vm_id, "deleted": True}

    def status_vm(self, vm_id: str) -> VMInfo:
        """A VM's state (``vm_id``: its id or a unique prefix of it).

        Raises:
            InvalidInputError: ``vm_id`` is malformed or a prefix of several VM ids.
            NotFoundError: no such VM.
            StateError: its record is unreadable or from another pyro-mcp version.
        """
        return self._manager.status(self._manager.records.resolve(vm_id))

    def console_log(self, ref: str, *, lines: int | None = None) -> str:
        """The console log of a VM, or of a task's current VM (``ref``: a VM id, a task
        id or name, or a unique prefix of either): its last ``lines`` lines, or all.

        Raises:
            InvalidInputError: a bad ``lines``, or ``ref`` is malformed or ambiguous.
            NotFoundError: no VM or task ``ref`` names.
            VMStateError: the task has no VM (host_compat), or its VM is gone.
            StateError: the console log or a record cannot be read.
        """
        from pyro_mcp import logs

        if lines is not None:
            lines = limits.check_int("lines", lines, 0, 1 << 20)
        vm_id = logs.vm_of(self._manager, self._tasks, ref)
        return logs.tail(logs.console_path(self._manager, vm_id), lines)

    def follow_console_log(
        self, ref: str, *, lines: int | None = 10, poll_interval: float = 0.2
    ) -> Iterator[str]:
        """:meth:`console_log`'s last ``lines`` lines, then the text the VM writes as it
        comes, until the VM stops (or the caller stops iterating).

        Raises:
            InvalidInputError: a bad ``lines``, or ``ref`` is malformed or ambiguous.
            NotFoundError: no VM or task ``ref`` names.
            VMStateError: the task has no VM (host_compat), or its VM is gone.
            StateError: the console log or a record cannot be read (on the first ``next()``).
        """
        from pyro_mcp import logs

        if lines is not None:
            lines = limits.check_int("lines", lines, 0, 1 << 20)
        vm_id = logs.vm_of(self._manager, self._tasks, ref)
        path = logs.console_path(self._manager, vm_id)
        return logs.follow(
            path, logs.vm_alive(self._manager, vm_id), lines=lines, poll_s=poll_interval
        )

    def list_vms(self) -> list[VMInfo]:
        """Every VM of this state folder (unreadable records are left out).

        Raises:
            StateError: the state folder cannot be read.
        """
        return self._manager.list()

    def network_info_vm(self, vm_id: str) -> NetworkInfo:
        """The network interfaces the guest really has (asked of the running guest).

        Raises:
            InvalidInputError: ``vm_id`` is not a VM id.
            NotFoundError: no such VM.
            VMStateError: the guest's interfaces could not be read, or the VM stopped meanwhile.
            GuestProtocolError: the guest agent broke the protocol.
            StateError: its record is unreadable.
        """
        info = self._manager.status(vm_id)
        if info.status != "running":
            return NetworkInfo(
                vm_id=vm_id,
                network_enabled=info.network,
                interfaces=[],
                detail=f"the VM is {info.status}; start it to see its interfaces",
            )
        outcome = self._manager.exec(
            vm_id, ["cat", "/proc/net/dev"], ExecOptions.checked(timeout_seconds=10)
        )
        if outcome.exit_code != 0:
            raise VMStateError(
                f"could not read the guest's interfaces: {outcome.stderr.decode(errors='replace')}",
                hints=hints(
                    cli="the environment needs `cat`; check the VM with `pyro vm status`",
                    sdk="the environment needs `cat`; check the VM with status_vm()",
                    mcp="the environment needs `cat`; check the VM with the vm_status tool",
                ),
            )
        interfaces = [
            line.split(":", 1)[0].strip()
            for line in outcome.stdout.decode(errors="replace").splitlines()[2:]
            if ":" in line
        ]
        detail = (
            "guest networking is off: the guest has loopback only"
            if interfaces == ["lo"]
            else f"the guest has {', '.join(interfaces) or 'no interfaces'}"
        )
        return NetworkInfo(
            vm_id=vm_id, network_enabled=info.network, interfaces=interfaces, detail=detail
        )

    # -- tasks --------------------------------------------------------------
    @property
    def tasks(self) -> TaskManager:
        """The task manager under this object (internal; its API may change)."""
        return self._tasks

    def create_task(
        self,
        environment: str,
        *,
        source_path: str | Path | None = None,
        vcpu_count: int = limits.DEFAULT_VCPU_COUNT,
        mem_mib: int = limits.DEFAULT_MEM_MIB,
        ttl_seconds: int = limits.DEFAULT_TASK_TTL_SECONDS,
        network: bool = False,
        exclude: Sequence[str] = (),
        seed_limits: SeedLimits | None = None,
        name: str | None = None,
    ) -> TaskInfo:
        """Start a persistent task whose /workspace starts as a copy of ``source_path``
        (a directory or a .tar/.tar.gz/.tar.bz2/.tar.xz archive; empty if None).

        ``name`` (unique among tasks; a-z, 0-9, '_', '.', '-') may then stand for the
        task's id in every method that takes one, as may a unique prefix of the id.

        ``exclude`` drops paths matching glob patterns (e.g. ``[".git", "*.pyc"]``);
        ``seed_limits`` changes the caps on seeded bytes and entries. The task
        outlives this process; delete it with :meth:`delete_task` (or it goes at
        its TTL, 24 h by default).

        Raises:
            InvalidInputError: a bad option, ``source_path``, ``exclude``, ``seed_limits`` or
                environment name, or ``name`` is malformed or taken.
            UnsafeSeedError: the source broke an extraction rule or a seed limit.
            NotFoundError: ``environment`` is not in the catalog.
            EnvironmentBuildError: the environment could not be built.
            BackendUnavailableError: no backend can run the task here (see :meth:`run_in_vm`).
            BootError: the task's VM did not come up.
            LimitError: the cap on running VMs (``PYRO_MAX_VMS``) is reached.
            StateError: the state folder is unusable or full, or the workspace disk failed.
        """
        return self._tasks.create(
            environment,
            source_path=source_path,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            ttl_seconds=ttl_seconds,
            network=network,
            exclude=exclude,
            seed_limits=seed_limits,
            name=name,
            progress=self._progress,
        )

    def task(
        self,
        environment: str | None = None,
        *,
        source_path: str | Path | None = None,
        keep: bool = False,
        **options: Any,
    ) -> Task:
        """Create a task and return its :class:`~pyro_mcp.handle.Task` handle, whose
        methods need no id (``task.exec("make")``). Used as ``with pyro.task(...) as
        task:`` it is deleted on leaving the block, after an exception too, unless
        ``keep=True``. ``environment`` None and ``mem_mib`` unset are the configured defaults
        (docs/config.md); ``options`` are :meth:`create_task`'s.

        Raises:
            InvalidInputError: a bad option, source or environment name.
            NotFoundError: the environment is not in the catalog.
            UnsafeSeedError: the source broke an extraction rule.
            EnvironmentBuildError: the environment could not be built.
            BackendUnavailableError, BootError: nothing could run the task.
            LimitError: too many VMs run already.
        """
        from pyro_mcp import handle

        env = environment if environment is not None else self.settings.environment
        options.setdefault("mem_mib", self.settings.mem_mib)
        return handle.create(self, env, keep=keep, source_path=source_path, **options)

    def get_task(self, task_id: str, *, keep: bool = False) -> Task:
        """The :class:`~pyro_mcp.handle.Task` handle of an existing task (``with`` it
        deletes the task on exit, as :meth:`task`'s does, unless ``keep=True``).

        Raises:
            InvalidInputError: ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task.
        """
        from pyro_mcp import handle

        return handle.get(self, task_id, keep=keep)

    def exec_task(
        self,
        task_id: str,
        command: str | Sequence[str],
        *,
        timeout_seconds: int = limits.DEFAULT_TIMEOUT_SECONDS,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stdout_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stderr_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stdin: StdinSource = None,
        on_stdout: OutputFn | None = None,
        on_stderr: OutputFn | None = None,
    ) -> TaskExecResult:
        """Run one command in the task (``cwd=None``: /workspace); files persist for
        the next. A command that times out is killed; the task stays. ``stdin``,
        ``on_stdout`` and ``on_stderr`` as for :meth:`run_in_vm`.

        Raises:
            InvalidInputError: a bad command or option, or ``task_id`` is malformed or a
                prefix of several task ids.
            NotFoundError: no such task.
            VMStateError: the task is still being created or past its TTL, or its VM misbehaved.
            EnvironmentBuildError, BackendUnavailableError: its gone VM could not be started again.
            BootError: its gone VM was started again and did not come up.
            GuestProtocolError: the guest agent broke the protocol, or the VM stopped mid-command.
            LimitError: starting its gone VM again would pass the cap on running VMs.
            StateError: its record is unreadable, or the state folder unusable or full.
        """
        cmd = limits.check_command(command)
        opts = ExecOptions.checked(
            cwd=cwd,
            env=env,
            timeout_seconds=timeout_seconds,
            stdout_cap=stdout_cap,
            stderr_cap=stderr_cap,
            stdin=stdin,
            on_stdout=on_stdout,
            on_stderr=on_stderr,
        )
        return self._tasks.exec(task_id, cmd, opts, progress=self._progress)

    def status_task(self, task_id: str) -> TaskInfo:
        """A task's state (``task_id``: its id, name or a unique id prefix).

        Raises:
            InvalidInputError: ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task.
            StateError: its record is unreadable or from another pyro-mcp version.
        """
        return self._tasks.status(task_id)

    def list_tasks(self) -> list[TaskInfo]:
        """Every task of this state folder (unreadable records are left out).

        Raises:
            StateError: the state folder cannot be read.
        """
        return self._tasks.list()

    def delete_task(self, task_id: str) -> TaskDeleteResult:
        """Stop the task's VM and remove it with its workspace.

        Raises:
            InvalidInputError: ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task (a second delete of one task included).
            StateError: the state folder cannot be read.
        """
        return self._tasks.delete(task_id)

    def prune_tasks(self, *, dry_run: bool = False) -> TaskPruneResult:
        """Remove every task that cannot be used again: past its TTL, a create cut
        short, a folder without a record, a backend this version lacks, or a workspace
        gone. A task whose VM merely stopped is kept (its next exec starts a new VM).
        ``dry_run``: only say what would go.

        Raises:
            StateError: the state folder cannot be read.
        """
        reasons = self._tasks.prune(dry_run=dry_run)
        return TaskPruneResult(pruned=sorted(reasons), reasons=reasons, dry_run=dry_run)

    def resolve_task(self, ref: str) -> str:
        """The id of the task ``ref`` names: its id, its name or a unique id prefix.

        Raises:
            InvalidInputError: ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no task has that id, name or prefix.
        """
        return self._tasks.resolve(ref)

    # -- a task's files -----------------------------------------------------
    @property
    def _files(self) -> TaskFiles:
        from pyro_mcp.tasks.files import TaskFiles

        return TaskFiles(self._tasks)

    def read_task_file(
        self,
        task_id: str,
        path: str,
        *,
        offset: int = 0,
        max_bytes: int = limits.DEFAULT_READ_BYTES,
        start_line: int | None = None,
        end_line: int | None = None,
        line_numbers: bool = False,
    ) -> FileReadResult:
        """Read a file of the task (relative paths are under /workspace). UTF-8 text
        comes back as text, anything else base64 (``encoding`` says which); the
        result says ``size`` and ``truncated``. ``start_line``/``end_line`` (1-based,
        inclusive) return just those lines; ``line_numbers`` prefixes each line with
        its number, for reading (not for ``edit_task_file``'s ``old_text``).
        :meth:`read_task_bytes` returns a whole file of any size as bytes.

        Raises:
            InvalidInputError: a bad path or option, the path is a folder or not a regular
                file, or ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task, or no such file or folder in it.
            VMStateError: the task is still being created or past its TTL, or its VM misbehaved.
            EnvironmentBuildError, BackendUnavailableError: its gone VM could not be started again.
            BootError: its gone VM was started again and did not come up.
            GuestProtocolError: the guest agent broke the wire protocol.
            LimitError: the guest agent runs as many file operations as it may.
            PyroError: any other error the guest reports for the file (an unusual errno).
            StateError: the task's record is unreadable.
        """
        return self._files.read(
            task_id,
            path,
            offset=offset,
            max_bytes=max_bytes,
            start_line=start_line,
            end_line=end_line,
            line_numbers=line_numbers,
            progress=self._progress,
        )

    def read_task_bytes(
        self,
        task_id: str,
        path: str,
        sink: Callable[[bytes], None] | None = None,
        *,
        offset: int = 0,
        max_bytes: int | None = None,
    ) -> bytes:
        """A file's exact bytes, streamed: into ``sink`` chunk by chunk (then b"" is
        returned), or collected and returned when ``sink`` is None.

        Raises:
            InvalidInputError: a bad path, ``offset`` or ``max_bytes``, the path is a folder or
                not a regular file, or ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task, or no such file or folder in it.
            VMStateError: the task is still being created or past its TTL, or its VM misbehaved.
            EnvironmentBuildError, BackendUnavailableError: its gone VM could not be started again.
            BootError: its gone VM was started again and did not come up.
            GuestProtocolError: the guest agent broke the wire protocol.
            LimitError: the guest agent runs as many file operations as it may.
            PyroError: any other error the guest reports for the file (an unusual errno).
            StateError: the task's record is unreadable.
        """
        out = bytearray()
        self._files.stream(
            task_id,
            path,
            sink or out.extend,
            offset=offset,
            max_bytes=max_bytes,
            progress=self._progress,
        )
        return bytes(out)

    def write_task_file(
        self,
        task_id: str,
        path: str,
        content: str | bytes | Iterable[bytes] | BinaryIO,
        *,
        encoding: Literal["utf-8", "base64"] = "utf-8",
        mode: int | None = None,
    ) -> FileWriteResult:
        """Write a file of the task atomically (a temporary file, then a rename),
        creating its parent folders. ``content``: text (``encoding`` "utf-8", or
        "base64" for bytes given as base64 text), bytes, an iterable of bytes or a
        binary file object (both streamed). ``mode`` None keeps an existing file's
        mode (0644 for a new one).

        Raises:
            InvalidInputError: a bad path, content, encoding or mode, the path is a folder, or
                ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task, or no such file or folder in it.
            VMStateError: the task is still being created or past its TTL, or its VM misbehaved.
            EnvironmentBuildError, BackendUnavailableError: its gone VM could not be started again.
            BootError: its gone VM was started again and did not come up.
            GuestProtocolError: the guest agent broke the wire protocol.
            LimitError: the guest's file system is full, or its agent is busy.
            PyroError: any other error the guest reports for the file (an unusual errno).
            StateError: the task's record is unreadable.
        """
        from pyro_mcp.workspace.files import decode_content

        data: bytes | Iterable[bytes]
        if isinstance(content, str):
            data = decode_content(content, encoding)
        elif isinstance(content, bytes | bytearray | memoryview):
            data = bytes(content)
        elif hasattr(content, "read"):
            reader = content

            def chunks() -> Iterator[bytes]:
                while chunk := reader.read(1 << 20):
                    yield chunk

            data = chunks()
        else:
            data = content
        return self._files.write(task_id, path, data, mode=mode, progress=self._progress)

    def edit_task_file(
        self,
        task_id: str,
        path: str,
        old_text: str,
        new_text: str,
        *,
        replace_all: bool = False,
    ) -> FileEditResult:
        """Replace ``old_text`` (exact, and unique unless ``replace_all``) by
        ``new_text`` in a text file of the task; returns the count and a short diff.

        Raises:
            InvalidInputError: ``old_text`` is missing or not unique, the file is not UTF-8
                text, a bad path, or ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task, or no such file or folder in it.
            VMStateError: the task is still being created or past its TTL, or its VM misbehaved.
            EnvironmentBuildError, BackendUnavailableError: its gone VM could not be started again.
            BootError: its gone VM was started again and did not come up.
            GuestProtocolError: the guest agent broke the wire protocol.
            LimitError: the file is too large to edit, the guest's disk is full, or its agent busy.
            PyroError: any other error the guest reports for the file (an unusual errno).
            StateError: the task's record is unreadable.
        """
        return self._files.edit(
            task_id, path, old_text, new_text, replace_all=replace_all, progress=self._progress
        )

    def list_task_files(
        self,
        task_id: str,
        path: str = limits.TASK_WORKSPACE,
        *,
        recursive: bool = False,
        max_entries: int = limits.DEFAULT_LIST_ENTRIES,
    ) -> FileListResult:
        """A folder's entries (type, size, mode, mtime, link target; links are never
        followed), capped at ``max_entries`` with ``truncated`` set.

        Raises:
            InvalidInputError: a bad path or ``max_entries``, the path is not a folder, or
                ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task, or no such file or folder in it.
            VMStateError: the task is still being created or past its TTL, or its VM misbehaved.
            EnvironmentBuildError, BackendUnavailableError: its gone VM could not be started again.
            BootError: its gone VM was started again and did not come up.
            GuestProtocolError: the guest agent broke the wire protocol.
            LimitError: the guest agent runs as many file operations as it may.
            PyroError: any other error the guest reports for the file (an unusual errno).
            StateError: the task's record is unreadable.
        """
        return self._files.list(
            task_id, path, recursive=recursive, max_entries=max_entries, progress=self._progress
        )

    def diff_task(self, task_id: str, path: str | None = None) -> DiffResult:
        """What changed in /workspace since the task was created (against its seed,
        or empty), with a patch ``git apply`` takes on the original folder.

        Raises:
            InvalidInputError: ``path`` is outside /workspace, or ``task_id`` is malformed
                or a prefix of several task ids.
            NotFoundError: no such task, or no such file or folder in it.
            VMStateError: the task has no kept seed (an older pyro-mcp made it), is still being
                created or past its TTL, or its VM misbehaved.
            EnvironmentBuildError, BackendUnavailableError: its gone VM could not be started again.
            BootError: its gone VM was started again and did not come up.
            GuestProtocolError: the guest agent broke the wire protocol.
            StateError: the kept seed or the task's record cannot be read.
        """
        return self._files.diff(task_id, path, progress=self._progress)

    def export_task(
        self,
        task_id: str,
        dest: str | Path,
        *,
        path: str = limits.TASK_WORKSPACE,
        overwrite: bool = False,
    ) -> ExportResult:
        """Copy ``path`` (default all of /workspace) out of the task into the host
        folder ``dest``, or a ``.tar``/``.tar.gz`` archive. Links that leave the
        tree, special files and entries past the caps are skipped and listed.

        Raises:
            InvalidInputError: a bad ``path`` or ``dest``, ``dest`` exists without ``overwrite``,
                or ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task, or no such file or folder in it.
            VMStateError: the task is still being created or past its TTL, or its VM misbehaved.
            EnvironmentBuildError, BackendUnavailableError: its gone VM could not be started again.
            BootError: its gone VM was started again and did not come up.
            GuestProtocolError: the guest agent broke the wire protocol.
            ExportError: writing the export on the host failed (code ``export_failed``);
                ``dest`` is left as it was.
            StateError: the task's record is unreadable.
        """
        return self._files.export(
            task_id, dest, path=path, overwrite=overwrite, progress=self._progress
        )

    def reset_task(self, task_id: str) -> TaskResetResult:
        """Put the task's /workspace back to its seed (kept at create; the host
        folder is not read again), stopping what runs in it. On VM backends this is
        a new VM, so everything outside /workspace starts fresh too.

        Raises:
            InvalidInputError: ``task_id`` is malformed or a prefix of several task ids.
            NotFoundError: no such task.
            VMStateError: the task is still being created or past its TTL, or has no kept seed.
            EnvironmentBuildError, BackendUnavailableError: its new VM could not be started.
            BootError: its new VM did not come up.
            LimitError: its new VM would pass the cap on running VMs.
            StateError: the workspace could not be put back, or its record is unreadable.
        """
        return self._tasks.reset(task_id, progress=self._progress)

    def reap_expired(self) -> ReapResult:
        """Remove VMs and tasks past their TTL, and leftovers of dead processes.

        Raises:
            StateError: the state folder cannot be read.
        """
        reasons = self._manager.reap_expired()
        reasons.update(self._tasks.reap_expired())
        return ReapResult(reaped=sorted(reasons), reasons=reasons)
