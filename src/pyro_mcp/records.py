"""One record store for VMs and tasks: typed records in private folders.

Each record lives in ``<root>/<id>/<filename>`` (written atomically, schema
checked on read, see :mod:`pyro_mcp.state`) beside whatever else belongs to it
(disks, sockets, logs). Lifecycle changes hold the record's cross-process lock
``<root>/.<id>.lock``. The store knows nothing of what a record means: the VM
and task managers give it a codec (``to_dict``/``from_dict``) and, for
reaping, a function that says why a record should go.

Records are typed, config (fixed at create) apart from runtime state:
:class:`VMRecord` (all frozen: a change makes a new record, ``with_runtime``)
and :class:`TaskRecord`, whose :class:`TaskRuntime` is mutable by choice: the
task code updates its fields in place while it holds the task's lock, then
saves the record. On disk: ``{"schema": 2, "config": {...}, "runtime": {...}}``.

OS errors on the state folder are translated here, once, into
:class:`~pyro_mcp.errors.StateError` with one wording.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast, get_args

from pyro_mcp import paths
from pyro_mcp.control import MountSpec
from pyro_mcp.errors import InvalidInputError, NotFoundError, StateError
from pyro_mcp.limits import ID_HEX_PREFIX, REF_PATTERN
from pyro_mcp.models import BootKind, TaskStatus
from pyro_mcp.state import (
    ProcessId,
    read_json,
    record_lock,
    remove_orphan_locks,
    write_json_atomic,
)

if TYPE_CHECKING:
    from pyro_mcp.workspace.seed import SeedResult

INCOMPLETE_GRACE_S = 60.0  # a folder without a record younger than this is being created

_REF = re.compile(REF_PATTERN)


class Codec(Protocol):
    """What a record type provides to be stored."""

    @property
    def record_id(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=Codec)


def state_dir_error(path: Path, exc: OSError) -> StateError:
    """The one translation of an OS error on pyro's state folder."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return StateError(
            f"the state folder {path} is full: {exc.strerror or exc}",
            hint="free space there (delete VMs and tasks you no longer need), "
            "or set PYRO_STATE_DIR to a folder with room",
        )
    return StateError(
        f"the state folder {path} is unusable: {exc.strerror or exc}",
        hint="check its permissions, or set PYRO_STATE_DIR to a writable folder",
    )


