"""The SDK's one-shot call: one command, one fresh VM, deleted afterwards.

uv run python examples/python_sdk_run_in_vm.py
"""

from __future__ import annotations

import os

from pyro_mcp import Pyro

ENVIRONMENT = os.environ.get("PYRO_ENVIRONMENT", "debian:12")


def main() -> None:
    pyro = Pyro()
    result = pyro.run_in_vm(ENVIRONMENT, "cat /etc/debian_version && uname -m", timeout_seconds=30)
    print(result.stdout, end="")
    print(f"exit code {result.exit_code}, {result.duration_ms} ms, {result.boot} boot")

    # A failing command is a normal result, not an exception.
    failed = pyro.run_in_vm(ENVIRONMENT, "ls /does-not-exist")
    print(f"exit code {failed.exit_code}: {failed.stderr.strip()}")


if __name__ == "__main__":
    main()
