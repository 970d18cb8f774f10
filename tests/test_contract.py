"""The tool contract: one declaration per tool, from which everything else is generated."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from pyro_mcp import limits
from pyro_mcp.api import Pyro
from pyro_mcp.contract import (
    PROFILES,
    TOOLS,
    NoInput,
    TaskExecInput,
    ToolContext,
    ToolHints,
    ToolSpec,
    VMExecInput,
    VMRunInput,
    exec_options,
    get_tool,
    reference_markdown,
    resolve_source_path,
    tools_for,
)
from pyro_mcp.errors import InvalidInputError, NotFoundError

DOCS = Path(__file__).resolve().parent.parent / "docs" / "tools.md"


def test_every_tool_is_declared_once_with_schemas_and_hints() -> None:
    names = [t.name for t in TOOLS]
    assert len(names) == len(set(names))
    for tool in TOOLS:
        assert tool.input_schema()["type"] == "object"
        assert tool.input_schema().get("additionalProperties") is False
        assert tool.output_schema()["type"] == "object"
        assert isinstance(tool.hints, ToolHints)
        assert not (tool.hints.read_only and tool.hints.destructive), tool.name
        assert tool.profiles, tool.name
        # no pydantic noise in what a model reads
        assert "title" not in tool.input_schema()


def test_profiles_nest_and_steer_to_vm_run() -> None:
    small, tasks, full = (set(t.name for t in tools_for(p)) for p in PROFILES)
    assert small == {"vm_run", "vm_list_environments"}
    assert small <= tasks <= full
    assert full == {t.name for t in TOOLS}
    assert tools_for()[0].name == "vm_run"
    lifecycle = [t for t in TOOLS if t.name in ("vm_create", "vm_start", "vm_exec")]
    for tool in lifecycle:
        assert "prefer vm_run" in tool.description.lower(), tool.name
    with pytest.raises(InvalidInputError):
        tools_for("everything")  # type: ignore[arg-type]


def test_defaults_and_bounds_come_from_limits() -> None:
    props = get_tool("vm_run").input_schema()["properties"]
    assert props["vcpu_count"]["default"] == limits.DEFAULT_VCPU_COUNT
    assert props["vcpu_count"]["maximum"] == limits.MAX_VCPU_COUNT
    assert props["mem_mib"]["minimum"] == limits.MIN_MEM_MIB
    assert props["mem_mib"]["maximum"] == limits.MAX_MEM_MIB
    assert props["timeout_seconds"]["default"] == limits.DEFAULT_TIMEOUT_SECONDS
    assert props["timeout_seconds"]["maximum"] == limits.MAX_TIMEOUT_SECONDS
    assert props["ttl_seconds"]["minimum"] == limits.MIN_TTL_SECONDS
    assert list(props) == [
        "environment",
        "command",
        "vcpu_count",
        "mem_mib",
        "timeout_seconds",
        "ttl_seconds",
        "network",
        "cwd",
        "env",
        "stdin",
        "stdout_cap",
        "stderr_cap",
    ]
    assert props["stdin"]["anyOf"][0]["maxLength"] == limits.MAX_STDIN_TEXT
    for cap in ("stdout_cap", "stderr_cap"):
        assert props[cap]["default"] == limits.DEFAULT_OUTPUT_CAP
        assert props[cap]["maximum"] == limits.MAX_OUTPUT_CAP


def test_every_command_tool_takes_the_same_exec_options() -> None:
    runners = [t for t in TOOLS if "command" in t.input_schema()["properties"]]
    assert {t.name for t in runners} == {"vm_run", "vm_exec", "task_exec"}
    shapes = []
    for tool in runners:
        props = tool.input_schema()["properties"]
        assert props["cwd"]["default"] is None and props["env"]["default"] is None, tool.name
        assert "null" in props["cwd"]["description"], tool.name
        shapes.append((props["cwd"], props["env"]))
        strict = tool.strict_input_schema()["properties"]
        assert strict["cwd"]["type"] == ["string", "null"], tool.name
        assert strict["env"]["type"] == ["array", "null"], tool.name
        assert strict["env"]["items"] == {"type": "string"}, tool.name
        assert strict["stdin"]["type"] == ["string", "null"], tool.name
        assert props["stdin"]["default"] is None and "stdin" in props["stdin"]["description"]
        shapes.append(props["stdin"])
    assert all(shape == shapes[0] for shape in shapes[::2])  # one definition, not three
    assert all(shape == shapes[1] for shape in shapes[1::2])


def test_exec_options_pass_only_what_was_given() -> None:
    assert exec_options(None, None) == {}
    assert exec_options("/tmp", None) == {"cwd": "/tmp"}
    assert exec_options(None, []) == {"env": {}}
    assert exec_options(None, None, "") == {"stdin": ""}
    assert exec_options(None, None, None) == {}
    assert exec_options(None, ["A=1", "B=x=y", "A=2", "C="]) == {
        "env": {"A": "2", "B": "x=y", "C": ""}
    }
    with pytest.raises(InvalidInputError) as info:
        exec_options(None, ["NOEQUALS"])
    assert info.value.hint == "write it as NAME=value"


def test_bad_exec_options_are_refused_before_any_vm(state_dir: Path) -> None:
    pyro = Pyro(state_dir=state_dir, reap=False)
    for name, base in (
        ("vm_run", {"command": "true"}),
        ("vm_exec", {"vm_id": "vm-000000000000", "command": "true"}),
        ("task_exec", {"task_id": "task-000000000000", "command": "true"}),
    ):
        spec = get_tool(name)
        for bad, why in (
            ({"env": ["NOEQUALS"]}, "not NAME=value"),
            ({"cwd": "relative/dir"}, "cwd"),
            ({"env": "A=1"}, "env"),
            ({"env": [f"V{i}=1" for i in range(limits.MAX_ENV_ENTRIES + 1)]}, "env"),
        ):
            outcome = spec.call(pyro, base | bad)
            assert not outcome.ok, (name, bad)
            error = outcome.structured["error"]
            assert error["code"] == "invalid_input", (name, bad, error)
            assert why in error["message"], (name, bad, error)
        args = spec.validate(base | {"cwd": None, "env": None})
        assert isinstance(args, VMRunInput | VMExecInput | TaskExecInput)
        assert exec_options(args.cwd, args.env) == {}
    assert list((state_dir / "vms").glob("vm-*")) == []


def test_validate_treats_null_as_default_and_rejects_the_rest() -> None:
    spec = get_tool("vm_run")
    args = spec.validate({"command": "true", "vcpu_count": None, "mem_mib": None})
    assert isinstance(args, VMRunInput)
    assert (args.vcpu_count, args.mem_mib) == (limits.DEFAULT_VCPU_COUNT, limits.DEFAULT_MEM_MIB)
    for bad in (
        {},
        {"command": ""},
        {"command": "true", "vcpu_count": limits.MAX_VCPU_COUNT + 1},
        {"command": "true", "extra": 1},
        {"command": "true", "timeout_seconds": "soon"},
    ):
        with pytest.raises(InvalidInputError) as info:
            spec.validate(bad)
        assert info.value.hint


def test_strict_schemas_follow_openai_rules() -> None:
    for tool in TOOLS:
        plain = tool.input_schema()
        strict = tool.strict_input_schema()
        assert strict["additionalProperties"] is False
        assert strict["required"] == list(strict["properties"]) == list(plain["properties"])
        for name, prop in strict["properties"].items():
            assert not {"default", "minimum", "maximum", "pattern"} & set(prop), (tool.name, name)
            optional = name not in plain.get("required", [])
            types = prop.get("type", [])
            assert ("null" in types) == optional, (tool.name, name, prop)


def test_resolve_source_path_confines_to_roots(tmp_path: Path) -> None:
    root = tmp_path / "project"
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.py").write_text("print(1)\n")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "key").write_text("k")
    (root / "escape").symlink_to(outside)
    (root / "inside-link").symlink_to(root / "src")

    assert resolve_source_path(str(root / "src"), [root]) == root / "src"
    assert resolve_source_path("src/a.py", [root]) == root / "src" / "a.py"  # relative: 1st root
    assert resolve_source_path(str(root / "inside-link"), [root]) == root / "src"
    for bad in (str(outside), str(root / "escape"), str(root / "escape" / "key"), "../secret"):
        with pytest.raises(InvalidInputError) as info:
            resolve_source_path(bad, [root])
        assert "--allow-path" in (info.value.hint or "")
        assert str(root) in info.value.message
    with pytest.raises(InvalidInputError, match="does not exist"):
        resolve_source_path(str(root / "missing"), [root])
    # a root reached through a symlink still works
    link_root = tmp_path / "link-root"
    link_root.symlink_to(root)
    assert resolve_source_path(str(link_root / "src"), [link_root]) == root / "src"
    assert resolve_source_path(str(outside), [root, outside]) == outside


def test_context_roots_default_to_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert ToolContext().roots() == [Path(os.path.realpath(tmp_path))]
    assert ToolContext(source_roots=[tmp_path / "x"]).roots() == [tmp_path / "x"]


def test_call_turns_failures_into_error_outcomes(state_dir: Path) -> None:
    pyro = Pyro(state_dir=state_dir, reap=False)
    missing = get_tool("vm_status").call(pyro, {"vm_id": "vm-000000000000"})
    assert not missing.ok
    assert missing.structured["error"]["code"] == NotFoundError.code
    assert "hint:" in missing.text

    bad = get_tool("vm_status").call(pyro, {"vm_id": "nope"})
    assert not bad.ok and bad.structured["error"]["code"] == "invalid_input"

    def explode(pyro: Pyro, args: Any, ctx: ToolContext) -> BaseModel:
        raise RuntimeError("kaboom")

    broken = ToolSpec(
        name="broken",
        title="Broken",
        description="A tool whose runner has a bug.",
        input_model=NoInput,
        output_model=NoInput,
        hints=ToolHints(True, False, True, False),
        profiles=frozenset(),
        run=explode,
        render=str,
    )
    outcome = broken.call(pyro, {})
    assert not outcome.ok
    assert outcome.structured["error"]["code"] == "pyro_error"
    assert "kaboom" in outcome.text and "Traceback" not in outcome.text


def test_list_environments_needs_no_vm(state_dir: Path) -> None:
    outcome = get_tool("vm_list_environments").call(Pyro(state_dir=state_dir, reap=False), {})
    assert outcome.ok
    names = [e["name"] for e in outcome.structured["environments"]]
    assert "debian:12" in names
    assert "debian:12" in outcome.text


def test_tool_reference_is_up_to_date() -> None:
    assert DOCS.read_text() == reference_markdown(), (
        "docs/tools.md is stale: run `uv run python -m pyro_mcp.contract > docs/tools.md`"
    )


def test_cli_profiles_match_the_contract() -> None:
    import click

    from pyro_mcp.cli import mcp_serve
    from pyro_mcp.contract import DEFAULT_PROFILE

    (option,) = [p for p in mcp_serve.params if p.name == "profile"]
    assert isinstance(option.type, click.Choice)
    assert tuple(option.type.choices) == PROFILES
    assert option.default == DEFAULT_PROFILE


def test_cli_does_not_import_mcp_until_serving() -> None:
    import subprocess
    import sys

    code = (
        "import sys, pyro_mcp.cli; print('mcp' in sys.modules, 'pyro_mcp.contract' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.vm
def test_task_exec_tool_passes_cwd_and_env(vm_environment: str, state_dir: Path) -> None:
    pyro = Pyro(state_dir=state_dir, backend="qemu", reap=False)
    created = get_tool("task_create").call(pyro, {"environment": vm_environment})
    assert created.ok, created.text
    task_id = created.structured["task_id"]
    try:
        ran = get_tool("task_exec").call(
            pyro,
            {"task_id": task_id, "command": 'echo "$PWD $GREETING"', "cwd": "/tmp"}
            | {"env": ["GREETING=hello=world"]},
        )
        assert ran.ok, ran.text
        assert ran.structured["stdout"] == "/tmp hello=world\n"
        default = get_tool("task_exec").call(
            pyro, {"task_id": task_id, "command": "pwd", "cwd": None, "env": None}
        )
        assert default.structured["stdout"] == "/workspace\n"
        bad = get_tool("task_exec").call(
            pyro, {"task_id": task_id, "command": "true", "env": ["NOEQUALS"]}
        )
        assert not bad.ok and bad.structured["error"]["code"] == "invalid_input"
    finally:
        pyro.delete_task(task_id)
