"""The short text rendering of each tool's result (MCP ``content``, LangChain's message).

The structured content always carries the whole result; the text is what a model
or a person reads first.
"""

from __future__ import annotations

from pyro_mcp.contract.outputs import DeleteResult, EnvironmentList, TaskList, VMList
from pyro_mcp.models import (
    ExecResult,
    NetworkInfo,
    ReapResult,
    TaskDeleteResult,
    TaskExecResult,
    TaskInfo,
    VMInfo,
)

#: How much of stdout/stderr the short text rendering of a result repeats; the
#: structured content always carries the whole (capped) output.
TEXT_OUTPUT_CHARS = 4000


def _clip(text: str, limit: int = TEXT_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return (
        f"[... {len(text) - limit} earlier characters in structuredContent ...]\n" + text[-limit:]
    )


def render_exec(result: ExecResult | TaskExecResult) -> str:
    state = "timed out" if result.timed_out else f"exit code {result.exit_code}"
    where = [result.environment]
    if result.boot:
        where.append(f"{result.boot} boot")
    if isinstance(result, TaskExecResult):
        where.append(result.task_id)
    else:
        where.append(result.vm_id)
        if result.cleanup and result.cleanup.deleted:
            where.append("VM deleted")
    lines = [f"{state} ({result.duration_ms} ms, {', '.join(where)})"]
    for name, text, cut in (
        ("stdout", result.stdout, result.stdout_truncated),
        ("stderr", result.stderr, result.stderr_truncated),
    ):
        if text or cut:
            lines.append(f"--- {name}{' (truncated at its cap)' if cut else ''} ---")
            lines.append(_clip(text).rstrip("\n"))
    return "\n".join(lines)


def render_vm(info: VMInfo) -> str:
    line = (
        f"{info.vm_id}: {info.environment} {info.status}"
        f"{f' ({info.boot} boot)' if info.boot else ''}, {info.vcpu_count} vCPU, "
        f"{info.mem_mib} MiB, TTL {info.ttl_seconds} s"
    )
    return f"{line}; {info.detail}" if info.detail else line


def render_task(info: TaskInfo) -> str:
    seed = info.workspace_seed
    source = f" from {seed.source_path}" if seed.source_path else ""
    line = (
        f"{info.task_id}: {info.environment} {info.status}, {info.workspace_path} "
        f"({seed.mode}{source}: {seed.entry_count} entries, {seed.bytes_written} bytes), "
        f"TTL {info.ttl_seconds} s"
    )
    return f"{line}; {info.detail}" if info.detail else line


def render_tasks(result: TaskList) -> str:
    return "\n".join(render_task(t) for t in result.tasks) or "no tasks"


def render_task_delete(result: TaskDeleteResult) -> str:
    return f"deleted {result.task_id}"


def render_environments(result: EnvironmentList) -> str:
    return "\n".join(
        f"{e.name}{' (installed)' if e.installed else ''}: {e.description}"
        for e in result.environments
    )


def render_vms(result: VMList) -> str:
    return "\n".join(render_vm(v) for v in result.vms) or "no VMs"


def render_vm_delete(result: DeleteResult) -> str:
    return f"deleted {result.vm_id}"


def render_network(result: NetworkInfo) -> str:
    return f"{result.vm_id}: {result.detail} (interfaces: {', '.join(result.interfaces)})"


def render_reap(result: ReapResult) -> str:
    if not result.reaped:
        return "nothing to reap"
    return "\n".join(f"reaped {v} ({result.reasons.get(v, '?')})" for v in result.reaped)
