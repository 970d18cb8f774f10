"""Optional warm pool for long-lived processes (an SDK ``Pyro`` kept open).

Owned by the SDK facade (:class:`pyro_mcp.api.Pyro`), not the VM manager: the
pool keeps N VMs restored, started and warmed up (three throwaway commands, so
the VMM's translation cache is primed) for one configuration. A one-shot run
takes one (``VMManager.run(..., vm=...)``), uses it once, and a background
thread restores its replacement once the run is over.
Pool VMs are bound to this process: their supervisors kill them when it exits
or dies, and :meth:`WarmPool.close` tears down the idle ones at once.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyro_mcp import limits
from pyro_mcp.errors import InvalidInputError, PyroError
from pyro_mcp.models import VMInfo

if TYPE_CHECKING:
    from pyro_mcp.manager import VMManager

POOL_VM_TTL_SECONDS = 24 * 3600


@dataclass(frozen=True)
class PoolKey:
    environment: str
    vcpu_count: int = limits.DEFAULT_VCPU_COUNT
    mem_mib: int = limits.DEFAULT_MEM_MIB


class WarmPool:
    def __init__(self, manager: VMManager, key: PoolKey, size: int) -> None:
        if not 0 <= size <= 8:
            raise InvalidInputError("pool size must be between 0 and 8")
        self.manager = manager
        self.key = key
        self.size = size
        self._ready: list[VMInfo] = []
        self._cond = threading.Condition()
        self._closed = False
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._fill, name="pyro-pool", daemon=True)
        if size:
            self._thread.start()

    def _fill(self) -> None:
        failures = 0
        while True:
            with self._cond:
                while not self._closed and len(self._ready) >= self.size:
                    self._cond.wait()
                if self._closed:
                    return
            info = None
            try:
                info = self.manager.create(
                    self.key.environment,
                    vcpu_count=self.key.vcpu_count,
                    mem_mib=self.key.mem_mib,
                    ttl_seconds=POOL_VM_TTL_SECONDS,
                    owner_pid=os.getpid(),
                )
                info = self.manager.start(info.vm_id)
                for _ in range(3):  # prime the VMM (TCG translation cache) before first use
                    self.manager.exec(info.vm_id, ["true"])
                failures = 0
            except PyroError as exc:
                if info is not None:  # e.g. the VM cap refused the start: drop the record
                    self._discard(info.vm_id)
                self.last_error = exc.message
                failures += 1
                with self._cond:
                    self._cond.wait(timeout=min(60.0, 2.0**failures))
                continue
            with self._cond:
                if self._closed:
                    self._discard(info.vm_id)
                    return
                self._ready.append(info.model_copy(update={"boot": "pooled"}))
                self._cond.notify_all()

    def take(self, environment: str, vcpu_count: int, mem_mib: int) -> VMInfo | None:
        """A ready VM of exactly this configuration, or None (never waits)."""
        if PoolKey(environment, vcpu_count, mem_mib) != self.key:
            return None
        with self._cond:
            while self._ready:
                info = self._ready.pop(0)
                with contextlib.suppress(PyroError):
                    if self.manager.status(info.vm_id).status == "running":
                        return info
                self._discard(info.vm_id)
                self._cond.notify_all()  # replace the dead one now
        return None

    def replenish(self) -> None:
        """Start restoring a replacement. Called once the taken VM's run is over, so the
        restore does not compete for the CPU with the run itself."""
        with self._cond:
            self._cond.notify_all()

    def wait_ready(self, timeout: float) -> bool:
        """Block until the pool is full (tests and benchmarks)."""
        with self._cond:
            return self._cond.wait_for(
                lambda: len(self._ready) >= self.size or self._closed, timeout=timeout
            )

    def _discard(self, vm_id: str) -> None:
        with contextlib.suppress(PyroError):
            self.manager.delete(vm_id)

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._ready = self._ready, []
            self._cond.notify_all()
        for info in idle:
            self._discard(info.vm_id)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            # A VM being restored right now is discarded by the filler itself.
            self._thread.join(timeout=30)
