"""The step-by-step lifecycle: create a VM, start it, run one command in it.

    uv run python examples/python_sdk_vm_lifecycle.py

``exec_vm`` deletes the VM when its command finishes (one command per VM); for
several commands in one place use tasks (examples/python_sdk_task.py).
"""

from __future__ import annotations

import os

from pyro_mcp import Pyro

ENVIRONMENT = os.environ.get("PYRO_ENVIRONMENT", "debian:12")


def main() -> None:
    pyro = Pyro()
    vm = pyro.create_vm(ENVIRONMENT, vcpu_count=1, mem_mib=512, ttl_seconds=300)
    print(f"created {vm.vm_id} ({vm.status})")
    try:
        vm = pyro.start_vm(vm.vm_id)
        print(f"started {vm.vm_id} ({vm.status}, {vm.boot} boot)")
        result = pyro.exec_vm(vm.vm_id, "nproc && grep MemTotal /proc/meminfo")
    except BaseException:
        pyro.delete_vm(vm.vm_id)  # exec_vm deletes it; anything before that must clean up
        raise
    print(result.stdout, end="")
    assert result.cleanup is not None
    print(f"exit code {result.exit_code}; VM deleted: {result.cleanup.deleted}")


if __name__ == "__main__":
    main()
