"""On-disk state: atomic, versioned JSON records and process identities.

Every record is written to a temporary file in the same folder and renamed
over the old one, so a reader never sees half a file. Each record carries
``schema``; a record of another schema is refused, not guessed at.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from pyro_mcp import fsio
from pyro_mcp.errors import StateError

SCHEMA_VERSION = 2  # 2: records split into config and runtime (pyro_mcp.records)


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write a record (private to the user) with this version's ``schema``."""
    payload = json.dumps({"schema": SCHEMA_VERSION, **data}, indent=2, sort_keys=True)
    fsio.write_bytes_atomic(path, payload.encode("utf-8"), mode=0o600)


def read_json(path: Path) -> dict[str, Any]:
    """A record of this version's schema, without its ``schema`` field.

    FileNotFoundError passes through; an unreadable record or one of another schema
    is a StateError naming the folder to remove.
    """
    data = fsio.read_json_object(path, hint=f"remove {path.parent} to discard it")
    if data.get("schema") != SCHEMA_VERSION:
        raise StateError(
            f"state file {path} has schema {data.get('schema')!r}, expected {SCHEMA_VERSION}",
            hint=f"it was written by another pyro-mcp version; remove {path.parent} to discard it",
        )
    data.pop("schema")
    return data


@contextlib.contextmanager
def record_lock(lock_path: Path, record_dir: Path) -> Iterator[None]:
    """Hold a record's cross-process lifecycle lock; the lock file goes once the
    record's folder is gone (also for ids that never existed)."""
    try:
        with FileLock(str(lock_path)):
            yield
    finally:
        if not record_dir.exists():
            with contextlib.suppress(FileNotFoundError):
                lock_path.unlink()


def remove_orphan_locks(folder: Path, prefix: str) -> None:
    """Remove ``.<prefix>*.lock`` files in ``folder`` whose record folder is gone
    (e.g. a VM reaped by its own supervisor)."""
    with contextlib.suppress(OSError):
        for lock_path in folder.glob(f".{prefix}*.lock"):
            if not (folder / lock_path.name[1:-5]).exists():
                lock_path.unlink(missing_ok=True)


@dataclass(frozen=True)
class ProcessId:
    """A process named by pid *and* start time, so a reused pid is not mistaken for it."""

    pid: int
    start_time: int

    @classmethod
    def of(cls, pid: int) -> ProcessId | None:
        start = process_start_time(pid)
        return None if start is None else cls(pid, start)

    def alive(self) -> bool:
        return process_start_time(self.pid) == self.start_time

    def to_dict(self) -> dict[str, int]:
        return {"pid": self.pid, "start_time": self.start_time}

    @classmethod
    def from_dict(cls, data: Any) -> ProcessId | None:
        if not isinstance(data, dict):
            return None
        try:
            return cls(int(data["pid"]), int(data["start_time"]))
        except (KeyError, TypeError, ValueError):
            return None


def process_start_time(pid: int) -> int | None:
    """Start time in clock ticks since boot (field 22 of /proc/PID/stat), None if gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses.
    fields = stat.rpartition(")")[2].split()
    try:
        if fields[0] == "Z":
            return None
        return int(fields[19])
    except (IndexError, ValueError):
        return None
