"""A task's files: read, write, edit, list, diff against its seed, export.

Each operation resolves its guest path (relative paths are under /workspace;
absolute ones anywhere in the guest), opens a channel to the task's guest agent
(:meth:`TaskManager.files`: a tunnel through the VM's supervisor, or the agent in
the task's bubblewrap sandbox on host_compat) and runs the backend-independent
operation of :mod:`pyro_mcp.workspace.files`, :mod:`~pyro_mcp.workspace.diff` or
:mod:`~pyro_mcp.workspace.export` over it. The host never reads what a guest wrote
except through the agent, and the task's seed only from ``<task>/seed/``, which
pyro wrote and no guest can reach.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable
from pathlib import Path

from pyro_mcp.errors import InvalidInputError
from pyro_mcp.limits import DEFAULT_LIST_ENTRIES, DEFAULT_READ_BYTES, TASK_WORKSPACE
from pyro_mcp.progress import ProgressFn, no_progress
from pyro_mcp.tasks.manager import TaskManager
from pyro_mcp.workspace import diff as diff_ops
from pyro_mcp.workspace import export as export_ops
from pyro_mcp.workspace import files as file_ops
from pyro_mcp.workspace.diff import DiffResult
from pyro_mcp.workspace.export import ExportResult
from pyro_mcp.workspace.files import (
    FileEditResult,
    FileListResult,
    FileReadResult,
    FileStreamResult,
    FileWriteResult,
    guest_path,
)


class TaskFiles:
    """The file operations of the tasks a :class:`TaskManager` keeps."""

    def __init__(self, tasks: TaskManager) -> None:
        self.tasks = tasks

    def read(
        self,
        task_id: str,
        path: str,
        *,
        offset: int = 0,
        max_bytes: int = DEFAULT_READ_BYTES,
        start_line: int | None = None,
        end_line: int | None = None,
        line_numbers: bool = False,
        progress: ProgressFn = no_progress,
    ) -> FileReadResult:
        where = guest_path(path)
        with self.tasks.files(task_id, progress=progress) as (_, channel):
            return file_ops.read_file(
                channel,
                where,
                offset=offset,
                max_bytes=max_bytes,
                start_line=start_line,
                end_line=end_line,
                line_numbers=line_numbers,
            )

    def stream(
        self,
        task_id: str,
        path: str,
        sink: Callable[[bytes], None],
        *,
        offset: int = 0,
        max_bytes: int | None = None,
        progress: ProgressFn = no_progress,
    ) -> FileStreamResult:
        where = guest_path(path)
        with self.tasks.files(task_id, progress=progress) as (_, channel):
            return file_ops.stream_file(channel, where, sink, offset=offset, max_bytes=max_bytes)

    def write(
        self,
        task_id: str,
        path: str,
        data: bytes | Iterable[bytes],
        *,
        mode: int | None = None,
        progress: ProgressFn = no_progress,
    ) -> FileWriteResult:
        where = guest_path(path)
        with self.tasks.files(task_id, progress=progress) as (_, channel):
            return file_ops.write_file(channel, where, data, mode=mode)

    def edit(
        self,
        task_id: str,
        path: str,
        old_text: str,
        new_text: str,
        *,
        replace_all: bool = False,
        progress: ProgressFn = no_progress,
    ) -> FileEditResult:
        where = guest_path(path)
        with self.tasks.files(task_id, progress=progress) as (_, channel):
            return file_ops.edit_file(channel, where, old_text, new_text, replace_all=replace_all)

    def list(
        self,
        task_id: str,
        path: str = TASK_WORKSPACE,
        *,
        recursive: bool = False,
        max_entries: int = DEFAULT_LIST_ENTRIES,
        progress: ProgressFn = no_progress,
    ) -> FileListResult:
        where = guest_path(path)
        with self.tasks.files(task_id, progress=progress) as (_, channel):
            return file_ops.list_files(channel, where, recursive=recursive, max_entries=max_entries)

    def diff(
        self, task_id: str, path: str | None = None, *, progress: ProgressFn = no_progress
    ) -> DiffResult:
        """/workspace against the seed the task was created from (or empty), with the
        task's ``exclude`` patterns applied to both sides."""
        within = _workspace_relative(path)
        seed = self.tasks.seed_folder(task_id)
        with self.tasks.files(task_id, progress=progress) as (record, channel):
            kept = record.config.workspace_seed
            return diff_ops.diff_workspace(
                channel,
                TASK_WORKSPACE,
                seed,
                exclude=kept.exclude if kept else (),
                path=within,
                racy_since=record.config.created_at,
            )

    def export(
        self,
        task_id: str,
        dest: str | Path,
        *,
        path: str = TASK_WORKSPACE,
        overwrite: bool = False,
        progress: ProgressFn = no_progress,
    ) -> ExportResult:
        where = guest_path(path)
        if not isinstance(dest, str | Path) or not str(dest) or "\x00" in str(dest):
            raise InvalidInputError(
                f"dest must be a host path, got {dest!r}",
                hint="pass a folder to create, or a file name ending .tar or .tar.gz",
            )
        with self.tasks.files(task_id, progress=progress) as (_, channel):
            return export_ops.export_tree(
                channel, where, Path(dest), overwrite=overwrite, progress=progress
            )


def _workspace_relative(path: str | None) -> str | None:
    """``path`` as diff takes it: relative to /workspace (absolute paths must be in it)."""
    if path is None or path in ("", ".", TASK_WORKSPACE, TASK_WORKSPACE + "/"):
        return None
    where = guest_path(path)
    if where == TASK_WORKSPACE:
        return None
    if not where.startswith(TASK_WORKSPACE + "/"):
        raise InvalidInputError(
            f"task_diff compares /workspace with its seed; {path!r} is outside it",
            hint="pass a path inside /workspace, or none for all of it",
        )
    return posixpath.relpath(where, TASK_WORKSPACE)
