"""``python -m pyro_mcp.contract`` prints the tool reference (docs/tools.md)."""

from pyro_mcp.contract.reference import reference_markdown

print(reference_markdown(), end="")
