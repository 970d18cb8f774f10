"""A VM's console log (``<state>/vms/<vm_id>/console.log``), read whole, by its last
lines, or followed as it grows until the VM ends. A task's log is its current VM's."""

from __future__ import annotations

import codecs
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from pyro_mcp.errors import NotFoundError, StateError, VMStateError
from pyro_mcp.limits import ID_HEX_PREFIX
from pyro_mcp.manager import VMManager
from pyro_mcp.tasks import TaskManager

CONSOLE = "console.log"
_CHUNK = 64 << 10


def vm_of(vms: VMManager, tasks: TaskManager, ref: str) -> str:
    """The VM whose console ``ref`` names: a VM id or prefix (``vm-...``), or a task
    (id, prefix or name), whose current VM it is. Hex digits alone are tried as a
    task prefix first, then as a VM prefix."""
    if isinstance(ref, str) and ref.startswith("vm-"):
        return vms.records.resolve(ref)
    try:
        task_id = tasks.resolve(ref)
    except NotFoundError:
        if isinstance(ref, str) and ID_HEX_PREFIX.fullmatch(ref):
            return vms.records.resolve(ref)
        raise
    record = tasks.records.load(task_id)
    if record.runtime.vm_id is None:
        raise VMStateError(
            f"task {task_id} has no VM ({record.config.execution_mode}), so no console log",
            hint="only tasks on a VM backend (qemu, gvisor) have one",
        )
    vm_id = record.runtime.vm_id
    if not vms.records.folder(vm_id).is_dir():
        raise VMStateError(
            f"task {task_id}'s VM {vm_id} is gone, and its console log with it",
            hint="its next `pyro task exec` starts a new VM; `pyro logs` then shows that one's",
        )
    return vm_id


def console_path(vms: VMManager, vm_id: str) -> Path:
    path = vms.records.folder(vm_id) / CONSOLE
    if not path.parent.is_dir():
        raise vms.records.not_found(vm_id)
    return path


def tail(path: Path, lines: int | None) -> str:
    """The file's last ``lines`` lines (all of it when None), as text."""
    try:
        with path.open("rb") as fh:
            if lines is None:
                data = fh.read()
            else:
                end = fh.seek(0, os.SEEK_END)
                start = end
                data = b""
                # Read back block by block until there are lines + 1 line breaks.
                while start > 0 and data.count(b"\n") <= lines:
                    start = max(0, start - _CHUNK)
                    fh.seek(start)
                    data = fh.read(end - start)
                kept = data.splitlines(keepends=True)
                data = b"".join(kept[-lines:]) if lines > 0 else b""
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise StateError(f"cannot read {path}: {exc.strerror or exc}") from None
    return data.decode("utf-8", "replace")


def follow(
    path: Path,
    alive: Callable[[], bool],
    *,
    lines: int | None = 10,
    poll_s: float = 0.2,
) -> Iterator[str]:
    """The last ``lines`` lines, then text as it is appended, until ``alive()`` says
    the VM ended (what it wrote before that is still given)."""
    start_text = tail(path, lines)
    try:
        offset = path.stat().st_size
    except FileNotFoundError:
        offset = 0
    if start_text:
        yield start_text
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    while True:
        running = alive()  # asked before reading: nothing written before the end is lost
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read()
        except FileNotFoundError:
            data = b""
        if data:
            offset += len(data)
            text = decoder.decode(data)
            if text:
                yield text
        if not running:
            rest = decoder.decode(b"", final=True)
            if rest:
                yield rest
            return
        if not data:
            time.sleep(poll_s)


def vm_alive(vms: VMManager, vm_id: str) -> Callable[[], bool]:
    def alive() -> bool:
        try:
            return vms.status(vm_id).status in ("running", "starting")
        except (NotFoundError, StateError):
            return False

    return alive
