"""The tool contract: every tool pyro-mcp offers a model, declared once as data.

Each :class:`ToolSpec` holds the tool's name, a description written for a model
(when to use it and when not), a pydantic input model (bounds and defaults from
:mod:`pyro_mcp.limits`), a pydantic output model, truthful behaviour hints and
the function that runs it against a :class:`~pyro_mcp.api.Pyro`. The MCP server,
the OpenAI Responses tool list, the LangChain and PydanticAI tools and the
generated tool reference (docs/tools.md) are all derived from :data:`TOOLS`;
none of them restates a schema.

Calling a tool goes through :meth:`ToolSpec.call`, which never raises for the
tool's own failures: it returns a :class:`ToolOutcome` that is either the
output model (a failing guest command is a normal result with its exit code)
or an error in :meth:`PyroError.to_dict` shape with a message a model can act on.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pyro_mcp import limits
from pyro_mcp.environments.catalog import CATALOG, DEFAULT_ENVIRONMENT
from pyro_mcp.errors import InvalidInputError, PyroError
from pyro_mcp.models import (
    ExecResult,
    NetworkInfo,
    ReapResult,
    TaskDeleteResult,
    TaskExecResult,
    TaskInfo,
    VMInfo,
)

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro

log = logging.getLogger("pyro_mcp.contract")

Profile = Literal["vm-run", "tasks", "full"]
PROFILES: tuple[Profile, ...] = ("vm-run", "tasks", "full")
DEFAULT_PROFILE: Profile = "tasks"

#: How much of stdout/stderr the short text rendering of a result repeats; the
#: structured content always carries the whole (capped) output.
TEXT_OUTPUT_CHARS = 4000


class ToolCancelled(Exception):
    """Raised inside a running tool when its caller cancelled the request."""


# -- inputs -------------------------------------------------------------------------


def _environment_help() -> str:
    names = "; ".join(f"{s.name}: {s.description}" for s in CATALOG.values())
    return (
        f"Guest environment (a Debian image). One of: {names}. "
        "The first use of an environment on a machine builds it (about a minute)."
    )


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _vm_id() -> Any:
    return Field(
        description="The VM's id as returned by vm_create or vm_list, e.g. 'vm-0123456789ab'.",
        pattern=r"^vm-[0-9a-f]{12}$",
    )


def _environment() -> Any:
    return Field(default=DEFAULT_ENVIRONMENT, description=_environment_help())


def _command() -> Any:
    return Field(
        description=(
            "Shell command line, run as root by `sh -lc` in the guest (pipes, `&&` and "
            "redirections work). Example: 'python3 -c \"print(2**10)\"'."
        ),
        min_length=1,
        max_length=limits.MAX_COMMAND_BYTES,
    )


def _vcpu_count() -> Any:
    return Field(
        default=limits.DEFAULT_VCPU_COUNT,
        ge=1,
        le=limits.MAX_VCPU_COUNT,
        description="Virtual CPUs for the VM.",
    )


def _mem_mib() -> Any:
    return Field(
        default=limits.DEFAULT_MEM_MIB,
        ge=limits.MIN_MEM_MIB,
        le=limits.MAX_MEM_MIB,
        description="Guest memory in MiB.",
    )


def _timeout_seconds() -> Any:
    return Field(
        default=limits.DEFAULT_TIMEOUT_SECONDS,
        ge=1,
        le=limits.MAX_TIMEOUT_SECONDS,
        description=(
            "Seconds the command may run; then it is killed and the result says timed_out. "
            "Guests are emulated and CPU work is slow, so allow generous time for builds."
        ),
    )


def _ttl_seconds() -> Any:
    return Field(
        default=limits.DEFAULT_TTL_SECONDS,
        ge=limits.MIN_TTL_SECONDS,
        le=limits.MAX_TTL_SECONDS,
        description="Seconds after which the VM is deleted even if nobody deletes it.",
    )


def _network() -> Any:
    return Field(
        default=False,
        description=(
            "Give the guest network access. Not available in this version: leave it false "
            "(guests have loopback only)."
        ),
    )


class VMRunInput(_Input):
    environment: str = _environment()
    command: str = _command()
    vcpu_count: int = _vcpu_count()
    mem_mib: int = _mem_mib()
    timeout_seconds: int = _timeout_seconds()
    ttl_seconds: int = _ttl_seconds()
    network: bool = _network()


class NoInput(_Input):
    pass


class VMCreateInput(_Input):
    environment: str = _environment()
    vcpu_count: int = _vcpu_count()
    mem_mib: int = _mem_mib()
    ttl_seconds: int = _ttl_seconds()
    network: bool = _network()


class VMIdInput(_Input):
    vm_id: str = _vm_id()


class VMExecInput(_Input):
    vm_id: str = _vm_id()
    command: str = _command()
    timeout_seconds: int = _timeout_seconds()


def _task_id() -> Any:
    return Field(
        description="The task's id as returned by task_create or task_list, e.g. "
        "'task-0123456789ab'.",
        pattern=r"^task-[0-9a-f]{12}$",
    )


class TaskCreateInput(_Input):
    environment: str = _environment()
    source_path: str | None = Field(
        default=None,
        description=(
            "Host folder or .tar/.tar.gz/.tar.bz2/.tar.xz archive copied into /workspace "
            "(relative paths are taken from the first allowed folder). Only folders the "
            "server allows can be read (the client's roots, --allow-path, or the server's "
            "working directory). Omit for an empty /workspace."
        ),
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Glob patterns of paths not to copy, e.g. ['.git', 'node_modules', '*.pyc'].",
        max_length=256,
    )
    vcpu_count: int = _vcpu_count()
    mem_mib: int = _mem_mib()
    ttl_seconds: int = Field(
        default=limits.DEFAULT_TASK_TTL_SECONDS,
        ge=limits.MIN_TTL_SECONDS,
        le=limits.MAX_TTL_SECONDS,
        description="Seconds after which the task is deleted even if nobody deletes it.",
    )
    network: bool = _network()


class TaskExecInput(_Input):
    task_id: str = _task_id()
    command: str = _command()
    timeout_seconds: int = _timeout_seconds()
    cwd: str = Field(
        default=limits.TASK_WORKSPACE,
        description="Absolute guest folder to run in; files in /workspace persist.",
        min_length=1,
        max_length=4096,
        pattern=r"^/",
    )
    env: list[str] = Field(
        default_factory=list,
        description=(
            "Extra environment variables as 'NAME=value' strings, e.g. ['DEBUG=1']; "
            "they win over the login profile."
        ),
        max_length=limits.MAX_ENV_ENTRIES,
    )


class TaskIdInput(_Input):
    task_id: str = _task_id()


# -- outputs that wrap the SDK's models into one JSON object ------------------------


class EnvironmentEntry(BaseModel):
    name: str = Field(description="Pass this as `environment`.")
    version: str
    description: str
    installed: bool = Field(
        description="Built on this machine already; otherwise the first use builds it."
    )


class EnvironmentList(BaseModel):
    environments: list[EnvironmentEntry]


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


# -- per-call context ---------------------------------------------------------------


@dataclass
class ToolContext:
    """What a call needs besides its arguments.

    ``source_roots``: the folders a ``source_path`` may come from (symlinks are
    resolved before the check, so none can point out of a root). ``None`` means
    the current working directory.
    """

    source_roots: Sequence[Path] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)

    def check_cancelled(self) -> None:
        if self.cancelled.is_set():
            raise ToolCancelled("the request was cancelled")

    def roots(self) -> list[Path]:
        roots = self.source_roots if self.source_roots else [Path.cwd()]
        return [Path(os.path.realpath(r)) for r in roots]


def resolve_source_path(path: str, roots: Sequence[Path]) -> Path:
    """The real path of ``path`` if it lies under one of ``roots``; else InvalidInputError.

    Relative paths are taken relative to the first root. Symlinks (in the path
    and in the roots) are resolved first, so a link cannot lead out of a root.
    """
    if not roots:
        raise InvalidInputError("no folder is allowed as a source_path here")
    if not isinstance(path, str) or not path or "\x00" in path:
        raise InvalidInputError(f"source_path must be a non-empty path, got {path!r}")
    real_roots = [Path(os.path.realpath(r)) for r in roots]
    candidate = Path(path).expanduser()
    if not candidate.is_absolute():
        candidate = real_roots[0] / candidate
    real = Path(os.path.realpath(candidate))
    allowed = ", ".join(str(r) for r in real_roots)
    if not any(real == root or real.is_relative_to(root) for root in real_roots):
        raise InvalidInputError(
            f"source_path {path!r} (resolved to {real}) is outside the folders this "
            f"server may read: {allowed}",
            hint=(
                "pass a path inside one of those folders; to allow another folder, start "
                "`pyro mcp serve` with `--allow-path DIR` or add DIR as a root in the MCP client"
            ),
            details={"source_path": path, "resolved": str(real), "allowed_roots": allowed},
        )
    if not real.exists():
        raise InvalidInputError(
            f"source_path {path!r} does not exist",
            hint=f"pass an existing file or folder under {allowed}",
        )
    return real


# -- the spec -----------------------------------------------------------------------


@dataclass(frozen=True)
class ToolHints:
    """MCP tool annotations, set truthfully (see each tool's comment)."""

    read_only: bool
    destructive: bool
    idempotent: bool
    open_world: bool


@dataclass(frozen=True)
class ToolOutcome:
    """A tool call's result: ``structured`` is the output model's JSON (or a ToolError's)."""

    ok: bool
    structured: dict[str, Any]
    text: str

    @classmethod
    def from_error(cls, exc: PyroError) -> ToolOutcome:
        error = ToolError(error=ErrorInfo(**exc.to_dict()))
        text = f"error ({exc.code}): {exc.message}"
        if exc.hint:
            text += f"\nhint: {exc.hint}"
        return cls(False, error.model_dump(mode="json", exclude_none=True), text)

    def to_json(self) -> str:
        return json.dumps(self.structured, separators=(",", ":"))


Runner = Callable[["Pyro", Any, ToolContext], BaseModel]


@dataclass(frozen=True)
class ToolSpec:
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
        return copy.deepcopy(_schema_of(self.input_model, "validation"))

    def output_schema(self) -> dict[str, Any]:
        """JSON Schema of a successful result (MCP ``outputSchema``); a fresh copy."""
        return copy.deepcopy(_schema_of(self.output_model, "serialization"))

    def strict_input_schema(self) -> dict[str, Any]:
        """The arguments' schema under OpenAI's strict rules.

        ``additionalProperties: false``, every property required, optional ones
        nullable (null means "use the default"); keywords strict mode does not
        take (``default``, bounds, lengths, patterns) move into the description.
        """
        return _strict(self.input_schema())

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


@functools.cache
def _schema_of(
    model: type[BaseModel], mode: Literal["validation", "serialization"]
) -> dict[str, Any]:
    # pydantic builds a schema in milliseconds; tools/list must not pay that each time.
    return _clean(model.model_json_schema(mode=mode))


def _clean(schema: dict[str, Any]) -> dict[str, Any]:
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


def _merge_nullable(prop: dict[str, Any]) -> dict[str, Any]:
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


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = set(schema.get("required", []))
    for name, original in schema.get("properties", {}).items():
        prop = _merge_nullable(dict(original))
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


# -- runners and renderers ----------------------------------------------------------


def _run_vm_run(pyro: Pyro, args: VMRunInput, ctx: ToolContext) -> ExecResult:
    del ctx
    return pyro.run_in_vm(
        args.environment,
        args.command,
        vcpu_count=args.vcpu_count,
        mem_mib=args.mem_mib,
        timeout_seconds=args.timeout_seconds,
        ttl_seconds=args.ttl_seconds,
        network=args.network,
    )


def _run_list_environments(pyro: Pyro, args: NoInput, ctx: ToolContext) -> EnvironmentList:
    del args, ctx
    return EnvironmentList(
        environments=[
            EnvironmentEntry(
                name=e["name"],
                version=e["version"],
                description=e["description"],
                installed=bool(e["installed"]),
            )
            for e in pyro.list_environments()
        ]
    )


def _run_vm_create(pyro: Pyro, args: VMCreateInput, ctx: ToolContext) -> VMInfo:
    del ctx
    return pyro.create_vm(
        args.environment,
        vcpu_count=args.vcpu_count,
        mem_mib=args.mem_mib,
        ttl_seconds=args.ttl_seconds,
        network=args.network,
    )


def _run_vm_start(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> VMInfo:
    del ctx
    return pyro.start_vm(args.vm_id)


def _run_vm_exec(pyro: Pyro, args: VMExecInput, ctx: ToolContext) -> ExecResult:
    del ctx
    return pyro.exec_vm(args.vm_id, args.command, timeout_seconds=args.timeout_seconds)


def _run_vm_stop(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> VMInfo:
    del ctx
    return pyro.stop_vm(args.vm_id)


def _run_vm_delete(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> DeleteResult:
    del ctx
    data = pyro.delete_vm(args.vm_id)
    return DeleteResult(vm_id=str(data["vm_id"]), deleted=bool(data["deleted"]))


def _run_vm_status(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> VMInfo:
    del ctx
    return pyro.status_vm(args.vm_id)


def _run_vm_list(pyro: Pyro, args: NoInput, ctx: ToolContext) -> VMList:
    del args, ctx
    return VMList(vms=pyro.list_vms())


def _run_vm_network_info(pyro: Pyro, args: VMIdInput, ctx: ToolContext) -> NetworkInfo:
    del ctx
    return pyro.network_info_vm(args.vm_id)


def _run_vm_reap(pyro: Pyro, args: NoInput, ctx: ToolContext) -> ReapResult:
    del args, ctx
    return pyro.reap_expired()


def _run_task_create(pyro: Pyro, args: TaskCreateInput, ctx: ToolContext) -> TaskInfo:
    source = None
    if args.source_path is not None:
        source = resolve_source_path(args.source_path, ctx.roots())
    ctx.check_cancelled()
    return pyro.create_task(
        args.environment,
        source_path=source,
        exclude=args.exclude,
        vcpu_count=args.vcpu_count,
        mem_mib=args.mem_mib,
        ttl_seconds=args.ttl_seconds,
        network=args.network,
    )


def _env_pairs(pairs: list[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInputError(
                f"env entry {pair!r} is not NAME=value", hint="write it as 'NAME=value'"
            )
        env[name] = value
    return env


def _run_task_exec(pyro: Pyro, args: TaskExecInput, ctx: ToolContext) -> TaskExecResult:
    del ctx
    return pyro.exec_task(
        args.task_id,
        args.command,
        timeout_seconds=args.timeout_seconds,
        cwd=args.cwd,
        env=_env_pairs(args.env),
    )


def _run_task_status(pyro: Pyro, args: TaskIdInput, ctx: ToolContext) -> TaskInfo:
    del ctx
    return pyro.status_task(args.task_id)


def _run_task_list(pyro: Pyro, args: NoInput, ctx: ToolContext) -> TaskList:
    del args, ctx
    return TaskList(tasks=pyro.list_tasks())


def _run_task_delete(pyro: Pyro, args: TaskIdInput, ctx: ToolContext) -> TaskDeleteResult:
    del ctx
    return pyro.delete_task(args.task_id)


def _clip(text: str, limit: int = TEXT_OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    return (
        f"[... {len(text) - limit} earlier characters in structuredContent ...]\n" + text[-limit:]
    )


def render_exec(result: ExecResult | TaskExecResult) -> str:
    state = "timed out" if result.timed_out else f"exit code {result.exit_code}"
    where = [result.environment]
    if result.boot:
        where.append(f"{result.boot} boot")
    if isinstance(result, TaskExecResult):
        where.append(result.task_id)
    else:
        where.append(result.vm_id)
        if result.cleanup and result.cleanup.deleted:
            where.append("VM deleted")
    lines = [f"{state} ({result.duration_ms} ms, {', '.join(where)})"]
    for name, text, cut in (
        ("stdout", result.stdout, result.stdout_truncated),
        ("stderr", result.stderr, result.stderr_truncated),
    ):
        if text or cut:
            lines.append(f"--- {name}{' (truncated at its cap)' if cut else ''} ---")
            lines.append(_clip(text).rstrip("\n"))
    return "\n".join(lines)


def render_vm(info: VMInfo) -> str:
    line = (
        f"{info.vm_id}: {info.environment} {info.status}"
        f"{f' ({info.boot} boot)' if info.boot else ''}, {info.vcpu_count} vCPU, "
        f"{info.mem_mib} MiB, TTL {info.ttl_seconds} s"
    )
    return f"{line}; {info.detail}" if info.detail else line


def render_task(info: TaskInfo) -> str:
    seed = info.workspace_seed
    source = f" from {seed.source_path}" if seed.source_path else ""
    line = (
        f"{info.task_id}: {info.environment} {info.status}, {info.workspace_path} "
        f"({seed.mode}{source}: {seed.entry_count} entries, {seed.bytes_written} bytes), "
        f"TTL {info.ttl_seconds} s"
    )
    return f"{line}; {info.detail}" if info.detail else line


def _render_tasks(result: TaskList) -> str:
    return "\n".join(render_task(t) for t in result.tasks) or "no tasks"


def _render_task_delete(result: TaskDeleteResult) -> str:
    return f"deleted {result.task_id}"


def _render_envs(result: EnvironmentList) -> str:
    return "\n".join(
        f"{e.name}{' (installed)' if e.installed else ''}: {e.description}"
        for e in result.environments
    )


def _render_vms(result: VMList) -> str:
    return "\n".join(render_vm(v) for v in result.vms) or "no VMs"


def _render_delete(result: DeleteResult) -> str:
    return f"deleted {result.vm_id}"


def _render_network(result: NetworkInfo) -> str:
    return f"{result.vm_id}: {result.detail} (interfaces: {', '.join(result.interfaces)})"


def _render_reap(result: ReapResult) -> str:
    if not result.reaped:
        return "nothing to reap"
    return "\n".join(f"reaped {v} ({result.reasons.get(v, '?')})" for v in result.reaped)


# -- the tools ----------------------------------------------------------------------

_ALL: frozenset[Profile] = frozenset(PROFILES)
_TASKS: frozenset[Profile] = frozenset(("tasks", "full"))
_FULL: frozenset[Profile] = frozenset(("full",))

_RO = ToolHints(read_only=True, destructive=False, idempotent=True, open_world=False)

# open_world is false throughout: guests have no network (vm_create/vm_run refuse
# network=true), so no tool reaches anything outside this machine.
TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        name="vm_run",
        title="Run a command in a fresh microVM",
        description=(
            "Run one shell command in a fresh, disposable Linux microVM and return its "
            "exit code, stdout and stderr. The VM boots for this call (about a second), "
            "runs the command as root, and is always deleted afterwards: nothing persists "
            "between calls and nothing touches the host. Use this first and by default: "
            "trying code, checking how a tool behaves on Linux, running anything untrusted. "
            "Chain steps in one command with `&&`. Not for: several commands that must "
            "share files or state (use task_create then task_exec), or anything that needs "
            "the internet (guests have no network). A non-zero exit code is a normal "
            "result, not an error: read exit_code, stderr and timed_out."
        ),
        input_model=VMRunInput,
        output_model=ExecResult,
        # Creates and deletes its own VM; destroys nothing that existed before.
        hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
        profiles=_ALL,
        run=_run_vm_run,
        render=render_exec,
    ),
    ToolSpec(
        name="vm_list_environments",
        title="List guest environments",
        description=(
            "List the guest environments (Linux images) a VM can use, with what each "
            "contains and whether it is already built on this machine. Call it when you "
            "need a tool that may not be in the default environment (e.g. a compiler); "
            "otherwise just call vm_run with the default."
        ),
        input_model=NoInput,
        output_model=EnvironmentList,
        hints=_RO,
        profiles=_ALL,
        run=_run_list_environments,
        render=_render_envs,
    ),
    ToolSpec(
        name="task_create",
        title="Create a persistent workspace (task)",
        description=(
            "Create a task: a microVM with a /workspace folder that keeps its files "
            "between task_exec calls, optionally starting as a copy of source_path (a host "
            "folder or .tar archive; the host copy is never modified). Use it only when "
            "several commands must share files, e.g. copy a project in, then build it, then "
            "run its tests. For a single command use vm_run instead. Returns task_id; call "
            "task_delete when done (otherwise it is removed after ttl_seconds)."
        ),
        input_model=TaskCreateInput,
        output_model=TaskInfo,
        # Reads source_path on the host; writes only the task's own copy.
        hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
        profiles=_TASKS,
        run=_run_task_create,
        render=render_task,
    ),
    ToolSpec(
        name="task_exec",
        title="Run a command in a task",
        description=(
            "Run one shell command as root in a task's /workspace (the working directory); "
            "files, builds and installed packages persist for the next task_exec. A "
            "non-zero exit code is a normal result: read exit_code and stderr. A command "
            "that times out is killed; the task stays. Not for one-off commands that need "
            "no shared files: use vm_run."
        ),
        input_model=TaskExecInput,
        output_model=TaskExecResult,
        # A command may delete or overwrite files in the task's workspace (never the host's).
        hints=ToolHints(read_only=False, destructive=True, idempotent=False, open_world=False),
        profiles=_TASKS,
        run=_run_task_exec,
        render=render_exec,
    ),
    ToolSpec(
        name="task_status",
        title="Show a task",
        description="Show one task's state, environment, workspace origin and expiry time.",
        input_model=TaskIdInput,
        output_model=TaskInfo,
        hints=_RO,
        profiles=_TASKS,
        run=_run_task_status,
        render=render_task,
    ),
    ToolSpec(
        name="task_list",
        title="List tasks",
        description="List the tasks on this machine, e.g. to find one to reuse or delete.",
        input_model=NoInput,
        output_model=TaskList,
        hints=_RO,
        profiles=_TASKS,
        run=_run_task_list,
        render=_render_tasks,
    ),
    ToolSpec(
        name="task_delete",
        title="Delete a task",
        description=(
            "Delete a task: stop its VM and remove its /workspace for good. Call it when "
            "you are done with a task."
        ),
        input_model=TaskIdInput,
        output_model=TaskDeleteResult,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=_TASKS,
        run=_run_task_delete,
        render=_render_task_delete,
    ),
    ToolSpec(
        name="vm_create",
        title="Define a VM (advanced)",
        description=(
            "Define a VM without booting it; returns its vm_id for vm_start. Advanced, "
            "step-by-step lifecycle: prefer vm_run for a command, and tasks for repeated "
            "commands in one workspace. Undeleted VMs are removed after ttl_seconds."
        ),
        input_model=VMCreateInput,
        output_model=VMInfo,
        hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
        profiles=_FULL,
        run=_run_vm_create,
        render=render_vm,
    ),
    ToolSpec(
        name="vm_start",
        title="Boot a created VM (advanced)",
        description=(
            "Boot a VM made by vm_create and wait until it is ready for vm_exec. "
            "Prefer vm_run unless you need this step-by-step lifecycle."
        ),
        input_model=VMIdInput,
        output_model=VMInfo,
        hints=ToolHints(read_only=False, destructive=False, idempotent=False, open_world=False),
        profiles=_FULL,
        run=_run_vm_start,
        render=render_vm,
    ),
    ToolSpec(
        name="vm_exec",
        title="Run a command in a started VM, then delete it (advanced)",
        description=(
            "Run one shell command in a VM started by vm_start; the VM is deleted "
            "afterwards (this lifecycle is one command per VM). Prefer vm_run, which does "
            "create+start+exec in one call; for several commands in one place use tasks."
        ),
        input_model=VMExecInput,
        output_model=ExecResult,
        # Deletes the VM when the command finishes.
        hints=ToolHints(read_only=False, destructive=True, idempotent=False, open_world=False),
        profiles=_FULL,
        run=_run_vm_exec,
        render=render_exec,
    ),
    ToolSpec(
        name="vm_stop",
        title="Stop a VM (advanced)",
        description=(
            "Power off a running VM (its processes and memory are lost; it can be "
            "started again). Use vm_delete to remove it for good."
        ),
        input_model=VMIdInput,
        output_model=VMInfo,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=_FULL,
        run=_run_vm_stop,
        render=render_vm,
    ),
    ToolSpec(
        name="vm_delete",
        title="Delete a VM",
        description=(
            "Stop a VM if it runs and delete it with its disk. Not needed after vm_run "
            "or vm_exec, which delete their VM themselves."
        ),
        input_model=VMIdInput,
        output_model=DeleteResult,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=_FULL,
        run=_run_vm_delete,
        render=_render_delete,
    ),
    ToolSpec(
        name="vm_status",
        title="Show a VM",
        description="Show one VM's state, size, environment and expiry time.",
        input_model=VMIdInput,
        output_model=VMInfo,
        hints=_RO,
        profiles=_FULL,
        run=_run_vm_status,
        render=render_vm,
    ),
    ToolSpec(
        name="vm_list",
        title="List VMs",
        description="List the VMs that exist on this machine and their states.",
        input_model=NoInput,
        output_model=VMList,
        hints=_RO,
        profiles=_FULL,
        run=_run_vm_list,
        render=_render_vms,
    ),
    ToolSpec(
        name="vm_network_info",
        title="Show a VM's network",
        description="Show whether a VM has network access and which interfaces it has.",
        input_model=VMIdInput,
        output_model=NetworkInfo,
        hints=_RO,
        profiles=_FULL,
        run=_run_vm_network_info,
        render=_render_network,
    ),
    ToolSpec(
        name="vm_reap_expired",
        title="Clean up expired VMs",
        description=(
            "Delete VMs past their TTL and VMs left behind by processes that exited. "
            "Runs automatically when the server starts; call it only to free resources now."
        ),
        input_model=NoInput,
        output_model=ReapResult,
        hints=ToolHints(read_only=False, destructive=True, idempotent=True, open_world=False),
        profiles=_FULL,
        run=_run_vm_reap,
        render=_render_reap,
    ),
)

TOOLS_BY_NAME: dict[str, ToolSpec] = {t.name: t for t in TOOLS}


def tools_for(profile: Profile = DEFAULT_PROFILE) -> list[ToolSpec]:
    """The tools a profile exposes, in declaration order."""
    if profile not in PROFILES:
        raise InvalidInputError(
            f"unknown profile {profile!r}", hint=f"choose one of: {', '.join(PROFILES)}"
        )
    return [t for t in TOOLS if profile in t.profiles]


def get_tool(name: str, tools: Sequence[ToolSpec] = TOOLS) -> ToolSpec:
    from pyro_mcp.errors import NotFoundError

    for tool in tools:
        if tool.name == name:
            return tool
    names = ", ".join(t.name for t in tools)
    raise NotFoundError(f"unknown tool {name!r}", hint=f"available tools: {names}")


# -- the generated tool reference (docs/tools.md) -----------------------------------


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
    if "minimum" in schema or "maximum" in schema:
        return f"{schema.get('minimum', '')}..{schema.get('maximum', '')}"
    if "pattern" in schema:
        return f"`{schema['pattern']}`"
    return ""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """docs/tools.md: every tool with its profiles, hints, parameters and result."""
    lines = [
        "# Tool reference",
        "",
        "<!-- Generated from src/pyro_mcp/contract.py; do not edit. Regenerate with:",
        "     uv run python -m pyro_mcp.contract > docs/tools.md -->",
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
        '`{"error": {"code", "message", "hint", "details"}}`; a command that fails inside',
        "the guest is a normal result with its `exit_code`.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(reference_markdown(), end="")
