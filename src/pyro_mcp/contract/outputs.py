"""Tool results that wrap the SDK's models into one JSON object, and the one error shape.

A tool whose SDK call returns a model (``ExecResult``, ``VMInfo``, ``TaskInfo``...)
answers with that model itself; these cover lists and plain dicts.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from pyro_mcp.models import TaskInfo, VMInfo


class EnvironmentEntry(BaseModel):
    name: str = Field(description="Pass this as `environment`.")
    version: str
    description: str
    installed: bool = Field(
        description="Built on this machine already; otherwise the first use builds it."
    )


class EnvironmentList(BaseModel):
    environments: list[EnvironmentEntry]

    @classmethod
    def of(cls, environments: list[dict[str, Any]]) -> EnvironmentList:
        """From ``Pyro.list_environments()``: what ``environment_list`` and
        ``pyro env list --json`` both answer."""
        return cls(
            environments=[
                EnvironmentEntry(
                    name=e["name"],
                    version=e["version"],
                    description=e["description"],
                    installed=bool(e["installed"]),
                )
                for e in environments
            ]
        )


class VMList(BaseModel):
    vms: list[VMInfo]


class TaskList(BaseModel):
    tasks: list[TaskInfo]


class DeleteResult(BaseModel):
    vm_id: str
    deleted: bool


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable error code, e.g. 'invalid_input', 'not_found'.")
    message: str
    hint: str | None = None
    details: dict[str, Any] | None = None


class ToolError(BaseModel):
    """What a tool returns when it could not do its job."""

    error: ErrorInfo
