"""``pyro vm``: VMs created step by step (list, status, delete, reap)."""

from __future__ import annotations

import click

from pyro_mcp.cli.common import (
    emit,
    fail,
    json_option,
    make_pyro,
)
from pyro_mcp.errors import PyroError


@click.group()
def vm() -> None:
    """Inspect and clean up VMs (for one-shot commands use `pyro run`)."""


@vm.command("list")
@json_option
def vm_list(as_json: bool) -> None:
    try:
        vms = make_pyro().list_vms()
    except PyroError as exc:
        fail(exc, as_json)
    if as_json:
        emit(vms)
        return
    for v in vms:
        click.echo(f"{v.vm_id}  {v.environment:<16} {v.status:<8} {v.boot or '-'}")


@vm.command("status")
@click.argument("vm_id")
@json_option
def vm_status(vm_id: str, as_json: bool) -> None:
    try:
        info = make_pyro().status_vm(vm_id)
    except PyroError as exc:
        fail(exc, as_json)
    emit(info)


@vm.command("delete")
@click.argument("vm_id")
@json_option
def vm_delete(vm_id: str, as_json: bool) -> None:
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
