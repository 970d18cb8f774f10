"""Warm pool: pooled runs are real, fresh VMs used once; the pool cleans up."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyro_mcp.api import Pyro
from pyro_mcp.errors import PyroError


@pytest.mark.vm
def test_pooled_runs_use_fresh_vms_once(vm_environment: str, state_dir: Path) -> None:
    with Pyro(state_dir=state_dir, pool_size=1, pool_environment=vm_environment) as pyro:
        pool = pyro.pool
        assert pool is not None
        assert pool.wait_ready(120), pool.last_error
        first = pyro.run_in_vm(
            vm_environment, "cat > /root/marker; cat /root/marker", stdin="one\n"
        )
        assert first.boot == "pooled"
        assert first.stdout == "one\n"  # stdin reaches a pooled VM's command too
        assert first.cleanup is not None and first.cleanup.deleted
        assert pool.wait_ready(120), pool.last_error
        second = pyro.run_in_vm(vm_environment, ["cat", "/root/marker"])
        assert second.boot == "pooled"
        assert second.vm_id != first.vm_id
        assert second.exit_code != 0  # the first VM's file is not in the second VM
        # A configuration the pool does not hold boots its own VM.
        other = pyro.run_in_vm(vm_environment, ["true"], mem_mib=384)
        assert other.boot in ("restored", "cold")
    assert not any((state_dir / "vms").glob("vm-*")), "pool VMs left behind after close()"


def test_pool_size_is_validated(state_dir: Path) -> None:
    with pytest.raises(PyroError):
        Pyro(state_dir=state_dir, pool_size=99, pool_environment="debian:12-base")
