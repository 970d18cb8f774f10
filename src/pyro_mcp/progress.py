"""Progress reporting for long work (environment builds, boots).

Producers call a :data:`ProgressFn` with :class:`ProgressEvent`s; the CLI turns
them into a progress bar on stderr, the MCP server into progress notifications.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # short machine-readable stage, e.g. "kernel", "rootfs", "image", "boot"
    message: str  # one human line, e.g. "debootstrap bookworm (debian:12)"
    completed: float | None = None  # units done within this stage, if known
    total: float | None = None  # units in this stage, if known


ProgressFn = Callable[[ProgressEvent], None]


def no_progress(event: ProgressEvent) -> None:
    """A ProgressFn that drops everything."""
    del event
