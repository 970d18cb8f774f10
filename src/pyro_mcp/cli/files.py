"""``pyro task read|write|edit|files|diff|export|reset``: take work back out of a task.

Attached to the ``task`` group by :mod:`pyro_mcp.cli.app`. ``files`` lists, so it
does not clash with ``pyro task list``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pyro_mcp import limits
from pyro_mcp.cli.common import (
    StderrProgress,
    emit,
    fail,
    json_option,
    make_pyro,
    print_table,
    quiet_option,
)
from pyro_mcp.cli.complete import complete_task_id
from pyro_mcp.errors import InvalidInputError, PyroError
from pyro_mcp.limits import TASK_WORKSPACE


@click.command("read")
@click.argument("task_id", shell_complete=complete_task_id)
@click.argument("path")
@click.option("--offset", type=click.IntRange(min=0), default=0, help="Byte offset to start at.")
@click.option("--max-bytes", type=click.IntRange(min=1), default=None, help="Most bytes to read.")
@click.option(
    "--start-line", type=click.IntRange(min=1), default=None, help="First line (1-based)."
)
@click.option("--end-line", type=click.IntRange(min=1), default=None, help="Last line (inclusive).")
@click.option("--line-numbers", is_flag=True, help="Prefix lines with their numbers.")
@json_option
def task_read(
    task_id: str,
    path: str,
    offset: int,
    max_bytes: int | None,
    start_line: int | None,
    end_line: int | None,
    line_numbers: bool,
    as_json: bool,
) -> None:
    """Write a file of TASK_ID to stdout, byte for byte (PATH relative to /workspace).

    With --json, or a line range, prints the text view a model gets instead.
    """
    pyro = make_pyro()
    try:
        if as_json or start_line or end_line or line_numbers:
            kw = {"max_bytes": max_bytes} if max_bytes else {}
            result = pyro.read_task_file(
                task_id,
                path,
                offset=offset,
                start_line=start_line,
                end_line=end_line,
                line_numbers=line_numbers,
                **kw,
            )
            if as_json:
                emit(result)
            else:
                sys.stdout.write(result.content)
            return
        out = sys.stdout.buffer
        pyro.read_task_bytes(task_id, path, out.write, offset=offset, max_bytes=max_bytes)
        out.flush()
    except PyroError as exc:
        fail(exc, as_json)


@click.command("write")
@click.argument("task_id", shell_complete=complete_task_id)
@click.argument("path")
@click.option(
    "--from",
    "source",
    type=click.Path(exists=True, dir_okay=False, readable=True, path_type=Path),
    default=None,
    help="Host file to copy in (default: stdin).",
)
@click.option("--mode", default=None, metavar="OCTAL", help="Permissions, e.g. 0755.")
@json_option
def task_write(
    task_id: str, path: str, source: Path | None, mode: str | None, as_json: bool
) -> None:
    """Write PATH in TASK_ID (relative to /workspace) from stdin or --from FILE,
    atomically, creating parent folders."""
    try:
        file_mode = _octal_mode(mode)
        pyro = make_pyro()
        if source is not None:
            with source.open("rb") as fh:
                result = pyro.write_task_file(task_id, path, fh, mode=file_mode)
        else:
            if sys.stdin is None or sys.stdin.isatty():
                raise InvalidInputError(
                    "nothing to write: stdin is a terminal",
                    hint=f"pipe the content in (`... | pyro task write {task_id} {path}`) "
                    "or pass --from FILE",
                )
            result = pyro.write_task_file(task_id, path, sys.stdin.buffer, mode=file_mode)
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(result)
    else:
        click.echo(f"wrote {result.bytes_written} bytes to {result.path}", err=True)


def _octal_mode(mode: str | None) -> int | None:
    if mode is None:
        return None
    try:
        value = int(mode, 8)
    except ValueError:
        value = -1
    if not 0 <= value <= 0o7777:
        raise InvalidInputError(
            f"--mode {mode!r} is not an octal file mode", hint="e.g. --mode 0644 or --mode 755"
        )
    return value


@click.command("edit")
@click.argument("task_id", shell_complete=complete_task_id)
@click.argument("path")
@click.option("--old", "old_text", required=True, help="Exact text to replace (once).")
@click.option("--new", "new_text", required=True, help="Replacement text.")
@click.option("--replace-all", is_flag=True, help="Replace every occurrence.")
@json_option
def task_edit(
    task_id: str, path: str, old_text: str, new_text: str, replace_all: bool, as_json: bool
) -> None:
    """Replace exact text in a text file of TASK_ID; prints the diff of the change."""
    try:
        result = make_pyro().edit_task_file(
            task_id, path, old_text, new_text, replace_all=replace_all
        )
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(result)
    else:
        click.echo(result.diff, nl=not result.diff.endswith("\n"))


@click.command("files")
@click.argument("task_id", shell_complete=complete_task_id)
@click.argument("path", default=TASK_WORKSPACE)
@click.option("-r", "--recursive", is_flag=True, help="Everything below PATH.")
@click.option(
    "--max-entries",
    type=click.IntRange(1, limits.MAX_LIST_ENTRIES),
    default=limits.DEFAULT_LIST_ENTRIES,
    show_default=True,
    help="Stop after this many entries.",
)
@quiet_option
@json_option
def task_files(
    task_id: str, path: str, recursive: bool, max_entries: int, quiet: bool, as_json: bool
) -> None:
    """List PATH (default /workspace) in TASK_ID.

    Columns: MODE TYPE SIZE MTIME (UTC) PATH ("no files" on stderr for an empty
    folder). -q prints only the paths; --json prints the `task_list_files` answer.
    """
    try:
        result = make_pyro().list_task_files(
            task_id, path, recursive=recursive, max_entries=max_entries
        )
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(result)
        return
    if quiet:
        for e in result.entries:
            click.echo(e.path)
    else:
        rows = [
            (
                e.mode,
                e.type,
                str(e.size),
                e.mtime,
                e.path + (f" -> {e.link_target}" if e.link_target is not None else ""),
            )
            for e in result.entries
        ]
        print_table(("MODE", "TYPE", "SIZE", "MTIME", "PATH"), rows, empty="no files")
    if result.truncated:
        click.echo(f"pyro: listing cut at {max_entries} entries (--max-entries)", err=True)


@click.command("diff")
@click.argument("task_id", shell_complete=complete_task_id)
@click.argument("path", required=False)
@json_option
def task_diff(task_id: str, path: str | None, as_json: bool) -> None:
    """Print what changed in TASK_ID's /workspace since create, as a patch for the
    original folder (summary on stderr):

        pyro task diff ID > fix.patch && git apply fix.patch
    """
    try:
        result = make_pyro().diff_task(task_id, path)
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(result)
        return
    sys.stdout.write(result.patch)
    sys.stdout.flush()
    click.echo(f"pyro: {result.summary}", err=True)
    for skipped in result.skipped:
        click.echo(f"pyro: not in the patch: {skipped.path} ({skipped.reason})", err=True)
    if result.truncated:
        click.echo("pyro: the patch was cut at its size cap (at a file boundary)", err=True)


@click.command("export")
@click.argument("task_id", shell_complete=complete_task_id)
@click.argument("dest", type=click.Path(path_type=Path))
@click.option("--path", default=TASK_WORKSPACE, show_default=True, help="Guest path to export.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty DEST.")
@json_option
def task_export(task_id: str, dest: Path, path: str, overwrite: bool, as_json: bool) -> None:
    """Copy TASK_ID's /workspace (or --path) to DEST: a new folder, or a file ending
    .tar or .tar.gz. Links that leave the tree and special files are skipped."""
    progress = StderrProgress()
    try:
        result = make_pyro(progress).export_task(task_id, dest, path=path, overwrite=overwrite)
    except PyroError as exc:
        progress.close()
        fail(exc, as_json)
    progress.close()
    if as_json:
        emit(result)
        return
    click.echo(
        f"exported {result.files} files, {result.directories} folders, {result.symlinks} "
        f"links ({result.bytes} bytes) to {result.dest}"
    )
    for skipped in result.skipped:
        click.echo(f"pyro: skipped {skipped.path}: {skipped.reason}", err=True)


@click.command("reset")
@click.argument("task_id", shell_complete=complete_task_id)
@json_option
def task_reset(task_id: str, as_json: bool) -> None:
    """Put TASK_ID's /workspace back to its seed, killing what runs in it.

    On VM backends this is a new VM: packages installed and files outside
    /workspace are gone too.
    """
    progress = StderrProgress()
    try:
        result = make_pyro(progress).reset_task(task_id)
    except PyroError as exc:
        progress.close()
        fail(exc, as_json)
    progress.close()
    if as_json:
        emit(result)
        return
    rest = "; everything outside /workspace started fresh" if result.guest_reverted else ""
    click.echo(f"reset {task_id} to its seed ({result.workspace_seed_mode}){rest}")


COMMANDS: tuple[click.Command, ...] = (
    task_read,
    task_write,
    task_edit,
    task_files,
    task_diff,
    task_export,
    task_reset,
)
