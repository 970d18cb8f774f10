"""Defaults and bounds for every user-supplied size, count and duration.

Defined once here; the SDK, CLI and the tool contract all read them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from pyro_mcp.errors import InvalidInputError, hints

DEFAULT_VCPU_COUNT = 1
MAX_VCPU_COUNT = 8
DEFAULT_MEM_MIB = 512
MIN_MEM_MIB = 128
MAX_MEM_MIB = 16384
DEFAULT_TIMEOUT_SECONDS = 30
MAX_TIMEOUT_SECONDS = 3600
DEFAULT_TTL_SECONDS = 600
MIN_TTL_SECONDS = 10
MAX_TTL_SECONDS = 7 * 24 * 3600
DEFAULT_OUTPUT_CAP = 1 << 20
MAX_OUTPUT_CAP = 16 << 20
# A task's files (task_read_file, task_list_files): what one call returns by default and
# at most (the CLI's and SDK's streaming read has no cap).
DEFAULT_READ_BYTES = 256 << 10
MAX_READ_BYTES = 16 << 20
DEFAULT_LIST_ENTRIES = 1000
MAX_LIST_ENTRIES = 10000
MAX_COMMAND_BYTES = 128 * 1024
MAX_ENV_ENTRIES = 256
MAX_STDIN_TEXT = 16 << 20  # characters of a tool's stdin text (the SDK streams any size)
DEFAULT_TASK_TTL_SECONDS = 24 * 3600
TASK_WORKSPACE = "/workspace"  # where a task's workspace is mounted in the guest
SEED_MAX_TOTAL_BYTES = 2 << 30  # file bytes one workspace seed may write
SEED_MAX_ENTRIES = 200_000  # files, directories and links in one seed
SEED_MAX_FILE_BYTES = 2 << 30  # one file of a seed
MAX_VMS_ENV = "PYRO_MAX_VMS"  # overrides default_max_vms()
VM_MEMORY_BUDGET_MIB = DEFAULT_MEM_MIB + 128  # a default guest plus its VMM, for the VM cap
MAX_VMS_CEILING = 1024

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
VM_ID = re.compile(r"^vm-[0-9a-f]{12}$")
TASK_ID = re.compile(r"^task-[0-9a-f]{12}$")
ID_HEX_PREFIX = re.compile(r"^[0-9a-f]{1,12}$")  # the start of an id's hex part
#: What may name a record where its id is asked for: its full id, a unique prefix of
#: it (with or without the ``task-``/``vm-`` part) or, for tasks, its name. One
#: pattern covers them all (the MCP schemas use it).
REF_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
_TASK_NAME = re.compile(REF_PATTERN)
_ID_SHAPED = re.compile(r"^(task-|vm-|[0-9a-f]+$)")


def check_int(name: str, value: object, low: int, high: int, unit: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError(
            f"{name} must be an integer, got {value!r}", hint=f"pass a whole number for {name}"
        )
    if not low <= value <= high:
        suffix = f" {unit}" if unit else ""
        raise InvalidInputError(
            f"{name} must be between {low} and {high}{suffix}, got {value}",
            hint=f"pass a {name} in {low}..{high}",
        )
    return value


def check_host_path(name: str, value: object) -> Path:
    """A host path given as str or os.PathLike: not empty, no NUL byte."""
    text = os.fspath(value) if isinstance(value, str | os.PathLike) else None
    if not isinstance(text, str) or not text or "\x00" in text:
        raise InvalidInputError(
            f"{name} must be a path (a non-empty string without NUL), got {value!r}",
            hint=f"pass {name} as a str or pathlib.Path",
        )
    return Path(text)


def check_vcpu_count(value: object) -> int:
    return check_int("vcpu_count", value, 1, MAX_VCPU_COUNT)


def check_mem_mib(value: object) -> int:
    return check_int("mem_mib", value, MIN_MEM_MIB, MAX_MEM_MIB, "MiB")


def check_timeout(value: object) -> int:
    return check_int("timeout_seconds", value, 1, MAX_TIMEOUT_SECONDS, "seconds")


def check_ttl(value: object) -> int:
    return check_int("ttl_seconds", value, MIN_TTL_SECONDS, MAX_TTL_SECONDS, "seconds")


def check_output_cap(name: str, value: object) -> int:
    return check_int(name, value, 1024, MAX_OUTPUT_CAP, "bytes")


def check_vm_id(value: object) -> str:
    if not isinstance(value, str) or not VM_ID.fullmatch(value):
        raise InvalidInputError(
            f"invalid VM id {value!r}",
            hints=hints(
                cli="VM ids look like 'vm-0123456789ab'; list them with `pyro vm list`",
                sdk="VM ids look like 'vm-0123456789ab'; list them with Pyro.list_vms()",
                mcp="VM ids look like 'vm-0123456789ab'; list them with the vm_list tool",
            ),
        )
    return value


def check_task_id(value: object) -> str:
    if not isinstance(value, str) or not TASK_ID.fullmatch(value):
        raise InvalidInputError(
            f"invalid task id {value!r}",
            hints=hints(
                cli="task ids look like 'task-0123456789ab'; list them with `pyro task list`",
                sdk="task ids look like 'task-0123456789ab'; list them with Pyro.list_tasks()",
                mcp="task ids look like 'task-0123456789ab'; list them with the task_list tool",
            ),
        )
    return value


def check_task_name(value: object) -> str:
    """A task's name: 1 to 63 of a-z, 0-9, '_', '.', '-' (starting with a letter or
    digit), and not shaped like an id or an id's prefix (``task-...``, ``vm-...``, or
    hex digits only), so that a name and an id prefix never mean two tasks."""
    if not isinstance(value, str) or not _TASK_NAME.fullmatch(value):
        raise InvalidInputError(
            f"invalid task name {value!r}",
            hint="a name is 1-63 of a-z, 0-9, '_', '.', '-', starting with a letter or "
            "digit, e.g. 'api-tests'",
        )
    if _ID_SHAPED.match(value):
        raise InvalidInputError(
            f"invalid task name {value!r}: it could be read as a task id or id prefix",
            hint="names may not start with 'task-' or 'vm-' nor be hex digits only; "
            "e.g. 'build-2' rather than '2'",
        )
    return value


def default_max_vms() -> int:
    """How many VMs may run at once in one state folder by default: what the host's
    memory holds at the default guest size (at least 4, at most 256)."""
    try:
        mem_mib = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
    except (OSError, ValueError):
        return 16
    return max(4, min(256, mem_mib // VM_MEMORY_BUDGET_MIB))


def max_vms() -> int:
    """The cap on concurrently running VMs (``PYRO_MAX_VMS`` or :func:`default_max_vms`)."""
    raw = os.environ.get(MAX_VMS_ENV, "").strip()
    if not raw:
        return default_max_vms()
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_VMS_CEILING:
        raise InvalidInputError(
            f"{MAX_VMS_ENV}={raw!r} is not a VM count",
            hint=f"set {MAX_VMS_ENV} to an integer in 1..{MAX_VMS_CEILING}, or unset it",
        )
    return value


def _utf8_len(value: str, what: str) -> int:
    """Length in bytes; text that cannot travel as UTF-8 (lone surrogates) is refused."""
    try:
        return len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInputError(
            f"{what} is not valid text (it has an unpaired surrogate character)",
            hint="pass valid UTF-8 text",
        ) from None


def check_command(command: object) -> str | list[str]:
    """A string (run by ``sh -lc``) or a non-empty list of argv words."""
    if isinstance(command, str):
        if not command.strip():
            raise InvalidInputError("command is empty", hint="pass a shell command to run")
        if "\x00" in command or _utf8_len(command, "command") > MAX_COMMAND_BYTES:
            raise InvalidInputError(
                "command contains NUL or is longer than 128 KiB",
                hint="drop NUL bytes; pass large inputs as files, not in the command",
            )
        return command
    if isinstance(command, Sequence) and not isinstance(command, bytes | bytearray):
        words = list(command)
        if not words:
            raise InvalidInputError("command is empty", hint="pass at least the program name")
        for word in words:
            if not isinstance(word, str):
                raise InvalidInputError(
                    f"command words must be strings, got {word!r}",
                    hint="convert each argv word to a string",
                )
            if "\x00" in word:
                raise InvalidInputError(
                    "command words must not contain NUL bytes", hint="drop the NUL bytes"
                )
        if not words[0]:
            raise InvalidInputError(
                "the program name (first command word) is empty",
                hint="put the program to run first, e.g. ['ls', '-l']",
            )
        if sum(_utf8_len(w, "a command word") for w in words) > MAX_COMMAND_BYTES:
            raise InvalidInputError(
                "command is longer than 128 KiB",
                hint="pass large inputs as files, not in the command",
            )
        return words
    raise InvalidInputError(
        f"command must be a string or a list of strings, got {command!r}",
        hint="pass a shell string like 'ls -l' or an argv list like ['ls', '-l']",
    )


def check_env(env: Mapping[str, str] | None) -> dict[str, str]:
    if env is None:
        return {}
    if not isinstance(env, Mapping):
        raise InvalidInputError(
            "env must be a mapping of variable names to values",
            hint="pass a dict such as {'NAME': 'value'}",
        )
    if len(env) > MAX_ENV_ENTRIES:
        raise InvalidInputError(
            f"env has more than {MAX_ENV_ENTRIES} entries",
            hint=f"pass at most {MAX_ENV_ENTRIES} variables",
        )
    out: dict[str, str] = {}
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise InvalidInputError(
                f"invalid environment variable name {key!r}",
                hint="names are letters, digits and '_', not starting with a digit",
            )
        if not isinstance(value, str) or "\x00" in value:
            raise InvalidInputError(
                f"environment variable {key} must be a string without NUL",
                hint="convert the value to a string and drop NUL bytes",
            )
        _utf8_len(value, f"environment variable {key}")
        out[key] = value
    return out


def check_cwd(cwd: object) -> str:
    if not isinstance(cwd, str) or not cwd.startswith("/") or "\x00" in cwd or len(cwd) > 4096:
        raise InvalidInputError(
            f"cwd must be an absolute guest path, got {cwd!r}", hint="e.g. /root or /workspace"
        )
    _utf8_len(cwd, "cwd")
    return cwd


def parse_env_pairs(pairs: Sequence[str], *, what: str = "env") -> dict[str, str]:
    """``["NAME=value", ...]`` (the CLI's ``--env`` and the MCP tools' ``env``) as a dict."""
    env: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise InvalidInputError(
                f"{what} entry {pair!r} is not NAME=value", hint="write it as NAME=value"
            )
        env[name] = value
    return check_env(env)


def check_network(network: object) -> bool:
    """``network`` is a boolean; guest networking itself is not available yet."""
    if not isinstance(network, bool):
        raise InvalidInputError("network must be true or false")
    if network:
        raise InvalidInputError(
            "guest networking is not available yet in this version of pyro-mcp",
            hint="run without network (guests have loopback only)",
        )
    return network
