"""JSON Schemas of the tools' models: as MCP serves them, and rewritten for OpenAI's
strict mode.

Strict mode wants ``additionalProperties: false`` and every property required;
an optional property becomes nullable (null means "use the default"), and the
keywords strict mode does not take (``default``, bounds, lengths, patterns) move
into the description, where the model still reads them.
"""

from __future__ import annotations

import copy
import functools
import json
from typing import Any, Literal

from pydantic import BaseModel

SchemaMode = Literal["validation", "serialization"]


def schema_of(model: type[BaseModel], mode: SchemaMode) -> dict[str, Any]:
    """The model's JSON Schema without pydantic's titles; a fresh copy."""
    return copy.deepcopy(_cached_schema(model, mode))


@functools.cache
def _cached_schema(model: type[BaseModel], mode: SchemaMode) -> dict[str, Any]:
    # pydantic builds a schema in milliseconds; tools/list must not pay that each time.
    return clean(model.model_json_schema(mode=mode))


def clean(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop pydantic's auto-generated ``title`` keys (noise in a model's context)."""

    def walk(node: Any, in_properties: bool = False) -> Any:
        if isinstance(node, dict):
            return {
                k: walk(v, k in ("properties", "$defs"))
                for k, v in node.items()
                if in_properties or k != "title"
            }
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    cleaned: dict[str, Any] = walk(schema)
    if cleaned.get("type") == "object":
        cleaned.setdefault("properties", {})
    return cleaned


_STRICT_MOVED = {
    "default": "default {}",
    "minimum": "minimum {}",
    "maximum": "maximum {}",
    "minLength": "at least {} characters",
    "maxLength": "at most {} characters",
    "pattern": "matching {}",
    "maxItems": "at most {} items",
}


def merge_nullable(prop: dict[str, Any]) -> dict[str, Any]:
    """``anyOf: [{type: T, ...}, {type: null}]`` -> ``type: [T, null]`` (same meaning)."""
    options = prop.get("anyOf")
    if not isinstance(options, list) or len(options) != 2 or {"type": "null"} not in options:
        return prop
    (other,) = [o for o in options if o != {"type": "null"}]
    if not isinstance(other.get("type"), str):
        return prop
    merged = {k: v for k, v in prop.items() if k != "anyOf"}
    merged.update(other)
    merged["type"] = [other["type"], "null"]
    return merged


def strict(schema: dict[str, Any]) -> dict[str, Any]:
    """An object schema (of a tool's arguments) under OpenAI's strict-mode rules."""
    props: dict[str, Any] = {}
    required = set(schema.get("required", []))
    for name, original in schema.get("properties", {}).items():
        prop = merge_nullable(dict(original))
        notes = []
        for key, template in _STRICT_MOVED.items():
            if key in prop:
                value = prop.pop(key)
                note = "non-empty" if (key, value) == ("minLength", 1) else None
                notes.append(note or template.format(json.dumps(value)))
        if name not in required:
            notes.append("null for the default")
            if isinstance(prop.get("type"), list) and "null" in prop["type"]:
                pass
            elif isinstance(prop.get("type"), str):
                prop["type"] = [prop["type"], "null"]
            else:
                prop = {
                    "anyOf": [prop, {"type": "null"}],
                    "description": prop.pop("description", ""),
                }
        if notes:
            prop["description"] = f"{prop.get('description', '')} [{'; '.join(notes)}]".lstrip()
        props[name] = prop
    return {
        "type": "object",
        "properties": props,
        "required": list(props),
        "additionalProperties": False,
    }
