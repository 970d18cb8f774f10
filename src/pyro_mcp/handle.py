"""A task as an object: ``with pyro.task("debian:12") as task: task.exec("make")``.

:class:`Task` is a thin handle over :class:`~pyro_mcp.api.Pyro`: every method calls
the ``Pyro`` method of the same meaning with the task's id and forwards its keyword
options unchanged, so an option added there works here at once. Leaving a ``with``
block deletes the task (after an exception too) unless the handle was made with
``keep=True``. The same handle for asyncio is :class:`pyro_mcp.aio.AsyncTask`.

Method to ``Pyro`` method (:data:`TASK_METHODS`, checked by the tests):
``exec`` exec_task, ``read_file`` read_task_file, ``read_bytes`` read_task_bytes,
``write_file`` write_task_file, ``edit_file`` edit_task_file, ``list_files``
list_task_files, ``diff`` diff_task, ``export`` export_task, ``reset`` reset_task,
``status`` status_task, ``delete`` delete_task.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from pyro_mcp.errors import NotFoundError, PyroError

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro
    from pyro_mcp.models import TaskDeleteResult, TaskExecResult, TaskInfo, TaskResetResult
    from pyro_mcp.workspace.diff import DiffResult
    from pyro_mcp.workspace.export import ExportResult
    from pyro_mcp.workspace.files import (
        FileEditResult,
        FileListResult,
        FileReadResult,
        FileWriteResult,
    )

#: Handle method -> the ``Pyro`` method it calls (first argument: the task id).
TASK_METHODS = {
    "exec": "exec_task",
    "read_file": "read_task_file",
    "read_bytes": "read_task_bytes",
    "write_file": "write_task_file",
    "edit_file": "edit_task_file",
    "list_files": "list_task_files",
    "diff": "diff_task",
    "export": "export_task",
    "reset": "reset_task",
    "status": "status_task",
    "delete": "delete_task",
}


class Task:
    """One persistent task. Get it from :meth:`Pyro.task` (a new task) or
    :meth:`Pyro.get_task` (an existing one); ``task_id`` and ``info`` (its
    :class:`~pyro_mcp.TaskInfo` when last looked at) say which."""

    def __init__(self, pyro: Pyro, info: TaskInfo, *, keep: bool = False) -> None:
        self.pyro = pyro
        self.info = info
        self.keep = keep
        self._deleted = False

    @property
    def task_id(self) -> str:
        return self.info.task_id

    def __repr__(self) -> str:
        return f"Task({self.task_id!r}, environment={self.info.environment!r})"

    def __enter__(self) -> Task:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.keep or self._deleted:
            return
        if exc is None:
            with contextlib.suppress(NotFoundError):  # already gone is fine
                self.delete()
            return
        # The block's own exception is what the caller needs to see.
        with contextlib.suppress(PyroError):
            self.delete()

    # -- commands -------------------------------------------------------------
    def exec(self, /, command: str | Sequence[str], **options: Any) -> TaskExecResult:
        """Run one command in the task (:meth:`Pyro.exec_task`; options: ``timeout_seconds``,
        ``cwd``, ``env``, ``stdout_cap``, ``stderr_cap``, ``stdin``, ...; an unset
        ``timeout_seconds`` is the configured default, docs/config.md). A failing
        command is a normal result (its ``exit_code``), not an exception.

        Raises:
            InvalidInputError: a bad command or option.
            NotFoundError: the task does not exist (deleted, or reaped after its TTL).
            VMStateError, BootError, GuestProtocolError: the task's VM could not be
                (re)started or answered wrongly.
            BackendUnavailableError: no backend can run the task.
        """
        options.setdefault("timeout_seconds", self.pyro.settings.timeout_seconds)
        return self.pyro.exec_task(self.task_id, command, **options)

    # -- files ----------------------------------------------------------------
    def read_file(self, /, path: str, **options: Any) -> FileReadResult:
        """Read a file of the task (:meth:`Pyro.read_task_file`).

        Raises:
            InvalidInputError: a bad path or option, or a path that is not a file.
            NotFoundError: the task or the file does not exist.
            VMStateError, GuestProtocolError: the task's VM could not be reached.
        """
        return self.pyro.read_task_file(self.task_id, path, **options)

    def read_bytes(self, path: str, *args: Any, **options: Any) -> bytes:
        """A file's exact bytes, or streamed into a sink (:meth:`Pyro.read_task_bytes`).

        Raises:
            InvalidInputError: a bad path or option, or a path that is not a file.
            NotFoundError: the task or the file does not exist.
            VMStateError, GuestProtocolError: the task's VM could not be reached.
        """
        return self.pyro.read_task_bytes(self.task_id, path, *args, **options)

    def write_file(self, /, path: str, content: Any, **options: Any) -> FileWriteResult:
        """Write a file of the task atomically (:meth:`Pyro.write_task_file`).

        Raises:
            InvalidInputError: a bad path, content, encoding or mode.
            NotFoundError: the task does not exist.
            LimitError: the content is larger than a task file may be.
            VMStateError, GuestProtocolError: the task's VM could not be reached.
        """
        return self.pyro.write_task_file(self.task_id, path, content, **options)

    def edit_file(
        self, /, path: str, old_text: str, new_text: str, **options: Any
    ) -> FileEditResult:
        """Replace text in a text file of the task (:meth:`Pyro.edit_task_file`).

        Raises:
            InvalidInputError: ``old_text`` is missing, or not unique without
                ``replace_all``, or the file is not text.
            NotFoundError: the task or the file does not exist.
            VMStateError, GuestProtocolError: the task's VM could not be reached.
        """
        return self.pyro.edit_task_file(self.task_id, path, old_text, new_text, **options)

    def list_files(self, *args: Any, **options: Any) -> FileListResult:
        """A folder's entries, /workspace by default (:meth:`Pyro.list_task_files`).

        Raises:
            InvalidInputError: a bad path or option, or a path that is not a folder.
            NotFoundError: the task or the folder does not exist.
            VMStateError, GuestProtocolError: the task's VM could not be reached.
        """
        return self.pyro.list_task_files(self.task_id, *args, **options)

    def diff(self, *args: Any, **options: Any) -> DiffResult:
        """What changed in /workspace since creation (:meth:`Pyro.diff_task`).

        Raises:
            InvalidInputError: a bad path.
            NotFoundError: the task does not exist.
            VMStateError, GuestProtocolError: the task's VM could not be reached.
        """
        return self.pyro.diff_task(self.task_id, *args, **options)

    def export(self, /, dest: str | Path, **options: Any) -> ExportResult:
        """Copy files out of the task to ``dest`` on the host (:meth:`Pyro.export_task`).

        Raises:
            InvalidInputError: a bad path or ``dest`` (e.g. it exists without
                ``overwrite=True``).
            NotFoundError: the task or the path does not exist.
            VMStateError, GuestProtocolError: the task's VM could not be reached.
        """
        return self.pyro.export_task(self.task_id, dest, **options)

    # -- lifecycle ------------------------------------------------------------
    def reset(self, /, **options: Any) -> TaskResetResult:
        """Put /workspace back to its seed (:meth:`Pyro.reset_task`).

        Raises:
            NotFoundError: the task does not exist.
            VMStateError, BootError: the task's new VM could not be started.
            BackendUnavailableError: no backend can run the task.
        """
        result = self.pyro.reset_task(self.task_id, **options)
        self.status()
        return result

    def status(self, /, **options: Any) -> TaskInfo:
        """The task as it is now (:meth:`Pyro.status_task`); also updates ``info``.

        Raises:
            NotFoundError: the task does not exist.
            StateError: its record on disk is unreadable.
        """
        self.info = self.pyro.status_task(self.task_id, **options)
        return self.info

    def delete(self, /, **options: Any) -> TaskDeleteResult:
        """Stop the task's VM and remove it with its workspace (:meth:`Pyro.delete_task`).
        Leaving a ``with`` block does this (unless ``keep``).

        Raises:
            NotFoundError: the task does not exist (already deleted, or reaped).
            StateError: its record on disk is unreadable.
        """
        result = self.pyro.delete_task(self.task_id, **options)
        self._deleted = True
        return result


def create(pyro: Pyro, environment: str, *, keep: bool, **options: Any) -> Task:
    """:meth:`Pyro.task`'s body: create the task, wrap it."""
    return Task(pyro, pyro.create_task(environment, **options), keep=keep)


def get(pyro: Pyro, task_id: str, *, keep: bool) -> Task:
    """:meth:`Pyro.get_task`'s body."""
    return Task(pyro, pyro.status_task(task_id), keep=keep)


__all__ = ["TASK_METHODS", "Task"]
