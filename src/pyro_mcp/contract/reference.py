"""The generated tool reference, docs/tools.md (a test fails when the file is stale).

Regenerate with ``uv run python -m pyro_mcp.contract > docs/tools.md``.
"""

from __future__ import annotations

import json
from typing import Any

from pyro_mcp.contract.spec import PROFILES
from pyro_mcp.contract.tools import TOOLS


def _type_of(schema: dict[str, Any]) -> str:
    if "anyOf" in schema:
        return " or ".join(_type_of(s) for s in schema["anyOf"])
    if "$ref" in schema:
        return "object"
    kind = schema.get("type", "any")
    if kind == "array":
        return f"list of {_type_of(schema.get('items', {}))}"
    return str(kind)


def _bounds(schema: dict[str, Any]) -> str:
    # An optional field's bounds sit in its non-null alternative.
    for option in schema.get("anyOf", []):
        if option != {"type": "null"}:
            return _bounds(option)
    if "minimum" in schema or "maximum" in schema:
        return f"{schema.get('minimum', '')}..{schema.get('maximum', '')}"
    if "pattern" in schema:
        return f"`{schema['pattern']}`"
    if "maxItems" in schema:
        return f"at most {schema['maxItems']} items"
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """docs/tools.md: every tool with its profiles, hints, parameters and result."""
    lines = [
        "# Tool reference",
        "",
        "<!-- Generated from the tool table in src/pyro_mcp/contract/; do not edit.",
        "     Regenerate with: uv run python -m pyro_mcp.contract > docs/tools.md -->",
        "",
        "The same tools, with the same names, descriptions and schemas, are served by",
        "`pyro mcp serve` and by the OpenAI Responses, LangChain and PydanticAI adapters.",
        "Start with `vm_run`; use tasks only when several commands must share files.",
        "",
        "| tool | profiles | read-only | destructive | idempotent | open world |",
        "|---|---|---|---|---|---|",
    ]
    yes = {True: "yes", False: "no"}
    for t in TOOLS:
        profiles = ", ".join(p for p in PROFILES if p in t.profiles)
        h = t.hints
        lines.append(
            f"| [`{t.name}`](#{t.name}) | {profiles} | {yes[h.read_only]} | "
            f"{yes[h.destructive]} | {yes[h.idempotent]} | {yes[h.open_world]} |"
        )
    for t in TOOLS:
        lines += ["", f"## {t.name}", "", f"**{t.title}.** {t.description}", ""]
        schema = t.input_schema()
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        if props:
            lines += [
                "| parameter | type | default | bounds | description |",
                "|---|---|---|---|---|",
            ]
            for name, prop in props.items():
                default = "required" if name in required else f"`{json.dumps(prop.get('default'))}`"
                lines.append(
                    f"| `{name}` | {_type_of(prop)} | {default} | {_cell(_bounds(prop))} | "
                    f"{_cell(prop.get('description', ''))} |"
                )
        else:
            lines.append("No parameters.")
        out = t.output_schema()
        fields = ", ".join(f"`{name}`" for name in out.get("properties", {}))
        lines += ["", f"Result (`{t.output_model.__name__}`): {fields}."]
    lines += [
        "",
        "## Errors",
        "",
        "A tool that cannot do its job (bad argument, unknown VM or task, boot failure)",
        "returns an error result (`isError` over MCP) whose structured content is",
        '`{"error": {"code", "message", "hint", "details"}}` (`hint` and `details` only',
        "when there is something to say: a `not_found` error's `details` name the",
        "`vm_id`, `task_id` or tool `name`); a command that fails inside the guest is a",
        "normal result with its `exit_code`.",
    ]
    return "\n".join(lines) + "\n"
