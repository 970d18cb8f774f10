"""pyro-mcp: run an agent's shell commands in disposable local microVMs."""

from pyro_mcp._version import __version__
from pyro_mcp.errors import (
    BackendUnavailableError,
    BootError,
    EnvironmentBuildError,
    GuestProtocolError,
    InvalidInputError,
    LimitError,
    NotFoundError,
    PyroError,
    StateError,
    VMStateError,
)

__all__ = [
    "BackendUnavailableError",
    "BootError",
    "EnvironmentBuildError",
    "GuestProtocolError",
    "InvalidInputError",
    "LimitError",
    "NotFoundError",
    "Pyro",
    "PyroError",
    "StateError",
    "VMStateError",
    "__version__",
]


def __getattr__(name: str) -> object:
    # Keep `import pyro_mcp` (and so the CLI's start-up) cheap: the SDK loads on use.
    if name == "Pyro":
        from pyro_mcp.api import Pyro

        return Pyro
    raise AttributeError(name)
