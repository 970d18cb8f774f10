"""The tools' arguments as pydantic models: bounds and defaults from :mod:`pyro_mcp.limits`,
descriptions written for a model.

Every field that several tools share is declared once here. The options of a
command (``cwd``, ``env``) are :data:`GuestCwd` and :data:`EnvPairs` on every
tool that runs one, and :func:`exec_options` turns them into the SDK's keyword
arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypedDict

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from pyro_mcp import limits
from pyro_mcp.environments.catalog import CATALOG, DEFAULT_ENVIRONMENT


class _Input(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _environment_help() -> str:
    names = "; ".join(f"{s.name}: {s.description}" for s in CATALOG.values())
    return (
        f"Guest environment (a Debian image). One of: {names}. "
        "The first use of an environment on a machine builds it (about a minute)."
    )


def _vm_id() -> Any:
    return Field(
        description="The VM's id as returned by vm_create or vm_list, e.g. 'vm-0123456789ab'.",
        pattern=limits.VM_ID.pattern,
    )


def _task_id() -> Any:
    return Field(
        description="The task: its id as returned by task_create or task_list (e.g. "
        "'task-0123456789ab'), a unique start of that id (e.g. 'task-0123' or '0123'), or "
        "the name it was given at task_create.",
        pattern=limits.REF_PATTERN,
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


def _output_cap(stream: str) -> Any:
    return Field(
        default=limits.DEFAULT_OUTPUT_CAP,
        ge=1024,
        le=limits.MAX_OUTPUT_CAP,
        description=(
            f"Most bytes of {stream} kept; the rest is dropped and {stream}_truncated is set."
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


# -- the options of a command, shared by every tool that runs one ------------------


def _check_env_pair(pair: str) -> str:
    limits.parse_env_pairs([pair])  # an InvalidInputError is a ValueError: pydantic reports it
    return pair


#: Where the command runs. ``None`` leaves it to the SDK: a task's /workspace, else
#: the environment's own working directory.
GuestCwd = Annotated[
    str | None,
    Field(
        description=(
            "Absolute guest folder to run the command in, e.g. '/tmp'. null for the "
            "default: /workspace in a task, else the environment's own working directory."
        ),
        min_length=1,
        max_length=4096,
        pattern=r"^/",
    ),
]

#: Extra environment variables as ``NAME=value`` strings (a list, not an object, so
#: the schema stays OpenAI-strict). ``None``: the environment's own variables only.
EnvPairs = Annotated[
    list[Annotated[str, AfterValidator(_check_env_pair)]] | None,
    Field(
        description=(
            "Extra environment variables as 'NAME=value' strings, e.g. ['DEBUG=1']; they "
            "win over the login profile. null: only the environment's own variables."
        ),
        max_length=limits.MAX_ENV_ENTRIES,
    ),
]


#: The command's stdin as text (tools take strings; the SDK and CLI also stream bytes).
StdinText = Annotated[
    str | None,
    Field(
        description=(
            "Text given to the command on its standard input, e.g. the contents of a CSV "
            "for `wc -l` or a script for `python3 -`. null: empty stdin (the command "
            "reads end-of-file at once)."
        ),
        max_length=limits.MAX_STDIN_TEXT,
    ),
]


class ExecOptions(TypedDict, total=False):
    """The SDK keyword arguments a command's options become (only those given)."""

    cwd: str
    env: dict[str, str]
    stdin: str
    on_stdout: Callable[[bytes], None]
    on_stderr: Callable[[bytes], None]


def exec_options(
    cwd: str | None,
    env: list[str] | None,
    stdin: str | None = None,
    on_output: Callable[[bytes], None] | None = None,
) -> ExecOptions:
    """The SDK keyword arguments for ``cwd``, ``env`` and ``stdin``, leaving out those
    that are None so the SDK's own default (the environment's) applies; ``on_output``
    (the caller's :attr:`ToolContext.on_output`) follows both streams."""
    options: ExecOptions = {}
    if on_output is not None:
        options["on_stdout"] = on_output
        options["on_stderr"] = on_output
    if cwd is not None:
        options["cwd"] = cwd
    if env is not None:
        options["env"] = limits.parse_env_pairs(env)
    if stdin is not None:
        options["stdin"] = stdin
    return options


# -- the tools' inputs --------------------------------------------------------------


class NoInput(_Input):
    pass


class VMRunInput(_Input):
    environment: str = _environment()
    command: str = _command()
    vcpu_count: int = _vcpu_count()
    mem_mib: int = _mem_mib()
    timeout_seconds: int = _timeout_seconds()
    ttl_seconds: int = _ttl_seconds()
    network: bool = _network()
    cwd: GuestCwd = None
    env: EnvPairs = None
    stdin: StdinText = None
    stdout_cap: int = _output_cap("stdout")
    stderr_cap: int = _output_cap("stderr")


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
    cwd: GuestCwd = None
    env: EnvPairs = None
    stdin: StdinText = None
    stdout_cap: int = _output_cap("stdout")
    stderr_cap: int = _output_cap("stderr")


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
        default=[],  # pydantic copies it per instance
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
    name: str | None = Field(
        default=None,
        description="A name for the task, unique on this machine (1-63 of a-z, 0-9, '_', "
        "'.', '-'; not hex digits only), e.g. 'api-tests'; it can then be given as task_id.",
        pattern=limits.REF_PATTERN,
    )


class TaskExecInput(_Input):
    task_id: str = _task_id()
    command: str = _command()
    timeout_seconds: int = _timeout_seconds()
    cwd: GuestCwd = None
    env: EnvPairs = None
    stdin: StdinText = None
    stdout_cap: int = _output_cap("stdout")
    stderr_cap: int = _output_cap("stderr")


class TaskIdInput(_Input):
    task_id: str = _task_id()
