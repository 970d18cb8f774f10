"""The VM tools: ``vm_run`` (the one most calls should use), the environment list, and
the step-by-step lifecycle (``vm_create``, ``vm_start``, ``vm_exec``...) of the full
profile."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyro_mcp.contract.context import ToolContext
from pyro_mcp.contract.inputs import (
    NoInput,
    VMCreateInput,
    VMExecInput,
    VMIdInput,
    VMRunInput,
    exec_options,
)
from pyro_mcp.contract.outputs import DeleteResult, EnvironmentList, VMList
from pyro_mcp.contract.render import (
    render_environments,
    render_exec,
    render_network,
    render_reap,
    render_vm,
    render_vm_delete,
    render_vms,
)
from pyro_mcp.contract.spec import ALL_PROFILES, FULL_PROFILE, READ_ONLY, ToolHints, ToolSpec
from pyro_mcp.models import ExecResult, NetworkInfo, ReapResult, VMInfo

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro


def _run_vm_run(pyro: Pyro, args: VMRunInput, ctx: ToolContext) -> ExecResult:
    return pyro.run_in_vm(
        args.environment,
        args.command,
        vcpu_count=args.vcpu_count,
        mem_mib=args.mem_mib,
        timeout_seconds=args.timeout_seconds,
        ttl_seconds=args.ttl_seconds,
        network=args.network,
        stdout_cap=args.stdout_cap,
        stderr_cap=args.stderr_cap,
        **exec_options(args.cwd, args.env, args.stdin, ctx.on_output),
    )


def _run_list_environments(pyro: Pyro, args: NoInput, ctx: ToolContext) -> EnvironmentList:
    return EnvironmentList.of(pyro.list_environments())


def _run_vm_create(pyro: Pyro, args: VMCreateInput, ctx: ToolContext) -> VMInfo:
    return pyro.create_vm(
        args.environment,
        vcpu_count=args.vcpu_count,
        mem_mib=args.mem_mib,
        ttl_seconds=args.ttl_seconds,
        network=args.network,
    )


def _run_vm_start(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> VMInfo:
    return pyro.start_vm(args.vm_id)


def _run_vm_exec(pyro: Pyro, args: VMExecInput, ctx: ToolContext) -> ExecResult:
    return pyro.exec_vm(
        args.vm_id,
        args.command,
        timeout_seconds=args.timeout_seconds,
        stdout_cap=args.stdout_cap,
        stderr_cap=args.stderr_cap,
        **exec_options(args.cwd, args.env, args.stdin, ctx.on_output),
    )


def _run_vm_stop(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> VMInfo:
    return pyro.stop_vm(args.vm_id)


def _run_vm_delete(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> DeleteResult:
    data = pyro.delete_vm(args.vm_id)
    return DeleteResult(vm_id=str(data["vm_id"]), deleted=bool(data["deleted"]))


def _run_vm_status(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> VMInfo:
    return pyro.status_vm(args.vm_id)


def _run_vm_list(pyro: Pyro, args: NoInput, ctx: ToolContext) -> VMList:
    return VMList(vms=pyro.list_vms())


def _run_vm_network_info(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> NetworkInfo:
    return pyro.network_info_vm(args.vm_id)


def _run_vm_reap(pyro: Pyro, args: NoInput, ctx: ToolContext) -> ReapResult:
    return pyro.reap_expired()


VM_RUN = ToolSpec(
    name="vm_run",
    title="Run a command in a fresh microVM",
    description=(
        "Run one shell command in a fresh, disposable Linux microVM and return its "
        "exit code, stdout and stderr. The VM boots for this call (about a second), "
        "runs the command as root, and is always deleted afterwards: nothing persists "
        "between calls and nothing touches the host. Use this first and by default: "
        "trying code, checking how a tool behaves on Linux, running anything untrusted. "
        "Chain steps in one command with `&&`. Not for: several commands that must "
        "share files or state (use task_create then task_exec), or anything that needs "
        "the internet (guests have no network). A non-zero exit code is a normal "
        "result, not an error: read exit_code, stderr and timed_out."
    ),
    input_model=VMRunInput,
    output_model=ExecResult,
    # Creates and deletes its own VM; destroys nothing that existed before.
    hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
    profiles=ALL_PROFILES,
    run=_run_vm_run,
    render=render_exec,
)

LIST_ENVIRONMENTS = ToolSpec(
    name="vm_list_environments",
    title="List guest environments",
    description=(
        "List the guest environments (Linux images) a VM can use, with what each "
        "contains and whether it is already built on this machine. Call it when you "
        "need a tool that may not be in the default environment (e.g. a compiler); "
        "otherwise just call vm_run with the default."
    ),
    input_model=NoInput,
    output_model=EnvironmentList,
    hints=READ_ONLY,
    profiles=ALL_PROFILES,
    run=_run_list_environments,
    render=render_environments,
)

#: The step-by-step lifecycle, offered by the full profile only.
VM_LIFECYCLE_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="vm_create",
        title="Define a VM (advanced)",
        description=(
            "Define a VM without booting it; returns its vm_id for vm_start. Advanced, "
            "step-by-step lifecycle: prefer vm_run for a command, and tasks for repeated "
            "commands in one workspace. Undeleted VMs are removed after ttl_seconds."
        ),
        input_model=VMCreateInput,
        output_model=VMInfo,
        hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
        profiles=FULL_PROFILE,
        run=_run_vm_create,
        render=render_vm,
    ),
    ToolSpec(
        name="vm_start",
        title="Boot a created VM (advanced)",
        description=(
            "Boot a VM made by vm_create and wait until it is ready for vm_exec. "
            "Prefer vm_run unless you need this step-by-step lifecycle."
        ),
        input_model=VMIdInput,
        output_model=VMInfo,
        hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
        profiles=FULL_PROFILE,
        run=_run_vm_start,
        render=render_vm,
    ),
    ToolSpec(
        name="vm_exec",
        title="Run a command in a started VM, then delete it (advanced)",
        description=(
            "Run one shell command in a VM started by vm_start; the VM is deleted "
            "afterwards (this lifecycle is one command per VM). Prefer vm_run, which does "
            "create+start+exec in one call; for several commands in one place use tasks."
        ),
        input_model=VMExecInput,
        output_model=ExecResult,
        # Deletes the VM when the command finishes.
        hints=ToolHints(read_only=False, destructive=True, idempotent=False, open_world=False),
        profiles=FULL_PROFILE,
        run=_run_vm_exec,
        render=render_exec,
    ),
    ToolSpec(
        name="vm_stop",
        title="Stop a VM (advanced)",
        description=(
            "Power off a running VM (its processes and memory are lost; it can be "
            "started again). Use vm_delete to remove it for good."
        ),
        input_model=VMIdInput,
        output_model=VMInfo,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=FULL_PROFILE,
        run=_run_vm_stop,
        render=render_vm,
    ),
    ToolSpec(
        name="vm_delete",
        title="Delete a VM",
        description=(
            "Stop a VM if it runs and delete it with its disk. Not needed after vm_run "
            "or vm_exec, which delete their VM themselves."
        ),
        input_model=VMIdInput,
        output_model=DeleteResult,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=FULL_PROFILE,
        run=_run_vm_delete,
        render=render_vm_delete,
    ),
    ToolSpec(
        name="vm_status",
        title="Show a VM",
        description="Show one VM's state, size, environment and expiry time.",
        input_model=VMIdInput,
        output_model=VMInfo,
        hints=READ_ONLY,
        profiles=FULL_PROFILE,
        run=_run_vm_status,
        render=render_vm,
    ),
    ToolSpec(
        name="vm_list",
        title="List VMs",
        description="List the VMs that exist on this machine and their states.",
        input_model=NoInput,
        output_model=VMList,
        hints=READ_ONLY,
        profiles=FULL_PROFILE,
        run=_run_vm_list,
        render=render_vms,
    ),
    ToolSpec(
        name="vm_network_info",
        title="Show a VM's network",
        description="Show whether a VM has network access and which interfaces it has.",
        input_model=VMIdInput,
        output_model=NetworkInfo,
        hints=READ_ONLY,
        profiles=FULL_PROFILE,
        run=_run_vm_network_info,
        render=render_network,
    ),
    ToolSpec(
        name="vm_reap_expired",
        title="Clean up expired VMs",
        description=(
            "Delete VMs past their TTL and VMs left behind by processes that exited. "
            "Runs automatically when the server starts; call it only to free resources now."
        ),
        input_model=NoInput,
        output_model=ReapResult,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=FULL_PROFILE,
        run=_run_vm_reap,
        render=render_reap,
    ),
)
