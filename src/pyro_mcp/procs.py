"""Small process and log helpers that every layer shares (each lives once, here)."""

from __future__ import annotations

import contextlib
import os
import signal
from collections import deque
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """``preexec_fn``: the child gets SIGKILL when the process that started it dies
    (runs in the child between fork and exec)."""
    import ctypes  # here, not at the top: only VMM launches need it

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def kill_process_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid``; gone or not ours is not an error."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def tail_text(path: Path, max_lines: int = 40, max_bytes: int = 16384) -> str:
    """The last lines of a log file as text ("" if it cannot be read)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    lines: deque[str] = deque(data.decode("utf-8", "replace").splitlines(), maxlen=max_lines)
    return "\n".join(lines).strip()
