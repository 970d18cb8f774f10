"""Every file in examples/ is run here, against real VMs.

MCP client configs: the exact command each holds is launched (``pyro`` is this
venv's console script) and driven by the ``mcp`` SDK's stdio client. The OpenAI
examples run as scripts against a local server that plays the model; the
LangChain and PydanticAI examples get their framework's own fake models.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import anyio
import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, ToolMessage
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from fake_openai import FakeResponsesAPI, function_call, message, tool_outputs
from mcp_helpers import load_configs, mcp_session, server_params, structured, text_of
from pyro_mcp.api import Pyro

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.vm


def _vm_dirs(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "vms").glob("vm-*"))


def _project(root: Path) -> Path:
    project = root / "project"
    project.mkdir(parents=True)
    (project / "README").write_text("seeded from the host\n")
    (project / "check.sh").write_text("echo checks passed: $(cat README)\n")
    return project


def _run_script(
    name: str, *args: str, env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{name} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{Path(name).stem}", EXAMPLES / name)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- MCP client configs -------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "offer_roots"),
    [
        ("mcp_client_config.md", False),
        ("claude_desktop_mcp_config.json", False),
        ("cursor_mcp_config.json", True),
    ],
)
def test_mcp_client_config(
    config: str,
    offer_roots: bool,
    pyro: Pyro,
    vm_environment: str,
    state_dir: Path,
    tmp_path: Path,
) -> None:
    entries = load_configs(EXAMPLES / config)
    assert entries, f"no server entry in {config}"
    project = _project(tmp_path)
    # Without client roots the server allows its working directory; with them, only
    # the roots (so the server starts elsewhere).
    cwd = tmp_path / "elsewhere" if offer_roots else project
    cwd.mkdir(exist_ok=True)
    outside = tmp_path / "outside"
    outside.mkdir()

    async def drive(entry: dict[str, Any]) -> None:
        params = server_params(entry["command"], entry["args"], state_dir, cwd=cwd)
        async with mcp_session(params, roots=[project] if offer_roots else None) as s:
            names = [t.name for t in (await s.list_tools()).tools]
            assert names[0] == "vm_run" and "task_create" in names, names
            ran = await s.call_tool(
                "vm_run", {"environment": vm_environment, "command": "echo config-ok"}
            )
            assert structured(ran)["stdout"] == "config-ok\n", text_of(ran)

            refused = await s.call_tool(
                "task_create", {"environment": vm_environment, "source_path": str(outside)}
            )
            assert refused.is_error and "--allow-path" in text_of(refused)

            created = await s.call_tool(
                "task_create", {"environment": vm_environment, "source_path": str(project)}
            )
            assert not created.is_error, text_of(created)
            task_id = structured(created)["task_id"]
            try:
                first = await s.call_tool(
                    "task_exec", {"task_id": task_id, "command": "sh check.sh > out.txt"}
                )
                assert structured(first)["exit_code"] == 0, text_of(first)
                second = await s.call_tool(
                    "task_exec", {"task_id": task_id, "command": "cat out.txt"}
                )
                assert structured(second)["stdout"] == "checks passed: seeded from the host\n"
                # the agent loop: edit, test again, diff, take the work home
                edit = {"task_id": task_id, "path": "README", "old_text": "seeded"}
                edited = await s.call_tool("task_edit_file", {**edit, "new_text": "edited"})
                assert structured(edited)["replacements"] == 1, text_of(edited)
                third = await s.call_tool(
                    "task_exec", {"task_id": task_id, "command": "sh check.sh"}
                )
                assert structured(third)["stdout"] == "checks passed: edited from the host\n"
                diff = structured(await s.call_tool("task_diff", {"task_id": task_id}))
                assert diff["modified"] == ["README"] and diff["added"] == ["out.txt"]
                export = {"task_id": task_id, "dest": str(project / "result"), "path": "README"}
                exported = await s.call_tool("task_export", export)
                # writable: the client's roots (or --allow-write); never just the cwd
                assert exported.is_error != offer_roots, text_of(exported)
            finally:
                deleted = await s.call_tool("task_delete", {"task_id": task_id})
                assert structured(deleted)["deleted"] is True

    for entry in entries:
        anyio.run(drive, entry)
    assert not (project / "out.txt").exists()  # the host copy is never written
    assert (project / "README").read_text() == "seeded from the host\n"
    if offer_roots:  # ...except where the model exported into a root
        assert (project / "result" / "README").read_text() == "edited from the host\n"
    assert _vm_dirs(state_dir) == []


# -- OpenAI Responses ---------------------------------------------------------------


def test_openai_responses_vm_run_example(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    def ask(request: dict[str, Any]) -> list[dict[str, Any]]:
        assert "vm_run" in [t["name"] for t in request["tools"]]
        return [
            function_call(
                "vm_run",
                {
                    "environment": vm_environment,
                    "command": "uname -r && cat /etc/debian_version",
                    "vcpu_count": None,
                    "mem_mib": None,
                    "timeout_seconds": None,
                    "ttl_seconds": None,
                    "network": None,
                },
            )
        ]

    def answer(request: dict[str, Any]) -> list[dict[str, Any]]:
        (output,) = tool_outputs(request).values()
        assert output["exit_code"] == 0, output
        kernel, version = output["stdout"].split()
        return [message(f"kernel {kernel}, Debian {version}")]

    with FakeResponsesAPI([ask, answer]) as api:
        proc = _run_script(
            "openai_responses_vm_run.py",
            env={
                "OPENAI_BASE_URL": api.base_url,
                "OPENAI_API_KEY": "test",
                "PYRO_STATE_DIR": str(state_dir),
                "PYRO_ENVIRONMENT": vm_environment,
            },
        )
    assert api.errors == []
    assert proc.stdout.startswith("kernel ") and "Debian 12" in proc.stdout
    assert _vm_dirs(state_dir) == []


def test_openai_responses_task_example(
    pyro: Pyro, vm_environment: str, state_dir: Path, tmp_path: Path
) -> None:
    project = _project(tmp_path)
    seen: dict[str, Any] = {}

    def create(request: dict[str, Any]) -> list[dict[str, Any]]:
        assert "task_create" in [t["name"] for t in request["tools"]]
        return [
            function_call(
                "task_create",
                {
                    "environment": vm_environment,
                    "source_path": str(project),
                    "exclude": None,
                    "vcpu_count": None,
                    "mem_mib": None,
                    "ttl_seconds": None,
                    "network": None,
                },
            )
        ]

    def exec_(request: dict[str, Any]) -> list[dict[str, Any]]:
        (task,) = tool_outputs(request).values()
        assert "error" not in task, task
        seen["task_id"] = task["task_id"]
        return [
            function_call(
                "task_exec",
                {"task_id": task["task_id"], "command": "ls", "timeout_seconds": None},
            ),
            function_call(
                "task_exec",
                {"task_id": task["task_id"], "command": "sh check.sh", "timeout_seconds": 60},
            ),
        ]

    def edit(request: dict[str, Any]) -> list[dict[str, Any]]:
        outputs = list(tool_outputs(request).values())[-2:]
        seen["ls"], seen["check"] = (o["stdout"] for o in outputs)
        return [
            function_call(
                "task_edit_file",
                {
                    "task_id": seen["task_id"],
                    "path": "README",
                    "old_text": "seeded from the host",
                    "new_text": "edited in the task",
                    "replace_all": None,
                },
            )
        ]

    def test_again(request: dict[str, Any]) -> list[dict[str, Any]]:
        edited = list(tool_outputs(request).values())[-1]
        assert edited["replacements"] == 1, edited
        return [
            function_call(
                "task_exec",
                {"task_id": seen["task_id"], "command": "sh check.sh", "timeout_seconds": 60},
            )
        ]

    def diff(request: dict[str, Any]) -> list[dict[str, Any]]:
        seen["check2"] = list(tool_outputs(request).values())[-1]["stdout"]
        return [function_call("task_diff", {"task_id": seen["task_id"], "path": None})]

    def delete(request: dict[str, Any]) -> list[dict[str, Any]]:
        seen["patch"] = list(tool_outputs(request).values())[-1]["patch"]
        return [function_call("task_delete", {"task_id": seen["task_id"]})]

    def answer(request: dict[str, Any]) -> list[dict[str, Any]]:
        deleted = list(tool_outputs(request).values())[-1]
        assert deleted == {"task_id": seen["task_id"], "deleted": True}
        return [message(f"The check said: {seen['check2'].strip()}\n{seen['patch']}")]

    with FakeResponsesAPI([create, exec_, edit, test_again, diff, delete, answer]) as api:
        proc = _run_script(
            "openai_responses_task.py",
            str(project),
            env={
                "OPENAI_BASE_URL": api.base_url,
                "OPENAI_API_KEY": "test",
                "PYRO_STATE_DIR": str(state_dir),
                "PYRO_ENVIRONMENT": vm_environment,
            },
        )
    assert api.errors == []
    assert seen["ls"].split() == ["README", "check.sh"]
    assert seen["check"] == "checks passed: seeded from the host\n"
    assert proc.stdout.startswith("The check said: checks passed: edited in the task\n")
    # the model's change, as a patch for the original folder
    assert "-seeded from the host\n+edited in the task" in proc.stdout
    subprocess.run(["git", "apply", "-"], cwd=project, input=seen["patch"], text=True, check=True)
    assert (project / "README").read_text() == "edited in the task\n"
    assert _vm_dirs(state_dir) == []


# -- LangChain and PydanticAI -------------------------------------------------------


class ToolCallingFakeModel(FakeMessagesListChatModel):
    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        del tools, kwargs
        return self


def test_langchain_example(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    example = _load("langchain_vm_run.py")
    model = ToolCallingFakeModel(
        responses=[
            AIMessage(
                content="",
                tool_calls=[
                    {
                        "name": "vm_run",
                        "args": {"environment": vm_environment, "command": "uname -s"},
                        "id": "call_1",
                    }
                ],
            ),
            AIMessage(content="It runs Linux."),
        ]
    )
    messages = example.run(model)
    tool_messages = [m for m in messages if isinstance(m, ToolMessage)]
    assert len(tool_messages) == 1
    assert tool_messages[0].artifact["stdout"] == "Linux\n"
    assert messages[-1].content == "It runs Linux."
    assert _vm_dirs(state_dir) == []


def test_pydantic_ai_example(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    example = _load("pydantic_ai_vm_run.py")
    seen: dict[str, Any] = {}

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        assert "vm_run" in [t.name for t in info.function_tools]
        returns = [
            p
            for m in messages
            if isinstance(m, ModelRequest)
            for p in m.parts
            if isinstance(p, ToolReturnPart)
        ]
        if not returns:
            command = "nproc && grep MemTotal /proc/meminfo"
            return ModelResponse(
                parts=[ToolCallPart("vm_run", {"environment": vm_environment, "command": command})]
            )
        content: Any = returns[0].content
        seen.update(content)
        return ModelResponse(parts=[TextPart(f"CPUs: {content['stdout'].split()[0]}")])

    result = example.build_agent(FunctionModel(model)).run_sync(example.QUESTION)
    assert seen["exit_code"] == 0 and "MemTotal" in seen["stdout"]
    assert result.output == f"CPUs: {seen['stdout'].split()[0]}"
    assert _vm_dirs(state_dir) == []


# -- the SDK ------------------------------------------------------------------------


def test_python_sdk_examples(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    env = {"PYRO_STATE_DIR": str(state_dir), "PYRO_ENVIRONMENT": vm_environment}
    one_shot = _run_script("python_sdk_run_in_vm.py", env=env).stdout.splitlines()
    assert one_shot[0].startswith("12.") and one_shot[1] == "x86_64"
    assert one_shot[2].startswith("exit code 0")
    assert one_shot[3].startswith("exit code 2: ls: cannot access")

    lifecycle = _run_script("python_sdk_vm_lifecycle.py", env=env).stdout
    assert "started vm-" in lifecycle and "running" in lifecycle
    assert lifecycle.rstrip().endswith("exit code 0; VM deleted: True")

    demo = _run_script("python_sdk_task.py", env=env).stdout
    assert "$ ./count.sh  (exit 0)\n1\n" in demo
    assert "$ cat copy.txt  (exit 0)\nhello from the host\n" in demo
    assert "deleted task-" in demo
    assert _vm_dirs(state_dir) == []
    assert Pyro(state_dir=state_dir, reap=False).list_tasks() == []
