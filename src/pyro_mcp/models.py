"""Typed results shared by the SDK, the CLI's --json output and the MCP server."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal, Self

from pydantic import BaseModel, Field, PlainSerializer, PrivateAttr


def iso_utc(when: datetime | float) -> str:
    """``when`` (an aware datetime or epoch seconds) as ISO 8601 UTC to the second,
    e.g. ``2026-12-08T00:29:19+00:00``: how every time in pyro's JSON is written."""
    if not isinstance(when, datetime):
        when = datetime.fromtimestamp(when, UTC)
    return when.astimezone(UTC).isoformat(timespec="seconds")


#: A point in time: an aware ``datetime`` in Python, an ISO 8601 UTC string in every
#: ``model_dump()`` and JSON (CLI ``--json``, MCP). Epoch seconds are accepted as input.
Timestamp = Annotated[datetime, PlainSerializer(iso_utc, return_type=str)]

BootKind = Literal["cold", "restored", "pooled"]
VMStatus = Literal["created", "starting", "running", "stopped", "failed"]


class CleanupInfo(BaseModel):
    deleted: bool = Field(description="Whether the VM and its disk were removed.")
    reason: str = Field(description="Why the VM was (not) removed, e.g. 'run finished'.")


class CommandResult(BaseModel):
    """What every command's outcome says: output, exit status, where it ran.
    A non-zero exit code is a normal result, not an error."""

    environment: str
    environment_version: str
    command: str | list[str] = Field(description="The command as given.")
    stdout: str
    stderr: str
    stdout_truncated: bool = Field(description="stdout exceeded its cap and was cut.")
    stderr_truncated: bool = Field(description="stderr exceeded its cap and was cut.")
    stdout_lossy: bool = Field(
        default=False,
        description="stdout was not valid UTF-8: some bytes are shown as U+FFFD.",
    )
    stderr_lossy: bool = Field(
        default=False,
        description="stderr was not valid UTF-8: some bytes are shown as U+FFFD.",
    )
    exit_code: int = Field(description="The command's exit status (128+N if killed by signal N).")
    timed_out: bool = Field(description="The command hit its timeout and was killed.")
    duration_ms: int
    execution_mode: str = Field(
        description="Isolation the command got: 'microvm' (its own kernel in a VM), "
        "'gvisor_sandbox' (gVisor's user-space kernel, no VM) or 'host_compat'."
    )
    backend: str
    acceleration: str = Field(
        description="microVMs: 'kvm' (hardware) or 'tcg' (software emulation); gvisor: "
        "its platform ('ptrace' or 'systrap'); 'none' for host_compat."
    )
    # The exact bytes (never in JSON or MCP output: models see the text fields).
    _stdout_bytes: bytes | None = PrivateAttr(default=None)
    _stderr_bytes: bytes | None = PrivateAttr(default=None)

    @property
    def stdout_bytes(self) -> bytes:
        """The command's stdout exactly as it wrote it (within the cap)."""
        return self.stdout.encode() if self._stdout_bytes is None else self._stdout_bytes

    @property
    def stderr_bytes(self) -> bytes:
        """The command's stderr exactly as it wrote it (within the cap)."""
        return self.stderr.encode() if self._stderr_bytes is None else self._stderr_bytes

    def with_bytes(self, stdout: bytes, stderr: bytes) -> Self:
        """Attach the exact bytes the text fields were decoded from (returns self)."""
        self._stdout_bytes = stdout
        self._stderr_bytes = stderr
        return self


class ExecResult(CommandResult):
    """One command's outcome in a VM of its own."""

    vm_id: str
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
    created_at: Timestamp = Field(description="When it was created, ISO 8601 UTC.")
    expires_at: Timestamp = Field(description="When its TTL runs out, ISO 8601 UTC.")
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


# -- tasks --------------------------------------------------------------------------

TaskStatus = Literal["creating", "running", "ready", "stopped"]
SeedMode = Literal["empty", "directory", "tar_archive"]


class WorkspaceSeed(BaseModel):
    """What a task's /workspace started from."""

    mode: SeedMode = Field(description="'empty', 'directory' or 'tar_archive'.")
    source_path: str | None = Field(description="Absolute host path of the source, if any.")
    destination: str = Field(description="Where the content is in the task, '/workspace'.")
    entry_count: int = Field(description="Files, directories and links created.")
    bytes_written: int = Field(description="File bytes written.")
    sha256: str | None = Field(
        description="sha256 of the archive file as given, or for a directory of its canonical "
        "tar (pyro_mcp.workspace.archive.write_canonical_tar); null when empty."
    )
    exclude: list[str] = Field(default_factory=list, description="Exclude patterns applied.")
    seed_ms: int = Field(default=0, description="Host time spent validating and extracting.")


class TaskInfo(BaseModel):
    """A persistent workspace: one VM (or host_compat sandbox) and its /workspace."""

    task_id: str
    name: str | None = Field(
        default=None,
        description="The task's name if it was given one at create; it may stand for task_id.",
    )
    environment: str
    environment_version: str
    status: TaskStatus = Field(
        description="'running' (VM up), 'stopped' (VM gone; the next exec starts a new one on "
        "the same /workspace), 'ready' (host_compat: nothing runs between commands), "
        "'creating'."
    )
    execution_mode: str = Field(description="'microvm', 'gvisor_sandbox' or 'host_compat'.")
    backend: str
    acceleration: str = Field(
        description="'kvm' or 'tcg' (microVM), the gVisor platform, or 'none' (host_compat)."
    )
    vm_id: str | None = Field(description="The task's current VM (null for host_compat).")
    vcpu_count: int
    mem_mib: int
    network: bool
    ttl_seconds: int
    created_at: Timestamp = Field(description="When it was created, ISO 8601 UTC.")
    expires_at: Timestamp = Field(description="When its TTL runs out, ISO 8601 UTC.")
    workspace_path: str = Field(description="Where the workspace is mounted: '/workspace'.")
    workspace_seed: WorkspaceSeed
    boot: BootKind | None = None
    detail: str | None = None


class TaskExecResult(CommandResult):
    """One command's outcome in a task."""

    task_id: str
    vm_id: str | None = Field(description="The task's VM (null for host_compat).")
    boot: BootKind | None = Field(description="How the task's VM started (null for host_compat).")


class TaskDeleteResult(BaseModel):
    task_id: str
    deleted: bool


class TaskPruneResult(BaseModel):
    """What ``prune`` removed (or, with ``dry_run``, would remove)."""

    pruned: list[str] = Field(description="Ids of the tasks removed.")
    reasons: dict[str, str] = Field(
        default_factory=dict,
        description="Why each went: ttl_expired, create_interrupted, incomplete, "
        "backend_unknown or workspace_missing.",
    )
    dry_run: bool = False


class TaskResetResult(BaseModel):
    task_id: str
    status: str = Field(description="The task's status after the reset.")
    workspace_seed_mode: str = Field(
        description="What /workspace was reset to: 'directory' or 'tar_archive' (its seed), "
        "or 'empty'."
    )
    guest_reverted: bool = Field(
        description="Whether everything outside /workspace started fresh too (installed "
        "packages, files in /root or /tmp): true on VM backends, where a reset is a new VM."
    )
    vm_id: str | None
    boot: BootKind | None
    duration_ms: int
