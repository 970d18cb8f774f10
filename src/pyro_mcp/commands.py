"""What a command in a guest is run with: one options type for every surface.

The SDK, the CLI and the MCP tools all take the same exec options (working
directory, environment, timeout, output caps); :meth:`ExecOptions.checked`
validates them once, at the boundary, and every layer below passes the value
on. ``None`` for ``cwd`` means the environment's own working directory
(``/root`` for VMs, ``/workspace`` for tasks).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field

from pyro_mcp import limits

#: The environment every guest command starts from; the caller's ``env`` goes on top.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
}
VM_DEFAULT_CWD = "/root"


@dataclass(frozen=True)
class ExecOptions:
    """How to run one command. Build it with :meth:`checked`."""

    cwd: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    timeout_seconds: int = limits.DEFAULT_TIMEOUT_SECONDS
    stdout_cap: int = limits.DEFAULT_OUTPUT_CAP
    stderr_cap: int = limits.DEFAULT_OUTPUT_CAP

    @classmethod
    def checked(
        cls,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout_seconds: int = limits.DEFAULT_TIMEOUT_SECONDS,
        stdout_cap: int = limits.DEFAULT_OUTPUT_CAP,
        stderr_cap: int = limits.DEFAULT_OUTPUT_CAP,
    ) -> ExecOptions:
        """Validated options; raises InvalidInputError naming the bad one."""
        return cls(
            cwd=None if cwd is None else limits.check_cwd(cwd),
            env=limits.check_env(env),
            timeout_seconds=limits.check_timeout(timeout_seconds),
            stdout_cap=limits.check_output_cap("stdout_cap", stdout_cap),
            stderr_cap=limits.check_output_cap("stderr_cap", stderr_cap),
        )

    def guest_env(self) -> tuple[str, ...]:
        """The command's whole environment as "NAME=value" items."""
        return tuple(f"{k}={v}" for k, v in {**BASE_ENV, **self.env}.items())

    def cwd_or(self, default: str) -> str:
        return self.cwd if self.cwd is not None else default


def build_argv(command: str | list[str], env: Mapping[str, str]) -> list[str]:
    """A string runs under ``sh -lc``; the caller's env is re-exported after the
    login profile so it wins over what the profile sets (PATH above all)."""
    if isinstance(command, list):
        return command
    exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
    return ["sh", "-lc", exports + command]
