"""The tool contract as OpenAI Responses API function tools.

    from openai import OpenAI
    from pyro_mcp.integrations.openai_responses import ToolBox

    box = ToolBox()                        # profile "vm-run": vm_run, vm_list_environments
    response = client.responses.create(model=..., input=..., tools=box.tools)
    for call in box.function_calls(response):
        outputs.append(box.run(call))      # a function_call_output item

Tool definitions use strict mode: ``additionalProperties: false``, every
property required, optional ones nullable (null means the contract's default).
This module does not import ``openai``; it works on the plain JSON shapes, and
on the SDK's objects through their attributes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pyro_mcp.contract import Profile, ToolContext, ToolOutcome, ToolSpec, get_tool, tools_for
from pyro_mcp.errors import InvalidInputError, PyroError

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro

DEFAULT_PROFILE: Profile = "vm-run"


def tool_definition(spec: ToolSpec) -> dict[str, Any]:
    """One Responses API function tool (strict mode) from the contract."""
    return {
        "type": "function",
        "name": spec.name,
        "description": spec.description,
        "parameters": spec.strict_input_schema(),
        "strict": True,
    }


def tool_definitions(profile: Profile = DEFAULT_PROFILE) -> list[dict[str, Any]]:
    return [tool_definition(t) for t in tools_for(profile)]


def _field(item: Any, name: str) -> Any:
    if isinstance(item, Mapping):
        return item.get(name)
    return getattr(item, name, None)


def _parse_arguments(name: str, arguments: str | Mapping[str, Any] | None) -> Mapping[str, Any]:
    if arguments is None:
        return {}
    if not isinstance(arguments, str):
        return arguments
    try:
        parsed = json.loads(arguments or "{}")
    except ValueError as exc:
        raise InvalidInputError(
            f"the arguments for {name} are not valid JSON: {exc}",
            hint="send the arguments as one JSON object",
        ) from None
    if not isinstance(parsed, dict):
        raise InvalidInputError(
            f"the arguments for {name} must be a JSON object, got {type(parsed).__name__}",
            hint="send the arguments as one JSON object",
        )
    return parsed


class ToolBox:
    """The tools of one profile plus a runner for the model's function calls."""

    def __init__(
        self,
        pyro: Pyro | None = None,
        *,
        profile: Profile = DEFAULT_PROFILE,
        context: ToolContext | None = None,
    ) -> None:
        self._pyro = pyro
        self.specs = tools_for(profile)
        # Plain dicts in the SDK's FunctionToolParam shape (typed Any so they pass
        # straight to ``client.responses.create(tools=...)``).
        self.tools: list[Any] = [tool_definition(t) for t in self.specs]
        self.context = context or ToolContext()

    @property
    def pyro(self) -> Pyro:
        if self._pyro is None:
            from pyro_mcp.api import Pyro

            self._pyro = Pyro()
        return self._pyro

    @staticmethod
    def function_calls(response: Any) -> list[Any]:
        """The ``function_call`` items of a response (SDK object or JSON dict)."""
        output: Iterable[Any] = _field(response, "output") or []
        return [item for item in output if _field(item, "type") == "function_call"]

    def call(self, name: str, arguments: str | Mapping[str, Any] | None) -> ToolOutcome:
        """Run one tool by name; ``arguments`` is the model's JSON string or a dict."""
        try:
            spec = get_tool(name, self.specs)
            args = _parse_arguments(name, arguments)
        except PyroError as exc:
            return ToolOutcome.from_error(exc)
        return spec.call(self.pyro, args, self.context)

    def run(self, function_call: Any) -> dict[str, Any]:
        """Answer one ``function_call`` item with its ``function_call_output`` item."""
        outcome = self.call(_field(function_call, "name"), _field(function_call, "arguments"))
        return {
            "type": "function_call_output",
            "call_id": _field(function_call, "call_id"),
            "output": outcome.to_json(),
        }
