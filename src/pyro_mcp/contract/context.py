"""What a tool call needs besides its arguments: where ``source_path`` may come from,
where ``task_export`` may write, whether the caller cancelled, and who follows a
command's output."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.errors import InvalidInputError


class ToolCancelled(Exception):
    """Raised inside a running tool when its caller cancelled the request."""


@dataclass
class ToolContext:
    """What a call needs besides its arguments.

    ``source_roots``: the folders a ``source_path`` may come from (symlinks are
    resolved before the check, so none can point out of a root). ``None`` means
    the current working directory.

    ``write_roots``: the folders ``task_export`` may write into. Empty means none:
    a model may write on the host only where the user said so (an MCP client's
    roots, ``--allow-write``, or the wrapper's ``ToolContext(write_roots=...)``).
    """

    source_roots: Sequence[Path] | None = None
    write_roots: Sequence[Path] = ()
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: Called with each chunk of a running command's output (stdout and stderr
    #: alike), e.g. for the MCP server's progress tail; None: not followed.
    on_output: Callable[[bytes], None] | None = None

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise ToolCancelled("the request was cancelled")

    def roots(self) -> list[Path]:
        roots = self.source_roots if self.source_roots else [Path.cwd()]
        return [Path(os.path.realpath(r)) for r in roots]


def resolve_source_path(path: str, roots: Sequence[Path]) -> Path:
    """The real path of ``path`` if it lies under one of ``roots``; else InvalidInputError.

    Relative paths are taken relative to the first root. Symlinks (in the path
    and in the roots) are resolved first, so a link cannot lead out of a root.
    """
    if not roots:
        raise InvalidInputError("no folder is allowed as a source_path here")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise InvalidInputError(f"source_path must be a non-empty path, got {path!r}")
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = real_roots[0] / candidate
    real = Path(os.path.realpath(candidate))
    allowed = ", ".join(str(r) for r in real_roots)
    if not any(real == root or real.is_relative_to(root) for root in real_roots):
        raise InvalidInputError(
            f"source_path {path!r} (resolved to {real}) is outside the folders this "
            f"server may read: {allowed}",
            hint=(
                "pass a path inside one of those folders; to allow another folder, start "
                "`pyro mcp serve` with `--allow-path DIR` or add DIR as a root in the MCP client"
            ),
            details={"source_path": path, "resolved": str(real), "allowed_roots": allowed},
        )
    if not real.exists():
        raise InvalidInputError(
            f"source_path {path!r} does not exist",
            hint=f"pass an existing file or folder under {allowed}",
        )
    return real


def resolve_write_dest(path: str, roots: Sequence[Path]) -> Path:
    """``path`` (which need not exist yet) if its real location lies under one of
    ``roots``; else InvalidInputError. Relative paths are taken relative to the first
    root. Links in the existing part of the path are resolved before the check; the
    export itself refuses a ``dest`` that is a link."""
    if not isinstance(path, str) or not path or "\x00" in path:
        raise InvalidInputError(f"dest must be a non-empty path, got {path!r}")
    if not roots:
        raise InvalidInputError(
            "no host folder is writable for this server, so task_export cannot write",
            hint="start `pyro mcp serve` with `--allow-write DIR`, or add DIR as a root in "
            "the MCP client; or take the files with task_read_file / task_diff instead",
        )
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = real_roots[0] / candidate
    real = Path(os.path.realpath(candidate.parent)) / candidate.name
    if candidate.name in ("", ".", ".."):
        real = Path(os.path.realpath(candidate))
    if not any(real != root and real.is_relative_to(root) for root in real_roots):
        allowed = ", ".join(str(r) for r in real_roots)
        raise InvalidInputError(
            f"dest {path!r} (resolved to {real}) is not inside the folders this server may "
            f"write: {allowed}",
            hint="pass a path inside one of those folders (a new subfolder or a .tar/.tar.gz "
            "file name); to allow another, start `pyro mcp serve` with `--allow-write DIR`",
            details={"dest": path, "resolved": str(real), "allowed_roots": allowed},
        )
    return real
