"""Where pyro-mcp keeps its files: per user, under the XDG base directories.

``PYRO_CACHE_DIR`` and ``PYRO_STATE_DIR`` override the defaults (tests use them
to get private directories). Nothing is ever kept in a shared, fixed /tmp path.
"""

from __future__ import annotations

import os
from pathlib import Path

APP_NAME = "pyro-mcp"


def cache_dir() -> Path:
    """Rebuildable artifacts: kernels, environments, agent builds, snapshots."""
    override = os.environ.get("PYRO_CACHE_DIR")
    if override:
        return Path(override).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_cache_dir(APP_NAME, appauthor=False))


def state_dir() -> Path:
    """Live state: one folder per VM and per task."""
    override = os.environ.get("PYRO_STATE_DIR")
    if override:
        return Path(override).expanduser().absolute()
    import platformdirs

    return Path(platformdirs.user_state_dir(APP_NAME, appauthor=False))


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 for the leaf."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
