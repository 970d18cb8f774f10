"""The task file tools: take work back out of a task (read, write, edit, list, diff,
export) and put its /workspace back to the seed (reset)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from pyro_mcp.contract.context import ToolContext, resolve_write_dest
from pyro_mcp.contract.inputs import TaskIdInput, _Input, _task_id
from pyro_mcp.contract.render import _clip
from pyro_mcp.contract.spec import READ_ONLY, TASK_PROFILES, ToolHints, ToolSpec
from pyro_mcp.limits import (
    DEFAULT_LIST_ENTRIES,
    DEFAULT_READ_BYTES,
    MAX_LIST_ENTRIES,
    MAX_READ_BYTES,
    TASK_WORKSPACE,
)
from pyro_mcp.models import TaskResetResult
from pyro_mcp.workspace.diff import DiffResult
from pyro_mcp.workspace.export import ExportResult
from pyro_mcp.workspace.files import (
    FileEditResult,
    FileListResult,
    FileReadResult,
    FileWriteResult,
)

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro

MAX_WRITE_CHARS = 16 << 20  # content of one task_write_file call (a model's text)


def _path(what: str = "The file") -> Any:
    return Field(
        description=f"{what}: relative paths are under /workspace (e.g. 'src/app.py'); "
        "absolute paths anywhere in the guest.",
        min_length=1,
        max_length=4096,
    )


# --------------------------------------------------------------------- inputs


class TaskReadFileInput(_Input):
    task_id: str = _task_id()
    path: str = _path()
    start_line: int | None = Field(
        default=None,
        ge=1,
        description="First line to return (1-based). With end_line, reads just that range.",
    )
    end_line: int | None = Field(
        default=None, ge=1, description="Last line to return (inclusive); omit for the end."
    )
    line_numbers: bool = Field(
        default=False,
        description="Prefix each line with its number (for reading; do not copy the numbers "
        "into task_edit_file's old_text).",
    )
    offset: int = Field(default=0, ge=0, description="Byte offset to start at.")
    max_bytes: int = Field(
        default=DEFAULT_READ_BYTES,
        ge=1,
        le=MAX_READ_BYTES,
        description="Most bytes to return; the result says truncated when the file is longer.",
    )


class TaskWriteFileInput(_Input):
    task_id: str = _task_id()
    path: str = _path()
    content: str = Field(
        description="The whole new content (text, or base64 with encoding='base64').",
        max_length=MAX_WRITE_CHARS,
    )
    encoding: Literal["utf-8", "base64"] = Field(
        default="utf-8", description="'utf-8' for text, 'base64' for binary content."
    )
    mode: str | None = Field(
        default=None,
        pattern=r"^0?[0-7]{3,4}$",
        description="Octal permissions like '0755'; omit to keep an existing file's mode "
        "(0644 for a new file).",
    )


class TaskEditFileInput(_Input):
    task_id: str = _task_id()
    path: str = _path()
    old_text: str = Field(
        min_length=1,
        description="Exact text to replace, including whitespace and indentation; it must "
        "occur exactly once unless replace_all (add surrounding lines to make it unique).",
    )
    new_text: str = Field(description="The replacement text.")
    replace_all: bool = Field(default=False, description="Replace every occurrence.")


class TaskListFilesInput(_Input):
    task_id: str = _task_id()
    path: str = Field(
        default=TASK_WORKSPACE,
        min_length=1,
        max_length=4096,
        description="Folder to list (relative paths are under /workspace).",
    )
    recursive: bool = Field(default=False, description="Include everything below the folder.")
    max_entries: int = Field(
        default=DEFAULT_LIST_ENTRIES,
        ge=1,
        le=MAX_LIST_ENTRIES,
        description="Most entries to return; the result says truncated past it.",
    )


class TaskDiffInput(_Input):
    task_id: str = _task_id()
    path: str | None = Field(
        default=None,
        max_length=4096,
        description="Limit the diff to this file or folder under /workspace; omit for all.",
    )


class TaskExportInput(_Input):
    task_id: str = _task_id()
    dest: str = Field(
        min_length=1,
        max_length=4096,
        description="Host path to write: a new folder, or a file name ending .tar or "
        ".tar.gz. It must lie in a folder this server may write (the client's roots or "
        "--allow-write).",
    )
    path: str = Field(
        default=TASK_WORKSPACE,
        min_length=1,
        max_length=4096,
        description="Guest file or folder to export (default all of /workspace).",
    )
    overwrite: bool = Field(
        default=False, description="Replace an existing non-empty dest instead of refusing."
    )


# -------------------------------------------------------------------- runners


def _run_read(pyro: Pyro, args: TaskReadFileInput, ctx: ToolContext) -> FileReadResult:
    return pyro.read_task_file(
        args.task_id,
        args.path,
        offset=args.offset,
        max_bytes=args.max_bytes,
        start_line=args.start_line,
        end_line=args.end_line,
        line_numbers=args.line_numbers,
    )


def _run_write(pyro: Pyro, args: TaskWriteFileInput, ctx: ToolContext) -> FileWriteResult:
    mode = int(args.mode, 8) if args.mode is not None else None
    return pyro.write_task_file(
        args.task_id, args.path, args.content, encoding=args.encoding, mode=mode
    )


def _run_edit(pyro: Pyro, args: TaskEditFileInput, ctx: ToolContext) -> FileEditResult:
    return pyro.edit_task_file(
        args.task_id, args.path, args.old_text, args.new_text, replace_all=args.replace_all
    )


def _run_list(pyro: Pyro, args: TaskListFilesInput, ctx: ToolContext) -> FileListResult:
    return pyro.list_task_files(
        args.task_id, args.path, recursive=args.recursive, max_entries=args.max_entries
    )


def _run_diff(pyro: Pyro, args: TaskDiffInput, ctx: ToolContext) -> DiffResult:
    return pyro.diff_task(args.task_id, args.path)


def _run_export(pyro: Pyro, args: TaskExportInput, ctx: ToolContext) -> ExportResult:
    dest = resolve_write_dest(args.dest, ctx.write_roots)
    ctx.check_cancelled()
    return pyro.export_task(args.task_id, dest, path=args.path, overwrite=args.overwrite)


def _run_task_reset(pyro: Pyro, args: TaskIdInput, ctx: ToolContext) -> TaskResetResult:
    return pyro.reset_task(args.task_id)


# ------------------------------------------------------------------ rendering


def render_read(result: FileReadResult) -> str:
    more = " (truncated)" if result.truncated else ""
    head = f"{result.path}: {result.size} bytes, {result.encoding}{more}"
    return f"{head}\n{_clip(result.content)}"


def render_write(result: FileWriteResult) -> str:
    return f"wrote {result.bytes_written} bytes to {result.path}"


def render_edit(result: FileEditResult) -> str:
    return f"{result.path}: {result.replacements} replacement(s)\n{result.diff}"


def render_list(result: FileListResult) -> str:
    lines = [f"{e.mode} {e.type:<9} {e.size:>10} {e.path}" for e in result.entries]
    if result.truncated:
        lines.append("(truncated)")
    return "\n".join(lines) or f"{result.path}: empty"


def render_diff(result: DiffResult) -> str:
    return f"{result.summary}\n{_clip(result.patch)}" if result.patch else result.summary


def render_export(result: ExportResult) -> str:
    skipped = f", {len(result.skipped)} skipped" if result.skipped else ""
    return (
        f"exported {result.files} files, {result.directories} folders, {result.symlinks} "
        f"links ({result.bytes} bytes) to {result.dest}{skipped}"
    )


def render_task_reset(result: TaskResetResult) -> str:
    rest = "; everything outside /workspace started fresh" if result.guest_reverted else ""
    return f"{result.task_id}: /workspace reset to its seed ({result.workspace_seed_mode}){rest}"


WRITES_GUEST = ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False)

FILE_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="task_read_file",
        title="Read a file in a task",
        description=(
            "Read a file of a task (relative paths are under /workspace). Text comes back "
            "as text, other bytes as base64 (encoding says which); size and truncated tell "
            "whether there is more. Use start_line/end_line for a range of a long file and "
            "line_numbers to see line numbers. Prefer it to `cat` through task_exec."
        ),
        input_model=TaskReadFileInput,
        output_model=FileReadResult,
        hints=READ_ONLY,
        profiles=TASK_PROFILES,
        run=_run_read,
        render=render_read,
    ),
    ToolSpec(
        name="task_write_file",
        title="Write a file in a task",
        description=(
            "Create or replace a whole file in a task (relative paths are under "
            "/workspace), atomically, creating missing folders; an existing file keeps its "
            "mode unless mode is given. For a small change to an existing file use "
            "task_edit_file instead."
        ),
        input_model=TaskWriteFileInput,
        output_model=FileWriteResult,
        hints=WRITES_GUEST,
        profiles=TASK_PROFILES,
        run=_run_write,
        render=render_write,
    ),
    ToolSpec(
        name="task_edit_file",
        title="Edit a file in a task",
        description=(
            "Replace exact text in a text file of a task: old_text must occur exactly once "
            "(include enough surrounding lines to make it unique) unless replace_all. "
            "Returns the number of replacements and a short diff. An error says how many "
            "matches there were."
        ),
        input_model=TaskEditFileInput,
        output_model=FileEditResult,
        hints=ToolHints(read_only=False, destructive=True, idempotent=False, open_world=False),
        profiles=TASK_PROFILES,
        run=_run_edit,
        render=render_edit,
    ),
    ToolSpec(
        name="task_list_files",
        title="List files in a task",
        description=(
            "List a folder of a task (default /workspace; recursive for everything below "
            "it) with each entry's type, size, mode, mtime and link target."
        ),
        input_model=TaskListFilesInput,
        output_model=FileListResult,
        hints=READ_ONLY,
        profiles=TASK_PROFILES,
        run=_run_list,
        render=render_list,
    ),
    ToolSpec(
        name="task_diff",
        title="Diff a task's workspace against its seed",
        description=(
            "What changed in /workspace since task_create: added, modified, deleted files "
            "and mode changes, with a patch that `git apply` takes on the original folder "
            "(the task's exclude patterns apply). Use it to review or hand over your work."
        ),
        input_model=TaskDiffInput,
        output_model=DiffResult,
        hints=READ_ONLY,
        profiles=TASK_PROFILES,
        run=_run_diff,
        render=render_diff,
    ),
    ToolSpec(
        name="task_export",
        title="Export files from a task to the host",
        description=(
            "Copy a task's /workspace (or one path in it) to a new host folder or a "
            ".tar/.tar.gz archive, inside the folders this server may write. Links that "
            "leave the tree and special files are skipped and listed. Writes on the host: "
            "only when the user asked for the files there."
        ),
        input_model=TaskExportInput,
        output_model=ExportResult,
        # It writes on the host, where the user allowed it: open-world, not idempotent.
        hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=True),
        profiles=TASK_PROFILES,
        run=_run_export,
        render=render_export,
    ),
    ToolSpec(
        name="task_reset",
        title="Reset a task's workspace",
        description=(
            "Put a task's /workspace back exactly as it was created (its seed, or empty), "
            "killing commands still running in it; the task_id stays. On VM backends the "
            "task gets a new VM, so packages installed and files outside /workspace are "
            "gone too (the result's guest_reverted says so). Use it to start an attempt "
            "over; use task_diff first to keep what you changed."
        ),
        input_model=TaskIdInput,
        output_model=TaskResetResult,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=TASK_PROFILES,
        run=_run_task_reset,
        render=render_task_reset,
    ),
)
