"""VM lifecycle and state: create, start, exec, stop, delete, list, reap.

Each VM is one folder under ``<state>/vms/<vm_id>`` holding its record
(``vm.json``, atomic and versioned), its disk overlay and the sockets of its
supervisor. Lifecycle changes hold the VM's file lock; execs go straight to
the supervisor, which runs several at once.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import errno
import json
import os
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pyro_mcp import limits, paths
from pyro_mcp.errors import (
    BackendUnavailableError,
    BootError,
    GuestProtocolError,
    InvalidInputError,
    LimitError,
    NotFoundError,
    PyroError,
    StateError,
    VMStateError,
)
from pyro_mcp.models import BootKind, ExecResult, ReapResult, VMInfo
from pyro_mcp.pool import WarmPool
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress
from pyro_mcp.state import (
    ProcessId,
    read_json,
    record_lock,
    remove_orphan_locks,
    write_json_atomic,
)
from pyro_mcp.vmm import BackendChoice, execution_mode, get_backend
from pyro_mcp.vmm.base import LaunchPlan, VMPaths

BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
DEFAULT_BOOT_TIMEOUT = 90.0
HOST_COMPAT_OPT_IN = (
    "or, without a VM, opt in to running on this host confined by bubblewrap (weaker "
    "isolation): `pyro --backend host_compat ...` (SDK: Pyro(allow_host_compat=True))"
)


@dataclass(frozen=True)
class ExecOutcome:
    exit_code: int
    stdout: bytes
    stderr: bytes
    stdout_truncated: bool
    stderr_truncated: bool
    timed_out: bool
    duration_ms: int


def build_argv(command: str | list[str], env: Mapping[str, str]) -> list[str]:
    """A string runs under ``sh -lc``; the caller's env is re-exported after the
    login profile so it wins over what the profile sets (PATH above all)."""
    if isinstance(command, list):
        return command
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return ["sh", "-lc", exports + command]


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
        self._store = store
        self._backend_name = backend or os.environ.get("PYRO_BACKEND") or "auto"
        self.pool: WarmPool | None = None

    # -- helpers ------------------------------------------------------------
    @property
    def store(self) -> Any:
        if self._store is None:
            from pyro_mcp.environments.store import EnvironmentStore

            self._store = EnvironmentStore()
        return self._store

    def _vm_dir(self, vm_id: str) -> Path:
        return self.vms_dir / limits.check_vm_id(vm_id)

    def _lock(self, vm_id: str) -> contextlib.AbstractContextManager[None]:
        """The VM's lifecycle lock (the id is checked before it names a file)."""
        vm_dir = self._vm_dir(vm_id)
        return record_lock(self.vms_dir / f".{vm_id}.lock", vm_dir)

    def _load(self, vm_id: str) -> dict[str, Any]:
        vm_dir = self._vm_dir(vm_id)
        try:
            return read_json(vm_dir / "vm.json")
        except FileNotFoundError:
            raise NotFoundError(
                f"VM {vm_id} does not exist (it may have been deleted or reaped after its TTL)",
                hint="list VMs with `pyro vm list`",
            ) from None

    def _save(self, record: dict[str, Any]) -> None:
        try:
            write_json_atomic(self.vms_dir / record["vm_id"] / "vm.json", record)
        except OSError as exc:  # e.g. a full disk: the old record is still intact
            raise _state_dir_error(self.vms_dir, exc) from exc

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
                f"unknown backend {name!r}", hint=f"choose one of: auto, {', '.join(BACKEND_NAMES)}"
            )
        if name == "auto":
            try:
                return choose_auto()
            except BackendUnavailableError as exc:
                raise BackendUnavailableError(
                    exc.message, hint=f"{exc.hint}; {HOST_COMPAT_OPT_IN}"
                ) from None
        chosen = name
        probe = get_backend(chosen).probe()
        if not probe.available:
            raise BackendUnavailableError(
                f"backend {chosen} is not usable here: {probe.reason}",
                hint="; ".join([*probe.advice, HOST_COMPAT_OPT_IN])
                if probe.advice
                else f"run `pyro doctor` for details; {HOST_COMPAT_OPT_IN}",
            )
        return BackendChoice(chosen, probe.acceleration or "tcg", f"requested: {probe.reason}")

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
        mounts: Sequence[Mapping[str, Any]] = (),
    ) -> VMInfo:
        """Define a VM (no boot yet). Validates everything before writing anything."""
        from pyro_mcp.environments.catalog import get_spec

        spec = get_spec(environment)
        limits.check_vcpu_count(vcpu_count)
        limits.check_mem_mib(mem_mib)
        limits.check_ttl(ttl_seconds)
        if not isinstance(network, bool):
            raise InvalidInputError("network must be true or false")
        if network:
            raise InvalidInputError(
                "guest networking is not available yet in this version of pyro-mcp",
                hint="run without --network (guests have loopback only)",
            )
        backend, accel = self.resolve_backend()
        owner = ProcessId.of(owner_pid) if owner_pid is not None else None
        try:
            paths.ensure_private_dir(self.vms_dir)
        except OSError as exc:
            raise _state_dir_error(self.vms_dir, exc) from exc
        vm_id = f"vm-{secrets.token_hex(6)}"
        now = time.time()
        record: dict[str, Any] = {
            "vm_id": vm_id,
            "environment": spec.name,
            "environment_version": spec.version,
            "status": "created",
            "vcpu_count": vcpu_count,
            "mem_mib": mem_mib,
            "network": network,
            "ttl_seconds": ttl_seconds,
            "created_at": now,
            "expires_at": now + ttl_seconds,
            "backend": backend,
            "acceleration": accel,
            "boot": None,
            "owner": owner.to_dict() if owner else None,
            "supervisor": None,
            "vmm": None,
            "detail": None,
            "mounts": [dict(m) for m in mounts],  # done by the guest agent at INIT
        }
        vm_dir = self.vms_dir / vm_id
        try:
            vm_dir.mkdir(mode=0o700)
        except OSError as exc:
            raise _state_dir_error(self.vms_dir, exc) from exc
        try:
            self._save(record)
        except BaseException:
            shutil.rmtree(vm_dir, ignore_errors=True)
            raise
        return self._info(record)

    def start(self, vm_id: str, progress: ProgressFn = no_progress) -> VMInfo:
        with self._lock(vm_id):
            record = self._load(vm_id)
            if record["status"] == "running" and self._supervisor_alive(record):
                raise VMStateError(f"VM {vm_id} is already running")
            if time.time() >= record["expires_at"]:
                raise VMStateError(
                    f"VM {vm_id} has outlived its TTL", hint="delete it and create a new one"
                )
            launch = self._prepare_launch(record, progress)
            with self._vm_slot(vm_id):
                starter = ProcessId.of(os.getpid())
                record["status"] = "starting"
                record["starter"] = starter.to_dict() if starter else None
                self._save(record)
            try:
                try:
                    ready = self._spawn_supervisor(record, launch, progress)
                except OSError as exc:
                    raise _state_dir_error(self.vms_dir / vm_id, exc) from exc
            except PyroError as exc:
                record["status"] = "failed"
                record["detail"] = exc.message
                with contextlib.suppress(StateError):
                    self._save(record)
                raise
            record.update(
                status="running",
                boot=ready["boot"],
                supervisor=ready["supervisor_id"],
                vmm=ready.get("vmm"),
                detail=None,
            )
            self._save(record)
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
        for vm_dir in self._vm_dirs():
            if vm_dir.name == exclude:
                continue
            try:
                record = read_json(vm_dir / "vm.json")
            except (FileNotFoundError, StateError):
                continue
            if record.get("status") not in ("running", "starting"):
                continue
            starter = ProcessId.from_dict(record.get("starter"))
            if self._supervisor_alive(record) or (
                record.get("status") == "starting" and starter is not None and starter.alive()
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
        mounts: Sequence[Mapping[str, Any]] = (),
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
            mounts=mounts,
            paths=VMPaths(vm_dir) if vm_dir is not None else None,
            progress=progress,
        )
        return env, plan

    def _prepare_launch(self, record: dict[str, Any], progress: ProgressFn) -> dict[str, Any]:
        env, plan = self._plan(
            record["backend"],
            record["acceleration"],
            record["environment"],
            vcpu_count=record["vcpu_count"],
            mem_mib=record["mem_mib"],
            network=record["network"],
            mounts=record.get("mounts") or (),
            vm_dir=self.vms_dir / record["vm_id"],
            progress=progress,
        )
        if env.version != record["environment_version"]:
            record["environment_version"] = env.version
        return {
            "backend": record["backend"],
            **plan.to_launch(),
            "expires_at": record["expires_at"],
            "owner": record["owner"],
            "boot_timeout": DEFAULT_BOOT_TIMEOUT,
        }

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

    def _spawn_supervisor(
        self, record: dict[str, Any], launch: dict[str, Any], progress: ProgressFn
    ) -> dict[str, Any]:
        vm_dir = self.vms_dir / record["vm_id"]
        write_json_atomic(vm_dir / "launch.json", launch)
        progress(ProgressEvent("boot", f"booting {record['environment']} ({record['vm_id']})"))
        log = (vm_dir / "supervisor.log").open("ab")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "pyro_mcp.supervisor", str(vm_dir)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
                close_fds=True,
            )
        finally:
            log.close()
        assert proc.stdout is not None
        deadline = time.monotonic() + float(launch["boot_timeout"]) + 15
        line = b""
        try:
            while not line.endswith(b"\n"):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BootError(f"VM {record['vm_id']} did not become ready in time")
                readable, _, _ = select.select([proc.stdout], [], [], min(remaining, 5.0))
                if not readable:
                    progress(ProgressEvent("boot", "waiting for the guest agent"))
                    continue
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                line += chunk
        except BaseException:
            _kill_process_group(proc.pid)
            raise
        finally:
            proc.stdout.close()
        try:
            ready = json.loads(line)
        except ValueError:
            _kill_process_group(proc.pid)
            tail = _tail_file(vm_dir / "supervisor.log")
            raise BootError(
                f"the VM supervisor failed to start: {tail or 'no output'}",
                details={"console_tail": _tail_file(vm_dir / "console.log")},
            ) from None
        if not ready.get("ok"):
            proc.wait(timeout=15)
            err = ready.get("error") or {}
            details = dict(err.get("details") or {})
            details.setdefault("console_tail", _tail_file(vm_dir / "console.log"))
            error_type = (
                BackendUnavailableError if err.get("code") == "backend_unavailable" else BootError
            )
            raise error_type(
                err.get("message", "boot failed"), hint=err.get("hint"), details=details
            )
        sup = ProcessId.of(proc.pid)
        ready["supervisor_id"] = sup.to_dict() if sup else None
        return dict(ready)

    def exec(
        self,
        vm_id: str,
        command: str | Sequence[str],
        *,
        cwd: str = "/root",
        env: Mapping[str, str] | None = None,
        timeout_seconds: int = limits.DEFAULT_TIMEOUT_SECONDS,
        stdout_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stderr_cap: int = limits.DEFAULT_OUTPUT_CAP,
        progress: ProgressFn = no_progress,
    ) -> ExecOutcome:
        cmd = limits.check_command(command)
        user_env = limits.check_env(env)
        limits.check_cwd(cwd)
        limits.check_timeout(timeout_seconds)
        limits.check_output_cap("stdout_cap", stdout_cap)
        limits.check_output_cap("stderr_cap", stderr_cap)
        record = self._load(vm_id)
        if record["status"] != "running" or not self._supervisor_alive(record):
            raise VMStateError(
                f"VM {vm_id} is not running (status: {self._effective_status(record)[0]})",
                hint="start it first, or use run_in_vm for a one-shot command",
            )
        full_env = {**BASE_ENV, **user_env}
        request = {
            "op": "exec",
            "argv": build_argv(cmd, user_env),
            "cwd": cwd,
            "env": [f"{k}={v}" for k, v in full_env.items()],
            "timeout_ms": timeout_seconds * 1000,
            "stdout_cap": stdout_cap,
            "stderr_cap": stderr_cap,
        }
        for event in self._control(vm_id, request):
            if event.get("event") == "heartbeat":
                elapsed = event.get("elapsed_ms", 0) / 1000
                progress(ProgressEvent("exec", f"command running ({elapsed:.0f} s)", elapsed, None))
                continue
            if not event.get("ok"):
                error = _error_from(event.get("error") or {})
                if isinstance(error, GuestProtocolError):
                    error = _ttl_error(record) or error
                raise error
            return ExecOutcome(
                exit_code=int(event["exit_code"]),
                stdout=base64.b64decode(event["stdout_b64"]),
                stderr=base64.b64decode(event["stderr_b64"]),
                stdout_truncated=bool(event["stdout_truncated"]),
                stderr_truncated=bool(event["stderr_truncated"]),
                timed_out=bool(event["timed_out"]),
                duration_ms=int(event["duration_ms"]),
            )
        raise _ttl_error(record) or GuestProtocolError(
            f"VM {vm_id} stopped while running the command"
        )

    def _control(self, vm_id: str, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Send one request to the VM's supervisor and yield its events."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                sock.connect(str(self._vm_dir(vm_id) / "ctl.sock"))
            except OSError as exc:
                raise VMStateError(
                    f"VM {vm_id} is not reachable ({exc.strerror})",
                    hint="check `pyro vm status`; delete and recreate it if it is broken",
                ) from None
            sock.sendall(json.dumps(request).encode() + b"\n")
            buf = b""
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, _, buf = buf.partition(b"\n")
                    yield json.loads(line)
        finally:
            sock.close()

    def stop(self, vm_id: str) -> VMInfo:
        with self._lock(vm_id):
            record = self._load(vm_id)
            self._stop_supervisor(record)
            record["status"] = "stopped"
            record["detail"] = "stopped by request"
            self._save(record)
            return self._info(record)

    def delete(self, vm_id: str, reason: str = "deleted") -> None:
        vm_dir = self._vm_dir(vm_id)
        with self._lock(vm_id):
            try:
                record = read_json(vm_dir / "vm.json")
            except FileNotFoundError:
                if not vm_dir.exists():
                    raise NotFoundError(
                        f"VM {vm_id} does not exist (it may have been deleted or reaped)",
                        hint="list VMs with `pyro vm list`",
                    ) from None
                record = None
            except StateError:
                record = None
            if record is not None:
                self._stop_supervisor(record, wait_exit=False, reason="deleted")
            shutil.rmtree(vm_dir, ignore_errors=True)

    def _stop_supervisor(
        self, record: dict[str, Any], *, wait_exit: bool = True, reason: str = "stopped"
    ) -> None:
        """Stop the VM's supervisor and VMM. ``wait_exit=False`` (used when the folder
        is about to be removed) returns once the VMM is dead, while the supervisor
        finishes exiting on its own."""
        sup = ProcessId.from_dict(record.get("supervisor"))
        vmm = ProcessId.from_dict(record.get("vmm"))
        if sup is not None and sup.alive():
            acknowledged = False
            with contextlib.suppress(PyroError, OSError, ValueError):
                for event in self._control(record["vm_id"], {"op": "shutdown", "reason": reason}):
                    acknowledged = bool(event.get("ok"))
                    break
            if wait_exit or not acknowledged:
                deadline = time.monotonic() + 5
                while sup.alive() and time.monotonic() < deadline:
                    time.sleep(0.005)
                if sup.alive():
                    _kill_process_group(sup.pid)
        if vmm is not None and vmm.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(vmm.pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while vmm.alive() and time.monotonic() < deadline:
                time.sleep(0.01)

    # -- queries ------------------------------------------------------------
    def _supervisor_alive(self, record: dict[str, Any]) -> bool:
        sup = ProcessId.from_dict(record.get("supervisor"))
        return sup is not None and sup.alive()

    def _effective_status(self, record: dict[str, Any]) -> tuple[str, str | None]:
        status = record["status"]
        if status in ("running", "starting") and not self._supervisor_alive(record):
            reason = None
            with contextlib.suppress(FileNotFoundError, StateError):
                reason = read_json(self.vms_dir / record["vm_id"] / "exit.json").get("reason")
            return "stopped", f"the VM exited ({reason or 'supervisor gone'})"
        return status, record.get("detail")

    def _info(self, record: dict[str, Any]) -> VMInfo:
        status, detail = self._effective_status(record)
        return VMInfo(
            vm_id=record["vm_id"],
            environment=record["environment"],
            environment_version=record["environment_version"],
            status=status,  # type: ignore[arg-type]
            vcpu_count=record["vcpu_count"],
            mem_mib=record["mem_mib"],
            network=record["network"],
            ttl_seconds=record["ttl_seconds"],
            created_at=record["created_at"],
            expires_at=record["expires_at"],
            backend=record["backend"],
            acceleration=record["acceleration"],
            boot=record.get("boot"),
            detail=detail,
        )

    def status(self, vm_id: str) -> VMInfo:
        return self._info(self._load(vm_id))

    def list(self) -> builtins.list[VMInfo]:
        out = []
        for vm_dir in sorted(self._vm_dirs()):
            with contextlib.suppress(FileNotFoundError, StateError):
                out.append(self._info(read_json(vm_dir / "vm.json")))
        return out

    def _vm_dirs(self) -> builtins.list[Path]:
        try:
            return [d for d in self.vms_dir.iterdir() if d.is_dir() and d.name.startswith("vm-")]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _state_dir_error(self.vms_dir, exc) from exc

    def reap_expired(self) -> ReapResult:
        """Delete VMs past their TTL, ephemeral VMs whose owner died, and debris."""
        reasons: dict[str, str] = {}
        now = time.time()
        for vm_dir in self._vm_dirs():
            vm_id = vm_dir.name
            try:
                record = read_json(vm_dir / "vm.json")
            except FileNotFoundError:
                # A folder without a record is a half-created VM (or one mid-reap).
                with contextlib.suppress(OSError):
                    if now - vm_dir.stat().st_mtime > 60:
                        shutil.rmtree(vm_dir, ignore_errors=True)
                        reasons[vm_id] = "incomplete"
                continue
            except StateError:
                continue
            owner = ProcessId.from_dict(record.get("owner"))
            reason = None
            if now >= float(record["expires_at"]):
                reason = "ttl_expired"
            elif record.get("owner") is not None and (owner is None or not owner.alive()):
                reason = "owner_exited"
            if reason is None:
                continue
            with contextlib.suppress(NotFoundError, InvalidInputError):
                self.delete(vm_id, reason=reason)
                reasons[vm_id] = reason
        remove_orphan_locks(self.vms_dir, "vm-")
        return ReapResult(reaped=sorted(reasons), reasons=reasons)

    # -- one-shot -----------------------------------------------------------
    def run(
        self,
        environment: str,
        command: str | Sequence[str],
        *,
        vcpu_count: int = limits.DEFAULT_VCPU_COUNT,
        mem_mib: int = limits.DEFAULT_MEM_MIB,
        timeout_seconds: int = limits.DEFAULT_TIMEOUT_SECONDS,
        ttl_seconds: int = limits.DEFAULT_TTL_SECONDS,
        network: bool = False,
        cwd: str = "/root",
        env: Mapping[str, str] | None = None,
        stdout_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stderr_cap: int = limits.DEFAULT_OUTPUT_CAP,
        progress: ProgressFn = no_progress,
    ) -> ExecResult:
        """Create, start, exec, and always delete — even on error or Ctrl-C."""
        cmd = limits.check_command(command)
        limits.check_env(env)
        limits.check_cwd(cwd)
        limits.check_timeout(timeout_seconds)
        limits.check_output_cap("stdout_cap", stdout_cap)
        limits.check_output_cap("stderr_cap", stderr_cap)
        pooled = None
        if self.pool is not None and not network:
            limits.check_ttl(ttl_seconds)
            pooled = self.pool.take(environment, vcpu_count, mem_mib)
        info = pooled or self.create(
            environment,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            ttl_seconds=ttl_seconds,
            network=network,
            owner_pid=os.getpid(),
        )
        try:
            started = pooled or self.start(info.vm_id, progress=progress)
            outcome = self.exec(
                info.vm_id,
                cmd,
                cwd=cwd,
                env=env,
                timeout_seconds=timeout_seconds,
                stdout_cap=stdout_cap,
                stderr_cap=stderr_cap,
                progress=progress,
            )
        finally:
            with contextlib.suppress(NotFoundError):
                self.delete(info.vm_id, reason="run finished")
            if pooled is not None and self.pool is not None:
                self.pool.replenish()
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
        from pyro_mcp.models import CleanupInfo

        boot: BootKind = info.boot or "cold"
        return ExecResult(
            vm_id=info.vm_id,
            environment=info.environment,
            environment_version=info.environment_version,
            command=command,
            stdout=outcome.stdout.decode("utf-8", "replace"),
            stderr=outcome.stderr.decode("utf-8", "replace"),
            stdout_truncated=outcome.stdout_truncated,
            stderr_truncated=outcome.stderr_truncated,
            exit_code=outcome.exit_code,
            timed_out=outcome.timed_out,
            duration_ms=outcome.duration_ms,
            execution_mode=execution_mode(info.backend),
            backend=info.backend,
            acceleration=info.acceleration,
            boot=boot,
            cleanup=None if deleted is None else CleanupInfo(deleted=deleted, reason=reason),
        )


def _error_from(error: dict[str, Any]) -> PyroError:
    code = error.get("code")
    message = str(error.get("message", "the VM reported an error"))
    hint = error.get("hint")
    if code == "invalid_input":
        return InvalidInputError(message, hint=hint)
    if code == "guest_protocol_error":
        return GuestProtocolError(message, hint=hint)
    return PyroError(message, hint=hint)


def _ttl_error(record: dict[str, Any]) -> VMStateError | None:
    """The error to report when a VM vanished mid-command because its TTL ran out."""
    if time.time() < float(record["expires_at"]):
        return None
    return VMStateError(
        f"VM {record['vm_id']} reached its TTL ({record['ttl_seconds']} s) while the command"
        " ran, and was deleted",
        hint="create the VM with a larger ttl_seconds, or run shorter commands",
    )


def _state_dir_error(path: Path, exc: OSError) -> StateError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StateError(
            f"the VM state folder {path} is full: {exc.strerror or exc}",
            hint="free space there (delete VMs and tasks you no longer need), "
            "or set PYRO_STATE_DIR to a folder with room",
        )
    return StateError(
        f"the VM state folder {path} is unusable: {exc.strerror or exc}",
        hint="set PYRO_STATE_DIR to a writable folder",
    )


def _kill_process_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _tail_file(path: Path, max_bytes: int = 4000) -> str:
    try:
        data = path.read_bytes()[-max_bytes:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()
