"""``pyro vm``: VMs created step by step (list, status, delete, reap)."""

from __future__ import annotations

from typing import Any

import click

from pyro_mcp.cli.common import (
    age,
    emit,
    expires,
    fail,
    json_option,
    local_time,
    make_pyro,
    print_table,
    quiet_option,
)
from pyro_mcp.cli.complete import complete_vm_id
from pyro_mcp.errors import PyroError


@click.group()
def vm() -> None:
    """Inspect and clean up VMs (for one-shot commands use `pyro run`)."""


@vm.command("list")
@quiet_option
@json_option
def vm_list(quiet: bool, as_json: bool) -> None:
    """List VMs: ID ENV STATUS BOOT AGE EXPIRES BACKEND ("no VMs" on stderr when there
    are none). -q prints only the ids; --json prints {"vms": [...]}."""
    from pyro_mcp.contract.outputs import VMList

    try:
        vms = make_pyro().list_vms()
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(VMList(vms=vms))
    elif quiet:
        for v in vms:
            click.echo(v.vm_id)
    else:
        rows = [
            (
                v.vm_id,
                v.environment,
                v.status,
                v.boot or "-",
                age(v.created_at),
                expires(v.expires_at),
                f"{v.backend} ({v.acceleration})",
            )
            for v in vms
        ]
        header = ("ID", "ENV", "STATUS", "BOOT", "AGE", "EXPIRES", "BACKEND")
        print_table(header, rows, empty="no VMs")


def _print_vm(info: Any) -> None:
    click.echo(f"vm_id:        {info.vm_id}")
    click.echo(f"environment:  {info.environment} {info.environment_version}")
    click.echo(f"status:       {info.status}" + (f" ({info.detail})" if info.detail else ""))
    click.echo(f"backend:      {info.backend} ({info.acceleration})")
    click.echo(f"boot:         {info.boot or '-'}")
    click.echo(f"size:         {info.vcpu_count} vCPU, {info.mem_mib} MiB")
    click.echo(f"network:      {'yes' if info.network else 'no'}")
    click.echo(f"created:      {local_time(info.created_at)} ({age(info.created_at)} ago)")
    click.echo(f"expires:      {local_time(info.expires_at)} ({expires(info.expires_at)})")


@vm.command("status")
@click.argument("vm_id", shell_complete=complete_vm_id)
@json_option
def vm_status(vm_id: str, as_json: bool) -> None:
    """Show one VM: its environment, status, backend, size and TTL."""
    try:
        info = make_pyro().status_vm(vm_id)
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(info)
    else:
        _print_vm(info)


@vm.command("delete")
@click.argument("vm_id", shell_complete=complete_vm_id)
@json_option
def vm_delete(vm_id: str, as_json: bool) -> None:
    """Stop VM_ID if it runs and remove it with its disk."""
    try:
        data = make_pyro().delete_vm(vm_id)
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(data)
    else:
        click.echo(f"deleted {data['vm_id']}")


@vm.command("reap")
@json_option
def vm_reap(as_json: bool) -> None:
    """Delete VMs past their TTL and those of dead `pyro` processes."""
    try:
        data = make_pyro().reap_expired()
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(data)
    else:
        for vm_id in data.reaped:
            click.echo(f"reaped {vm_id} ({data.reasons.get(vm_id)})")
        if not data.reaped:
            click.echo("nothing to reap", err=True)
