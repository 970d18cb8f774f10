"""Typed results shared by the SDK, the CLI's --json output and the MCP server."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

BootKind = Literal["cold", "restored", "pooled"]
VMStatus = Literal["created", "starting", "running", "stopped", "failed"]


class CleanupInfo(BaseModel):
    deleted: bool = Field(description="Whether the VM and its disk were removed.")
    reason: str = Field(description="Why the VM was (not) removed, e.g. 'run finished'.")


class ExecResult(BaseModel):
    """One command's outcome. A non-zero exit code is a normal result, not an error."""

    vm_id: str
    environment: str
    environment_version: str
    command: str | list[str] = Field(description="The command as given.")
    stdout: str
    stderr: str
    stdout_truncated: bool = Field(description="stdout exceeded its cap and was cut.")
    stderr_truncated: bool = Field(description="stderr exceeded its cap and was cut.")
    exit_code: int = Field(description="The command's exit status (128+N if killed by signal N).")
    timed_out: bool = Field(description="The command hit its timeout and was killed.")
    duration_ms: int
    execution_mode: str = Field(description="Isolation the command got, e.g. 'microvm'.")
    backend: str
    acceleration: str = Field(description="'kvm' (hardware) or 'tcg' (software emulation).")
    boot: BootKind
    cleanup: CleanupInfo | None = None


class VMInfo(BaseModel):
    vm_id: str
    environment: str
    environment_version: str
    status: VMStatus
    vcpu_count: int
    mem_mib: int
    network: bool
    ttl_seconds: int
    created_at: float
    expires_at: float
    backend: str
    acceleration: str
    boot: BootKind | None = None
    detail: str | None = Field(default=None, description="Why a VM is stopped or failed.")


class ReapResult(BaseModel):
    reaped: list[str] = Field(description="Ids of VMs that were cleaned up.")
    reasons: dict[str, str] = Field(default_factory=dict)


class NetworkInfo(BaseModel):
    vm_id: str
    network_enabled: bool
    interfaces: list[str]
    detail: str
