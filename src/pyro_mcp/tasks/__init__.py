"""Tasks: persistent workspaces (see :mod:`pyro_mcp.tasks.manager`), over a
workspace disk in a VM or a host folder (see :mod:`pyro_mcp.tasks.runtime`)."""

from pyro_mcp.tasks.manager import TaskManager
from pyro_mcp.tasks.runtime import TaskRuntime, runtime_for

__all__ = ["TaskManager", "TaskRuntime", "runtime_for"]
