"""The framework adapters, driven by each framework's real package.

OpenAI: the real ``openai`` client against a local server playing the model.
LangChain and PydanticAI: their own fake/function models, so the framework
itself calls the tool.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from openai import OpenAI
from pydantic import Field
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from fake_openai import (
    FakeResponsesAPI,
    function_call,
    message,
    nullable,
    strict_problems,
    tool_outputs,
)
from pyro_mcp.api import Pyro
from pyro_mcp.contract import PROFILES, get_tool, tools_for
from pyro_mcp.integrations.langchain import langchain_tools
from pyro_mcp.integrations.openai_responses import ToolBox, tool_definitions
from pyro_mcp.integrations.pydantic_ai import pydantic_ai_tools


def _vm_dirs(state_dir: Path) -> list[Path]:
    return sorted((state_dir / "vms").glob("vm-*"))


# -- OpenAI Responses ---------------------------------------------------------------


@pytest.mark.parametrize("profile", PROFILES)
def test_openai_tool_definitions_satisfy_strict_mode(profile: Any) -> None:
    tools = tool_definitions(profile)
    assert [t["name"] for t in tools] == [t.name for t in tools_for(profile)]
    for tool in tools:
        assert strict_problems(tool) == [], tool["name"]
        spec = get_tool(tool["name"])
        optional = set(spec.input_schema()["properties"]) - set(
            spec.input_schema().get("required", [])
        )
        for name, prop in tool["parameters"]["properties"].items():
            assert nullable(prop) == (name in optional), (tool["name"], name)
        if "command" in tool["parameters"]["properties"]:
            assert {"cwd", "env"} <= optional, tool["name"]
        assert tool["description"] == spec.description


def test_openai_toolbox_answers_bad_calls_with_errors(state_dir: Path) -> None:
    box = ToolBox(Pyro(state_dir=state_dir, reap=False))
    for call in (
        {"type": "function_call", "call_id": "c1", "name": "vm_run", "arguments": "{not json"},
        {"type": "function_call", "call_id": "c2", "name": "vm_run", "arguments": "[1]"},
        {"type": "function_call", "call_id": "c3", "name": "vm_create", "arguments": "{}"},
        {"type": "function_call", "call_id": "c4", "name": "vm_run", "arguments": "{}"},
    ):
        out = box.run(call)
        assert out["type"] == "function_call_output" and out["call_id"] == call["call_id"]
        error = json.loads(out["output"])["error"]
        assert error["code"] in ("invalid_input", "not_found") and error["hint"], error


@pytest.mark.vm
def test_openai_client_loop_runs_vm_run(pyro: Pyro, vm_environment: str, state_dir: Path) -> None:
    args = {
        "environment": vm_environment,
        "command": 'echo "from-the-$WHERE in $PWD"',
        "vcpu_count": None,
        "mem_mib": None,
        "timeout_seconds": None,
        "ttl_seconds": None,
        "network": None,
        "cwd": "/tmp",
        "env": ["WHERE=vm"],
    }

    def ask(request: dict[str, Any]) -> list[dict[str, Any]]:
        assert request["input"][0]["role"] == "user"
        return [function_call("vm_run", args)]

    def answer(request: dict[str, Any]) -> list[dict[str, Any]]:
        (output,) = tool_outputs(request).values()
        assert output["exit_code"] == 0, output
        return [message(f"The VM said: {output['stdout'].strip()}")]

    box = ToolBox(pyro)
    with FakeResponsesAPI([ask, answer]) as api:
        client = OpenAI(base_url=api.base_url, api_key="test")
        conversation: list[Any] = [{"role": "user", "content": "say hi from a VM"}]
        response = client.responses.create(model="m", input=conversation, tools=box.tools)
        calls = box.function_calls(response)
        assert [c.name for c in calls] == ["vm_run"]
        conversation += response.output
        conversation += [box.run(c) for c in calls]
        final = client.responses.create(model="m", input=conversation, tools=box.tools)
        assert api.errors == []
    assert final.output_text == "The VM said: from-the-vm in /tmp"
    assert _vm_dirs(state_dir) == []


# -- LangChain ----------------------------------------------------------------------


class ToolCallingFakeModel(FakeMessagesListChatModel):
    """LangChain's own fake chat model, able to bind tools (it records them)."""

    bound: list[dict[str, Any]] = Field(default_factory=list)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> Any:
        del kwargs
        self.bound = [convert_to_openai_tool(t) for t in tools]
        return self


@pytest.mark.vm
def test_langchain_tools_are_called_by_the_framework(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    tools = langchain_tools(pyro)
    assert [t.name for t in tools] == ["vm_run", "vm_list_environments"]
    spec_props = get_tool("vm_run").input_schema()["properties"]
    model = ToolCallingFakeModel(
        responses=[
            AIMessage(
                content="",
                tool_calls=[
                    {
                        "name": "vm_run",
                        "args": {"environment": vm_environment, "command": "echo lc"},
                        "id": "c1",
                    },
                    {
                        "name": "vm_run",
                        "args": {"environment": "nosuch:1", "command": "true"},
                        "id": "c2",
                    },
                ],
            ),
            AIMessage(content="done"),
        ]
    )
    llm = model.bind_tools(tools)
    schema = next(b for b in model.bound if b["function"]["name"] == "vm_run")
    assert set(schema["function"]["parameters"]["properties"]) == set(spec_props)

    reply = llm.invoke([HumanMessage("run echo lc")])
    by_name = {t.name: t for t in tools}
    results = [by_name[c["name"]].invoke(c) for c in reply.tool_calls]
    ok, failed = results
    assert isinstance(ok, ToolMessage) and isinstance(failed, ToolMessage)
    assert ok.status == "success" and ok.artifact["stdout"] == "lc\n"
    assert "exit code 0" in str(ok.content)
    assert failed.status == "error" and "unknown environment" in str(failed.content)
    assert _vm_dirs(state_dir) == []


# -- PydanticAI ---------------------------------------------------------------------


@pytest.mark.vm
def test_pydantic_ai_tools_are_called_by_the_agent(
    pyro: Pyro, vm_environment: str, state_dir: Path
) -> None:
    returns: list[ToolReturnPart] = []
    offered: list[str] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        offered[:] = [t.name for t in info.function_tools]
        parts = [
            p
            for m in messages
            if isinstance(m, ModelRequest)
            for p in m.parts
            if isinstance(p, ToolReturnPart)
        ]
        if not parts:
            return ModelResponse(
                parts=[
                    ToolCallPart("vm_run", {"environment": vm_environment, "command": "echo pai"}),
                    ToolCallPart("vm_run", {"environment": "nosuch:1", "command": "true"}),
                ]
            )
        returns[:] = parts
        return ModelResponse(parts=[TextPart("done")])

    agent = Agent(FunctionModel(model), tools=pydantic_ai_tools(pyro))
    assert agent.run_sync("run echo pai").output == "done"
    assert offered == ["vm_run", "vm_list_environments"]
    by_outcome: dict[str, Any] = {p.outcome: p.content for p in returns}
    assert by_outcome["success"]["stdout"] == "pai\n"
    assert "unknown environment" in str(by_outcome["failed"])
    assert _vm_dirs(state_dir) == []
