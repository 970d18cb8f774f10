"""One exit rule for the whole CLI: pyro's own errors and usage errors exit 125 on
every command (so 1..123 only come from a guest command), and the error tree it
rests on. No VM is started: each case fails before one would be."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from pyro_mcp import errors
from pyro_mcp.cli import EXIT_PYRO_ERROR, cli
from pyro_mcp.workspace.archive import UnsafeSeedError


def pyro(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), prog_name="pyro")
    assert not isinstance(result.exception, AssertionError)
    return result.exit_code, result.output


@pytest.mark.parametrize(
    "args",
    [
        # usage errors: missing command or argument, unknown or bad option
        ["run", "debian:12-base"],
        ["run", "--vcpu-count", "many", "debian:12-base", "--", "true"],
        ["run", "--no-such-option", "debian:12-base", "--", "true"],
        ["task", "exec", "task-0123456789ab", "--env", "FOO", "--", "true"],
        ["task", "exec", "task-0123456789ab"],
        ["vm", "status"],
        ["vm", "delete", "--bogus", "vm-x"],
        ["env", "pull"],
        ["--backend", "firecracker", "vm", "list"],
        ["no-such-command"],
        [],
        # pyro's own errors
        ["run", "no-such-env:9", "--", "true"],
        ["run", "debian:12-base", "--timeout-seconds", "0", "--", "true"],
        ["task", "exec", "task-0123456789ab", "--", "true"],
        ["task", "status", "task-0123456789ab"],
        ["vm", "status", "vm-0123456789ab"],
        ["vm", "delete", "not an id"],
    ],
    ids=lambda a: " ".join(a) or "(none)",
)
def test_usage_and_pyro_errors_exit_125(state_dir: Path, args: list[str]) -> None:
    code, output = pyro(*args)
    assert code == EXIT_PYRO_ERROR == 125, output
    assert "Traceback" not in output


def test_json_errors_exit_125_too(state_dir: Path) -> None:
    code, output = pyro("vm", "status", "vm-0123456789ab", "--json")
    assert code == 125 and '"code": "not_found"' in output


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["task", "exec", "--help"]])
def test_help_and_version_exit_0(args: list[str]) -> None:
    assert pyro(*args)[0] == 0


def test_backend_help_matches_the_automatic_choice() -> None:
    """auto prefers QEMU (KVM, else TCG) and takes gvisor only without QEMU, as
    vmm.choose_auto and docs/backends.md say."""
    code, output = pyro("--help")
    text = " ".join(output.split())
    assert code == 0
    assert "[auto|qemu|gvisor|host_compat]" in text
    assert "else qemu with TCG; gvisor only when QEMU is missing" in text


def test_error_tree() -> None:
    assert errors.PyroError.exit_code == 125
    assert not hasattr(errors, "ExecTimeoutError")  # never raised: removed
    assert issubclass(UnsafeSeedError, errors.InvalidInputError)
    assert UnsafeSeedError.code == "unsafe_seed"
    codes = [
        cls.code
        for cls in vars(errors).values()
        if isinstance(cls, type) and issubclass(cls, errors.PyroError)
    ]
    codes.append(UnsafeSeedError.code)
    assert len(codes) == len(set(codes)), codes
    for cls in vars(errors).values():
        if isinstance(cls, type) and issubclass(cls, errors.PyroError):
            assert cls.__name__ in (errors.__doc__ or ""), f"{cls.__name__} not in the tree"
    assert "UnsafeSeedError" in (errors.__doc__ or "")
