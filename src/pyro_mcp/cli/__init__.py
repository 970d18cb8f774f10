"""The ``pyro`` command line.

Exit codes: ``pyro run`` and ``pyro task exec`` exit with the guest command's own
exit code, 124 when it timed out. Every command exits 125 (``PyroError.exit_code``)
for pyro's own errors (bad input, boot failure, ...) and for usage errors (unknown
option, missing argument, bad value), so 1..123 only ever come from a guest command.
Only the guest command's output goes to stdout; progress and errors go to stderr.

One module per command group: :mod:`~pyro_mcp.cli.app` (the root, ``run``,
``doctor``), ``env``, ``vm``, ``task``, ``files`` (a task's files), ``mcp``; what
they share is in :mod:`~pyro_mcp.cli.common`.
"""

from pyro_mcp.cli.app import cli, main
from pyro_mcp.cli.common import EXIT_PYRO_ERROR, EXIT_TIMEOUT
from pyro_mcp.cli.mcp import mcp_serve

__all__ = ["EXIT_PYRO_ERROR", "EXIT_TIMEOUT", "cli", "main", "mcp_serve"]
