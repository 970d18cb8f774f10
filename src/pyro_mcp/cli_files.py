"""``pyro task read|write|edit|files|diff|export|reset``: take work back out of a task.

Registered on the ``task`` group by :mod:`pyro_mcp.cli` (kept apart so the main CLI
module stays a table of command groups). ``files`` lists, so it does not clash with
``pyro task list``.
"""

from __future__ import annotations

import click

from pyro_mcp.cli import StderrProgress, _emit, _fail, _pyro, json_option
from pyro_mcp.errors import PyroError


@click.command("reset")
@click.argument("task_id")
@json_option
def task_reset(task_id: str, as_json: bool) -> None:
    """Put TASK_ID's /workspace back to its seed, killing what runs in it.

    On VM backends this is a new VM: packages installed and files outside
    /workspace are gone too.
    """
    progress = StderrProgress()
    try:
        result = _pyro(progress).reset_task(task_id)
    except PyroError as exc:
        progress.close()
        _fail(exc, as_json)
    progress.close()
    if as_json:
        _emit(result)
        return
    rest = "; everything outside /workspace started fresh" if result.guest_reverted else ""
    click.echo(f"reset {task_id} to its seed ({result.workspace_seed_mode}){rest}")


COMMANDS: tuple[click.Command, ...] = (task_reset,)