class RecordStore(Generic[R]):
    """Typed records of one kind (``vm`` or ``task``) under one folder."""

    def __init__(
        self,
        root: Path,
        *,
        kind: str,
        filename: str,
        decode: Callable[[dict[str, Any]], R],
        check_id: Callable[[str], str],
        list_hint: Mapping[str, str],
    ) -> None:
        """``list_hint``: how to list these records, per surface (``cli``, ``sdk``,
        ``mcp``; see :func:`pyro_mcp.errors.hints`): a not-found error carries all three
        and each surface shows its own."""
        self.root = root
        self.kind = kind  # "VM" or "task": used in messages
        self.prefix = f"{kind.lower()}-"
        self.filename = filename
        self._decode = decode
        self._check_id = check_id
        self.list_hint = dict(list_hint)  # per surface (errors.hints)

    # -- naming ---------------------------------------------------------------
    def folder(self, record_id: str) -> Path:
        """The record's folder (the id is validated before it names a path)."""
        return self.root / self._check_id(record_id)

    def new_id(self) -> str:
        return f"{self.prefix}{secrets.token_hex(6)}"

    def lock(self, record_id: str) -> contextlib.AbstractContextManager[None]:
        """The record's lifecycle lock; its file goes once the record's folder is gone."""
        folder = self.folder(record_id)
        return record_lock(self.root / f".{record_id}.lock", folder)

    # -- create / read / write --------------------------------------------------
    def create_folder(self) -> tuple[str, Path]:
        """A fresh id and its new private folder."""
        try:
            paths.ensure_private_dir(self.root)
            record_id = self.new_id()
            folder = self.root / record_id
            folder.mkdir(mode=0o700)
        except OSError as exc:
            raise state_dir_error(self.root, exc) from exc
        return record_id, folder

    def _decode_checked(self, data: dict[str, Any], where: Path) -> R:
        try:
            return self._decode(data)
        except (KeyError, TypeError, ValueError) as exc:
            raise StateError(
                f"state file {where} is malformed: {exc}",
                hint=f"it was written by another pyro-mcp version; remove {where.parent}",
            ) from None

    def not_found(self, record_id: str, what: str | None = None) -> NotFoundError:
        return NotFoundError(
            what
            or f"{self.kind} {record_id} does not exist (it may have been deleted, or reaped "
            "after its TTL)",
            hints=self.list_hint,
            details={f"{self.kind.lower()}_id": record_id},
        )

    # -- references -------------------------------------------------------------
    def resolve(self, ref: str, name_of: Callable[[R], str | None] | None = None) -> str:
        """The id that ``ref`` names: a full id (returned as is, whether or not it
        exists), a record's name (``name_of``), or a unique prefix of an id, with or
        without its ``task-``/``vm-`` part. An unknown ref is a NotFoundError, a prefix
        of several ids an InvalidInputError listing them."""
        try:
            return self._check_id(ref)
        except InvalidInputError as exc:
            if not isinstance(ref, str) or not _REF.fullmatch(ref):
                raise exc from None
        if name_of is not None:
            for record in self.records():
                if name_of(record) == ref:
                    return record.record_id
        hex_part = ref[len(self.prefix) :] if ref.startswith(self.prefix) else ref
        if not ID_HEX_PREFIX.fullmatch(hex_part):
            named = " or name" if name_of is not None else ""
            raise self.not_found(ref, f"no {self.kind} has the id{named} {ref!r}")
        ids = [f.name for f in self.folders() if f.name[len(self.prefix) :].startswith(hex_part)]
        if not ids:
            raise self.not_found(ref, f"no {self.kind} id starts with {ref!r}")
        if len(ids) > 1:
            shown = ", ".join(ids[:10]) + (f" and {len(ids) - 10} more" if len(ids) > 10 else "")
            raise InvalidInputError(
                f"{ref!r} is the start of {len(ids)} {self.kind} ids: {shown}",
                hint="give more of the id",
                details={"candidates": ids},
            )
        return ids[0]

    def load(self, record_id: str) -> R:
        path = self.folder(record_id) / self.filename
        try:
            data = read_json(path)
        except FileNotFoundError:
            raise self.not_found(record_id) from None
        return self._decode_checked(data, path)

    def save(self, record: R) -> None:
        """Atomic: on failure (e.g. a full disk) the previous record is still intact."""
        path = self.root / record.record_id / self.filename
        try:
            write_json_atomic(path, record.to_dict())
        except OSError as exc:
            raise state_dir_error(self.root, exc) from exc

    def remove(self, record_id: str) -> None:
        """Remove the record's folder. It is renamed away first, so a process still
        writing into it by path (a supervisor reporting its exit) cannot leave
        anything behind under the record's name."""
        folder = self.folder(record_id)
        tomb = self.root / f".{record_id}.removed-{secrets.token_hex(4)}"
        try:
            os.rename(folder, tomb)
        except FileNotFoundError:
            return
        except OSError:
            tomb = folder
        shutil.rmtree(tomb, ignore_errors=True)

    # -- enumeration ----------------------------------------------------------
    def folders(self) -> list[Path]:
        try:
            return sorted(
                d for d in self.root.iterdir() if d.is_dir() and d.name.startswith(self.prefix)
            )
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise state_dir_error(self.root, exc) from exc

    def read_folder(self, folder: Path) -> R | None:
        """The record in ``folder``; None if it has none yet or it is unreadable."""
        path = folder / self.filename
        with contextlib.suppress(FileNotFoundError, StateError, InvalidInputError):
            return self._decode_checked(read_json(path), path)
        return None

    def records(self) -> Iterator[R]:
        for folder in self.folders():
            record = self.read_folder(folder)
            if record is not None:
                yield record

    # -- reaping --------------------------------------------------------------
    def reap(
        self,
        why: Callable[[R, float], str | None],
        delete: Callable[[str, str], None],
        *,
        dry_run: bool = False,
    ) -> dict[str, str]:
        """Delete every record ``why`` names a reason for (via ``delete(id, reason)``),
        folders that never got a record, and lock files whose record is gone.
        ``dry_run``: only say what would go."""
        reasons: dict[str, str] = {}
        now = time.time()
        for folder in self.folders():
            record_id = folder.name
            path = folder / self.filename
            try:
                record = self._decode_checked(read_json(path), path)
            except FileNotFoundError:
                # A folder without a record is a half-created one (or one mid-reap).
                with contextlib.suppress(OSError):
                    if now - folder.stat().st_mtime > INCOMPLETE_GRACE_S:
                        if not dry_run:
                            shutil.rmtree(folder, ignore_errors=True)
                        reasons[record_id] = "incomplete"
                continue
            except StateError:
                continue
            reason = why(record, now)
            if reason is None:
                continue
            if dry_run:
                reasons[record_id] = reason
                continue
            with contextlib.suppress(NotFoundError, InvalidInputError):
                delete(record_id, reason)
                reasons[record_id] = reason
        if dry_run:
            return reasons
        remove_orphan_locks(self.root, self.prefix)
        with contextlib.suppress(OSError):  # removals cut short (e.g. by SIGKILL)
            for tomb in self.root.glob(f".{self.prefix}*.removed-*"):
                shutil.rmtree(tomb, ignore_errors=True)
        return reasons


