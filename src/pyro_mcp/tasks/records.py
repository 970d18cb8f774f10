"""Task records: ``<state>/tasks/<task_id>/task.json`` (atomic, versioned), the
per-task lifecycle lock, and the folder listing the reaper walks.

All of the task record handling is here, in one place, so that it can move to
a shared record store without touching the runtimes or the task manager's logic.
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path
from typing import Any

from pyro_mcp import limits, paths
from pyro_mcp.errors import NotFoundError, StateError
from pyro_mcp.state import read_json, record_lock, remove_orphan_locks, write_json_atomic

RECORD = "task.json"
PREFIX = "task-"


class TaskRecords:
    def __init__(self, tasks_dir: Path) -> None:
        self.tasks_dir = tasks_dir

    def task_dir(self, task_id: str) -> Path:
        return self.tasks_dir / limits.check_task_id(task_id)

    def lock(self, task_id: str) -> contextlib.AbstractContextManager[None]:
        """The task's lifecycle lock (the id is checked before it names a file)."""
        task_dir = self.task_dir(task_id)
        return record_lock(self.tasks_dir / f".{task_id}.lock", task_dir)

    def ensure_root(self) -> None:
        try:
            paths.ensure_private_dir(self.tasks_dir)
        except OSError as exc:
            raise StateError(
                f"cannot create the task state folder {self.tasks_dir}: {exc.strerror}",
                hint="set PYRO_STATE_DIR to a writable folder",
            ) from exc

    def load(self, task_id: str) -> dict[str, Any]:
        try:
            return self.read(self.task_dir(task_id))
        except FileNotFoundError:
            raise NotFoundError(
                f"task {task_id} does not exist (it may have been deleted, or reaped after "
                "its TTL)",
                hint="list tasks with `pyro task list`",
            ) from None

    @staticmethod
    def read(task_dir: Path) -> dict[str, Any]:
        """The record in ``task_dir``; FileNotFoundError or StateError as they come."""
        return read_json(task_dir / RECORD)

    def save(self, record: dict[str, Any]) -> None:
        write_json_atomic(self.tasks_dir / record["task_id"] / RECORD, record)

    def remove(self, task_id: str) -> None:
        """The task's folder, with its workspace."""
        shutil.rmtree(self.tasks_dir / task_id, ignore_errors=True)

    def remove_lock(self, task_id: str) -> None:
        with contextlib.suppress(OSError):
            (self.tasks_dir / f".{task_id}.lock").unlink(missing_ok=True)

    def task_dirs(self) -> list[Path]:
        try:
            return sorted(
                d for d in self.tasks_dir.iterdir() if d.is_dir() and d.name.startswith(PREFIX)
            )
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StateError(
                f"cannot read the task state folder {self.tasks_dir}: {exc.strerror}",
                hint="check its permissions, or set PYRO_STATE_DIR",
            ) from exc

    def remove_orphan_locks(self) -> None:
        remove_orphan_locks(self.tasks_dir, PREFIX)
