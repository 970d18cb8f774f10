"""User defaults: ``$XDG_CONFIG_HOME/pyro-mcp/config.toml``.

    backend = "qemu"            # auto, qemu, gvisor, host_compat
    environment = "debian:12"   # what `Pyro.task()` and the pool use when none is named
    timeout_seconds = 60        # a command's timeout (CLI, Task.exec)
    mem_mib = 1024              # a new VM's or task's memory (CLI, Pyro.task)
    pool_size = 2               # warm VMs kept by `Pyro()` for one-shot runs

Each value is, first to last: the explicit argument or flag, the environment variable
(:data:`ENV_VARS`), this file, the built-in default (:data:`BUILTIN`). The file is
optional; ``PYRO_CONFIG`` names another one. A file that cannot be read, is not TOML,
or has an unknown key or a bad value is an :class:`~pyro_mcp.errors.InvalidInputError`
that names the file and the key. ``pyro doctor`` shows the file and what is in effect.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pyro_mcp import limits
from pyro_mcp.errors import InvalidInputError, PyroError

CONFIG_ENV = "PYRO_CONFIG"

#: Built-in defaults.
BUILTIN: dict[str, str | int] = {
    "backend": "auto",
    "environment": "debian:12",
    "timeout_seconds": limits.DEFAULT_TIMEOUT_SECONDS,
    "mem_mib": limits.DEFAULT_MEM_MIB,
    "pool_size": 0,
}

#: The environment variable of each key.
ENV_VARS = {
    "backend": "PYRO_BACKEND",
    "environment": "PYRO_ENVIRONMENT",
    "timeout_seconds": "PYRO_TIMEOUT_SECONDS",
    "mem_mib": "PYRO_MEM_MIB",
    "pool_size": "PYRO_POOL_SIZE",
}


def config_path() -> Path:
    """The config file's path (it need not exist)."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit).expanduser()
    from platformdirs import user_config_dir

    return Path(user_config_dir("pyro-mcp")) / "config.toml"


@dataclass(frozen=True)
class Settings:
    """The defaults in effect, and where each came from (``sources``: "env
    PYRO_MEM_MIB", "config <path>" or "built-in")."""

    backend: str
    environment: str
    timeout_seconds: int
    mem_mib: int
    pool_size: int
    path: Path
    sources: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data["exists"] = self.path.is_file()
        return data


def _check(key: str, value: object) -> str | int:
    from pyro_mcp.vmm import BACKEND_NAMES

    if key == "backend":
        names = ("auto", *BACKEND_NAMES)
        if value not in names:
            raise InvalidInputError(f"backend must be one of {', '.join(names)}, got {value!r}")
        return str(value)
    if key == "environment":
        if not isinstance(value, str) or not value:
            raise InvalidInputError(f"environment must be a name like 'debian:12', got {value!r}")
        return value
    if key == "timeout_seconds":
        return limits.check_timeout(value)
    if key == "mem_mib":
        return limits.check_mem_mib(value)
    return limits.check_int("pool_size", value, 0, 8)


def _bad(where: str, key: str, exc: PyroError) -> InvalidInputError:
    return InvalidInputError(
        f"{where}: {key}: {exc.message}",
        hint=f"fix or remove {key} there; the keys are {', '.join(BUILTIN)}",
        details={"where": where, "key": key},
    )


def read_file(path: Path) -> dict[str, Any]:
    """The file's table, checked (empty where there is no file)."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInputError(
            f"config file {path} is not valid TOML: {exc}",
            hint=f"fix it, or move it away; {CONFIG_ENV} names another file",
            details={"where": str(path)},
        ) from None
    except OSError as exc:
        raise InvalidInputError(
            f"config file {path} cannot be read: {exc.strerror}",
            hint=f"check its permissions; {CONFIG_ENV} names another file",
            details={"where": str(path)},
        ) from None
    checked: dict[str, Any] = {}
    for key, value in data.items():
        if key not in BUILTIN:
            raise InvalidInputError(
                f"config file {path}: unknown key {key!r}",
                hint=f"the keys are {', '.join(BUILTIN)}",
                details={"where": str(path), "key": key},
            )
        try:
            checked[key] = _check(key, value)
        except PyroError as exc:
            raise _bad(f"config file {path}", key, exc) from None
    return checked


def load() -> Settings:
    """The defaults in effect now: environment variables over the file over built-ins."""
    path = config_path()
    from_file = read_file(path)
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for key, builtin in BUILTIN.items():
        var = ENV_VARS[key]
        raw = os.environ.get(var)
        if raw:
            value: object = raw
            if isinstance(builtin, int):
                try:
                    value = int(raw)
                except ValueError:
                    value = raw  # _check names it
            try:
                values[key] = _check(key, value)
            except PyroError as exc:
                raise _bad(f"environment variable {var}", key, exc) from None
            sources[key] = f"env {var}"
        elif key in from_file:
            values[key] = from_file[key]
            sources[key] = f"config {path}"
        else:
            values[key] = builtin
            sources[key] = "built-in"
    return Settings(path=path, sources=sources, **values)
