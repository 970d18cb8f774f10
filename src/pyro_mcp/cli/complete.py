"""Shell completion: ``pyro completion bash|zsh|fish`` prints the script, and the
arguments that name things complete from what is on this machine, read straight from
the cache and state folders (no VM, no lock, no reaping: a completion must be quick
and harmless).

    source <(pyro completion bash)       # ~/.bashrc
    source <(pyro completion zsh)        # ~/.zshrc
    pyro completion fish | source        # ~/.config/fish/config.fish
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

import click

if TYPE_CHECKING:
    from click.shell_completion import ShellComplete

COMPLETE_VAR = "_PYRO_COMPLETE"
SHELLS = ("bash", "zsh", "fish")


def register_shells() -> None:
    """Give click our bash completion (names with ':' such as ``debian:12``). Called only
    when completing or printing a script, so a plain ``pyro`` run does not import
    click's completion machinery."""
    from click.shell_completion import add_completion_class

    add_completion_class(_colon_safe_bash(), "bash")


def _colon_safe_bash() -> type[ShellComplete]:
    from click.shell_completion import BashComplete, CompletionItem, split_arg_string

    class ColonSafeBashComplete(BashComplete):
        """bash splits words at ':' (``COMP_WORDBREAKS``), so ``debian:12`` reaches click as
        three words and would complete nothing. The script also passes ``COMP_LINE`` and
        ``COMP_POINT``; the words are taken from the line itself, and a candidate is
        answered without the part of the word bash already has up to its last ':'."""

        source_template = BashComplete.source_template.replace(
            'env COMP_WORDS="${COMP_WORDS[*]}"',
            'env COMP_LINE="$COMP_LINE" COMP_POINT="$COMP_POINT" COMP_WORDS="${COMP_WORDS[*]}"',
        )
        _trim = ""

        def get_completion_args(self) -> tuple[list[str], str]:
            line = os.environ.get("COMP_LINE")
            point = os.environ.get("COMP_POINT", "")
            if line is None or not point.isdigit():
                return super().get_completion_args()
            before = line[: int(point)]
            words = split_arg_string(before)
            incomplete = "" if not before or before[-1].isspace() or not words else words.pop()
            if ":" in incomplete and ":" in os.environ.get("COMP_WORDBREAKS", ":"):
                self._trim = incomplete.rpartition(":")[0] + ":"
            return words[1:], incomplete

        def format_completion(self, item: CompletionItem) -> str:
            if self._trim and item.value.startswith(self._trim):
                item = CompletionItem(item.value[len(self._trim) :], type=item.type, help=item.help)
            return super().format_completion(item)

    return ColonSafeBashComplete


def environment_names() -> list[str]:
    """The catalog's names and those installed in the cache, sorted."""
    from pyro_mcp import paths
    from pyro_mcp.environments.catalog import CATALOG

    names = set(CATALOG)
    folder = paths.cache_dir() / "environments"
    try:
        for entry in folder.iterdir():
            name, at, _version = unquote(entry.name).rpartition("@")
            if at and name and not entry.name.startswith("."):
                names.add(name)
    except OSError:
        pass
    return sorted(names)


def _record_ids(folder: Path, pattern: re.Pattern[str]) -> list[str]:
    try:
        return sorted(e.name for e in folder.iterdir() if pattern.fullmatch(e.name))
    except OSError:
        return []


def task_ids() -> list[str]:
    """The ids of the tasks in the state folder (``PYRO_STATE_DIR`` or the default)."""
    from pyro_mcp import limits, paths

    return _record_ids(paths.state_dir() / "tasks", limits.TASK_ID)


def vm_ids() -> list[str]:
    """The ids of the VMs in the state folder."""
    from pyro_mcp import limits, paths

    return _record_ids(paths.state_dir() / "vms", limits.VM_ID)


def _matching(words: list[str], incomplete: str) -> list[str]:
    return [w for w in words if w.startswith(incomplete)]


def complete_environment(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return _matching(environment_names(), incomplete)


def complete_task_id(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return _matching(task_ids(), incomplete)


def complete_vm_id(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    return _matching(vm_ids(), incomplete)


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
@click.option("--json", "as_json", is_flag=True, help='Print {"shell", "script"} as JSON.')
def completion(shell: str, as_json: bool) -> None:
    """Print the completion script for SHELL: commands, options, environment names,
    task and VM ids complete on Tab.

    \b
    bash:  source <(pyro completion bash)     (in ~/.bashrc)
    zsh:   source <(pyro completion zsh)      (in ~/.zshrc, after compinit)
    fish:  pyro completion fish | source      (in ~/.config/fish/config.fish)
    """
    from click.shell_completion import get_completion_class

    register_shells()
    root = click.get_current_context().find_root().command
    cls = get_completion_class(shell)
    if cls is None:  # pragma: no cover - click ships all three
        raise click.BadParameter(f"no completion for {shell}", param_hint="SHELL")
    script = cls(root, {}, "pyro", COMPLETE_VAR).source()
    if as_json:
        click.echo(json.dumps({"shell": shell, "script": script}, indent=2))
    else:
        click.echo(script)
