"""Running the host tools environment builds use (apt, dpkg, mmdebstrap, mkfs, ...).

Every failure becomes an :class:`EnvironmentBuildError` naming the step, with
the tool's last output lines in ``details.output_tail``; a missing tool says
which and how to install it (``details.missing_tool``). Also here: removing a
build tree safely (:func:`remove_tree`), which may have to unmount first.

This module imports nothing else from :mod:`pyro_mcp.environments`: the kernel,
rootfs and store modules all build on it.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyro_mcp.errors import EnvironmentBuildError
from pyro_mcp.progress import ProgressEvent, ProgressFn

_OUTPUT_TAIL_LINES = 20
_STREAM_TAIL_LINES = 40


def is_root() -> bool:
    return os.geteuid() == 0


def tail_lines(text: str, count: int = _OUTPUT_TAIL_LINES) -> list[str]:
    return text.strip().splitlines()[-count:]


def _missing_tool(argv: Sequence[str], what: str, hint: str | None) -> EnvironmentBuildError:
    return EnvironmentBuildError(
        f"cannot {what}: {argv[0]} is not installed",
        hint=hint or f"install the package that provides {argv[0]}",
        details={"command": list(argv), "missing_tool": argv[0]},
    )


def run_tool(
    argv: Sequence[str],
    *,
    what: str,
    cwd: Path | None = None,
    hint: str | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a host tool to completion; translate failures into EnvironmentBuildError.

    ``what`` names the step for the message ("download the kernel package").
    """
    try:
        proc = subprocess.run(
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            env=None if env is None else dict(env),
        )
    except FileNotFoundError:
        raise _missing_tool(argv, what, hint) from None
    if proc.returncode != 0:
        raise EnvironmentBuildError(
            f"cannot {what}: {' '.join(argv)} exited with status {proc.returncode}",
            hint=hint,
            details={
                "command": list(argv),
                "returncode": proc.returncode,
                "output_tail": tail_lines(proc.stdout + proc.stderr),
            },
        )
    return proc


def stream_tool(
    argv: Sequence[str],
    *,
    what: str,
    progress: ProgressFn,
    stage: str,
    steps: Sequence[str] = (),
    hint: str | None = None,
) -> list[str]:
    """Run ``argv``, turning its ``I: <message>`` lines into progress; return the output tail.

    For long tools (a bootstrap takes tens of seconds). A message that starts
    with the n-th of ``steps`` is reported as step n of ``len(steps)``.
    """
    tail: deque[str] = deque(maxlen=_STREAM_TAIL_LINES)
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        )
    except FileNotFoundError:
        raise _missing_tool(argv, what, f"apt-get install {argv[0]}") from None
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = raw.rstrip()
            tail.append(line)
            if line.startswith("I: "):
                message = line[3:].rstrip(".")
                step = next((i for i, s in enumerate(steps, 1) if message.startswith(s)), None)
                progress(
                    ProgressEvent(
                        stage,
                        message,
                        completed=None if step is None else float(step),
                        total=None if step is None else float(len(steps)),
                    )
                )
    if proc.returncode != 0:
        raise EnvironmentBuildError(
            f"cannot {what}: {argv[0]} exited with status {proc.returncode}",
            hint=hint,
            details={"command": list(argv), "output_tail": list(tail)},
        )
    return list(tail)


def tool_version(tool: str) -> str:
    """``<tool> --version`` for mmdebstrap, else the Debian package version of ``tool``."""
    if tool == "mmdebstrap":
        proc = subprocess.run([tool, "--version"], capture_output=True, text=True, check=False)
        return proc.stdout.strip() or "unknown"
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", tool], capture_output=True, text=True, check=False
    )
    return f"{tool} {proc.stdout.strip() or 'unknown'}"


# --------------------------------------------------------------------------- removing trees


def _mounts_below(path: Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found: list[str] = []
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as fh:
            for line in fh:
                mount_point = line.split()[4].replace("\\040", " ")
                if mount_point == str(path) or mount_point.startswith(prefix):
                    found.append(mount_point)
    except OSError:
        return []
    return sorted(found, key=len, reverse=True)


def remove_tree(path: Path) -> None:
    """Remove ``path`` without ever leaving its filesystem.

    A failed bootstrap can leave ``/proc``, ``/sys`` or ``/dev`` mounted inside the
    tree; those are unmounted first, and a directory on another filesystem is
    never descended into (so a stuck bind mount cannot take host files with it).
    Read-only folders (an unpacked root filesystem has some) are made writable.
    """
    for mount_point in _mounts_below(path):
        subprocess.run(["umount", "-l", mount_point], capture_output=True, check=False)
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        path.unlink()
        return
    _remove_dir(path, st.st_dev)


def _remove_dir(directory: Path, dev: int) -> None:
    try:
        entries = list(os.scandir(directory))
    except PermissionError:
        os.chmod(directory, 0o700)
        entries = list(os.scandir(directory))
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            if entry.stat(follow_symlinks=False).st_dev != dev:
                raise EnvironmentBuildError(
                    f"refusing to remove {entry.path}: another filesystem is mounted there",
                    hint=f"unmount it (`umount -l {entry.path}`) and run `pyro env prune`",
                )
            _remove_dir(Path(entry.path), dev)
        else:
            try:
                os.unlink(entry.path)
            except PermissionError:
                os.chmod(directory, 0o700)
                os.unlink(entry.path)
    try:
        os.rmdir(directory)
    except PermissionError:
        os.chmod(directory.parent, 0o700)
        os.rmdir(directory)


__all__ = [
    "is_root",
    "remove_tree",
    "run_tool",
    "stream_tool",
    "tail_lines",
    "tool_version",
]