# ------------------------------------------------------------------ VM records


def _process(data: Any) -> ProcessId | None:
    return None if data is None else ProcessId.from_dict(data)


def _proc_dict(pid: ProcessId | None) -> dict[str, int] | None:
    return pid.to_dict() if pid else None


def _guest_to_dict(config: VMConfig | TaskConfig) -> dict[str, Any]:
    """The config fields VMs and tasks share: what the guest is made as, and when."""
    return {
        "environment": config.environment,
        "vcpu_count": config.vcpu_count,
        "mem_mib": config.mem_mib,
        "network": config.network,
        "ttl_seconds": config.ttl_seconds,
        "created_at": config.created_at,
        "expires_at": config.expires_at,
        "backend": config.backend,
    }


def _guest_from_dict(d: dict[str, Any]) -> dict[str, Any]:
    """:func:`_guest_to_dict` read back, each field checked for its type."""
    return {
        "environment": str(d["environment"]),
        "vcpu_count": int(d["vcpu_count"]),
        "mem_mib": int(d["mem_mib"]),
        "network": bool(d["network"]),
        "ttl_seconds": int(d["ttl_seconds"]),
        "created_at": float(d["created_at"]),
        "expires_at": float(d["expires_at"]),
        "backend": str(d["backend"]),
    }


