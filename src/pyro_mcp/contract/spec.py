"""A tool declared as data (:class:`ToolSpec`), its behaviour hints, its profiles and
the outcome of calling it (:class:`ToolOutcome`)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ValidationError

from pyro_mcp.contract.context import ToolCancelled, ToolContext
from pyro_mcp.contract.outputs import ErrorInfo, ToolError
from pyro_mcp.contract.schema import schema_of, strict
from pyro_mcp.errors import InvalidInputError, PyroError

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro

log = logging.getLogger("pyro_mcp.contract")

Profile = Literal["vm-run", "tasks", "full"]
PROFILES: tuple[Profile, ...] = ("vm-run", "tasks", "full")
DEFAULT_PROFILE: Profile = "tasks"

#: The profile sets the tool table uses: each profile includes the smaller ones.
ALL_PROFILES: frozenset[Profile] = frozenset(PROFILES)
TASK_PROFILES: frozenset[Profile] = frozenset(("tasks", "full"))
FULL_PROFILE: frozenset[Profile] = frozenset(("full",))


@dataclass(frozen=True)
class ToolHints:
    """MCP tool annotations, set truthfully (see each tool's comment)."""

    read_only: bool
    destructive: bool
    idempotent: bool
    open_world: bool


# open_world is false throughout: guests have no network (vm_create/vm_run refuse
# network=true), so no tool reaches anything outside this machine.
READ_ONLY = ToolHints(read_only=True, destructive=False, idempotent=True, open_world=False)


@dataclass(frozen=True)
class ToolOutcome:
    """A tool call's result: ``structured`` is the output model's JSON (or a ToolError's)."""

    ok: bool
    structured: dict[str, Any]
    text: str

    @classmethod
    def from_error(cls, exc: PyroError) -> ToolOutcome:
        """The error as a tool result. Where the error has a hint per surface
        (``details["hints"]``), the model gets the MCP one (e.g. "call task_list"
        rather than a CLI command) and not the others."""
        data = exc.to_dict()
        details = dict(data.get("details") or {})
        hints = details.pop("hints", None)
        if isinstance(hints, dict) and isinstance(hints.get("mcp"), str):
            data["hint"] = hints["mcp"]
            if details:
                data["details"] = details
            else:
                data.pop("details", None)
        error = ToolError(error=ErrorInfo(**data))
        hint = data.get("hint")
        text = f"error ({exc.code}): {exc.message}"
        if hint:
            text += f"\nhint: {hint}"
        return cls(False, error.model_dump(mode="json", exclude_none=True), text)

    def to_json(self) -> str:
        return json.dumps(self.structured, separators=(",", ":"))


Runner = Callable[["Pyro", Any, ToolContext], BaseModel]


@dataclass(frozen=True)
class ToolSpec:
    """One tool: name, a description written for a model (when to use it and when
    not), input and output models, truthful hints, the profiles that offer it, the
    function that runs it against a :class:`~pyro_mcp.api.Pyro` and the short text
    rendering of its result."""

    name: str
    title: str
    description: str
    input_model: type[BaseModel]
    output_model: type[BaseModel]
    hints: ToolHints
    profiles: frozenset[Profile]
    run: Runner
    render: Callable[[Any], str]

    def input_schema(self) -> dict[str, Any]:
        """JSON Schema of the arguments (MCP ``inputSchema``); a fresh copy."""
        return schema_of(self.input_model, "validation")

    def output_schema(self) -> dict[str, Any]:
        """JSON Schema of a successful result (MCP ``outputSchema``); a fresh copy."""
        return schema_of(self.output_model, "serialization")

    def strict_input_schema(self) -> dict[str, Any]:
        """The arguments' schema under OpenAI's strict rules (see :mod:`.schema`)."""
        return strict(self.input_schema())

    def validate(self, arguments: Mapping[str, Any] | None) -> BaseModel:
        """The arguments as the input model; ``None`` values mean "use the default"."""
        args = {k: v for k, v in (arguments or {}).items() if v is not None}
        try:
            return self.input_model.model_validate(args)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'arguments'}: {err['msg']}"
                for err in exc.errors(include_url=False)
            )
            raise InvalidInputError(
                f"invalid arguments for {self.name}: {problems}",
                hint="fix the arguments to match the tool's input schema and call it again",
            ) from None

    def call(
        self, pyro: Pyro, arguments: Mapping[str, Any] | None, context: ToolContext | None = None
    ) -> ToolOutcome:
        """Validate, run and render; raises only ToolCancelled (and BaseExceptions)."""
        ctx = context or ToolContext()
        try:
            args = self.validate(arguments)
            ctx.check_cancelled()
            result = self.run(pyro, args, ctx)
        except ToolCancelled:
            raise
        except PyroError as exc:
            return ToolOutcome.from_error(exc)
        except Exception as exc:
            # Never a traceback to the model: log it for the operator, answer in the
            # one error shape.
            log.exception("tool %s failed unexpectedly", self.name)
            return ToolOutcome.from_error(
                PyroError(
                    f"{self.name} failed unexpectedly: {type(exc).__name__}: {exc}",
                    hint="this is a pyro-mcp bug; retrying may help; `pyro doctor` checks the host",
                )
            )
        return ToolOutcome(True, result.model_dump(mode="json"), self.render(result))