@dataclass(frozen=True)
class VMConfig:
    """What a VM was created as; never changes after create."""

    vm_id: str
    environment: str
    vcpu_count: int
    mem_mib: int
    network: bool
    ttl_seconds: int
    created_at: float
    expires_at: float
    backend: str
    acceleration: str
    owner: ProcessId | None = None  # an ephemeral VM dies with this process
    mounts: tuple[MountSpec, ...] = ()  # done by the guest agent at INIT

    def to_dict(self) -> dict[str, Any]:
        return {
            "vm_id": self.vm_id,
            **_guest_to_dict(self),
            "acceleration": self.acceleration,
            "owner": _proc_dict(self.owner),
            "mounts": [m.to_dict() for m in self.mounts],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMConfig:
        return cls(
            vm_id=str(d["vm_id"]),
            **_guest_from_dict(d),
            acceleration=str(d["acceleration"]),
            owner=_process(d.get("owner")),
            mounts=tuple(MountSpec.from_dict(m) for m in d.get("mounts", [])),
        )


@dataclass(frozen=True)
class VMRuntime:
    """What a VM is doing now; changes with its lifecycle."""

    status: str = "created"  # created | starting | running | stopped | failed
    environment_version: str = ""
    boot: str | None = None  # cold | restored | pooled
    supervisor: ProcessId | None = None
    vmm: ProcessId | None = None
    starter: ProcessId | None = None  # the process starting it (status "starting")
    detail: str | None = None  # why it stopped or failed

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "environment_version": self.environment_version,
            "boot": self.boot,
            "supervisor": _proc_dict(self.supervisor),
            "vmm": _proc_dict(self.vmm),
            "starter": _proc_dict(self.starter),
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMRuntime:
        if d["status"] not in ("created", "starting", "running", "stopped", "failed"):
            raise ValueError(f"unknown VM status {d['status']!r}")
        return cls(
            status=str(d["status"]),
            environment_version=str(d["environment_version"]),
            boot=d.get("boot"),
            supervisor=_process(d.get("supervisor")),
            vmm=_process(d.get("vmm")),
            starter=_process(d.get("starter")),
            detail=d.get("detail"),
        )


@dataclass(frozen=True)
class VMRecord:
    config: VMConfig
    runtime: VMRuntime

    @property
    def record_id(self) -> str:
        return self.config.vm_id

    def with_runtime(self, **changes: Any) -> VMRecord:
        return VMRecord(self.config, replace(self.runtime, **changes))

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "runtime": self.runtime.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VMRecord:
        return cls(VMConfig.from_dict(d["config"]), VMRuntime.from_dict(d["runtime"]))


# ---------------------------------------------------------------- task records

SEED_MODES = ("empty", "directory", "tar_archive")  # workspace.seed.SeedMode


def _seed_from_dict(d: Any) -> SeedResult | None:
    if d is None:
        return None
    # Imported here: the archive code stays off the import path of VM-only callers.
    from pyro_mcp.workspace.seed import SeedResult

    if d["mode"] not in SEED_MODES:
        raise ValueError(f"unknown workspace seed mode {d['mode']!r}")
    return SeedResult(
        mode=d["mode"],
        source_path=None if d["source_path"] is None else str(d["source_path"]),
        destination=str(d["destination"]),
        entry_count=int(d["entry_count"]),
        bytes_written=int(d["bytes_written"]),
        sha256=None if d["sha256"] is None else str(d["sha256"]),
        exclude=tuple(str(p) for p in d.get("exclude", ())),
        seed_ms=int(d.get("seed_ms", 0)),
    )


@dataclass(frozen=True)
class TaskConfig:
    """What a task was created as. ``workspace_seed`` is set once, while the task
    is still "creating" (the record is written before seeding, so that a create
    cut short is found and reaped); nothing changes after create."""

    task_id: str
    environment: str
    vcpu_count: int
    mem_mib: int
    network: bool
    ttl_seconds: int
    created_at: float
    expires_at: float
    backend: str
    execution_mode: str
    workspace_seed: SeedResult | None = None  # None until seeded
    name: str | None = None  # unique among tasks; absent from records made before names

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "name": self.name,
            **_guest_to_dict(self),
            "execution_mode": self.execution_mode,
            "workspace_seed": self.workspace_seed.to_dict() if self.workspace_seed else None,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskConfig:
        return cls(
            task_id=str(d["task_id"]),
            **_guest_from_dict(d),
            execution_mode=str(d["execution_mode"]),
            workspace_seed=_seed_from_dict(d.get("workspace_seed")),
            name=None if d.get("name") is None else str(d["name"]),
        )


@dataclass
class TaskRuntime:
    """What a task is doing now. Mutable, unlike :class:`VMRuntime`: the task code
    updates its fields in place while it holds the task's lock, and saves the record."""

    status: TaskStatus = "creating"  # recorded: creating, then running (VM) or ready
    environment_version: str = ""
    creator: ProcessId | None = None  # the creating process, until create finishes
    acceleration: str | None = None
    vm_id: str | None = None  # the task's current VM (None for host_compat)
    boot: BootKind | None = None
    hostfs: str | None = None  # host_compat: the environment's unpacked root
    detail: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "environment_version": self.environment_version,
            "creator": _proc_dict(self.creator),
            "acceleration": self.acceleration,
            "vm_id": self.vm_id,
            "boot": self.boot,
            "hostfs": self.hostfs,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskRuntime:
        if d["status"] not in get_args(TaskStatus):
            raise ValueError(f"unknown task status {d['status']!r}")
        boot = d.get("boot")
        if boot is not None and boot not in get_args(BootKind):
            raise ValueError(f"unknown boot kind {boot!r}")
        return cls(
            status=d["status"],
            environment_version=str(d["environment_version"]),
            creator=_process(d.get("creator")),
            acceleration=d.get("acceleration"),
            vm_id=d.get("vm_id"),
            boot=cast("BootKind | None", boot),
            hostfs=d.get("hostfs"),
            detail=d.get("detail"),
        )


@dataclass(frozen=True)
class TaskRecord:
    config: TaskConfig
    runtime: TaskRuntime

    @property
    def record_id(self) -> str:
        return self.config.task_id

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "runtime": self.runtime.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TaskRecord:
        return cls(TaskConfig.from_dict(d["config"]), TaskRuntime.from_dict(d["runtime"]))
