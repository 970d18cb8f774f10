"""A local stand-in for the OpenAI Responses API that plays the model's side.

There is no internet in tests, so the real ``openai`` package is pointed at this
server (``OPENAI_BASE_URL``). Each ``POST /v1/responses`` is answered by the next
function of a script, turn by turn; every request is recorded, and tool
definitions are checked against OpenAI's strict-mode rules the way the real
service would (a violation is an HTTP 400).
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Turn = Callable[[dict[str, Any]], list[dict[str, Any]]]

_ids = itertools.count(1)


def strict_problems(tool: dict[str, Any]) -> list[str]:
    """Where a Responses function tool breaks the strict-mode rules (empty if none)."""
    problems = []
    if tool.get("type") != "function":
        problems.append(f"{tool.get('name')}: type is not 'function'")
    if tool.get("strict") is not True:
        problems.append(f"{tool.get('name')}: strict is not true")
    problems += _schema_problems(tool.get("name", "?"), tool.get("parameters") or {})
    return problems


_UNSUPPORTED = {
    "default",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "title",
}


def _schema_problems(where: str, schema: dict[str, Any]) -> list[str]:
    problems = []
    for key in _UNSUPPORTED & set(schema):
        problems.append(f"{where}: keyword {key!r} is not allowed in strict mode")
    if "anyOf" in schema:
        for i, sub in enumerate(schema["anyOf"]):
            problems += _schema_problems(f"{where}.anyOf[{i}]", sub)
    types = schema.get("type")
    if types == "object" or (isinstance(types, list) and "object" in types):
        if schema.get("additionalProperties") is not False:
            problems.append(f"{where}: additionalProperties must be false")
        props = schema.get("properties", {})
        if sorted(schema.get("required", [])) != sorted(props):
            problems.append(f"{where}: every property must be required")
        for name, sub in props.items():
            problems += _schema_problems(f"{where}.{name}", sub)
    if types == "array" or (isinstance(types, list) and "array" in types):
        problems += _schema_problems(f"{where}[]", schema.get("items", {}))
    return problems


def nullable(schema: dict[str, Any]) -> bool:
    types = schema.get("type")
    if types == "null" or (isinstance(types, list) and "null" in types):
        return True
    return any(nullable(s) for s in schema.get("anyOf", []))


def function_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    n = next(_ids)
    return {
        "type": "function_call",
        "id": f"fc_{n}",
        "call_id": f"call_{n}",
        "name": name,
        "arguments": json.dumps(arguments),
        "status": "completed",
    }


def message(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": f"msg_{next(_ids)}",
        "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


def tool_outputs(request: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """call_id -> parsed output of every function_call_output in the request's input."""
    items = request.get("input")
    if not isinstance(items, list):
        return {}
    return {
        item["call_id"]: json.loads(item["output"])
        for item in items
        if isinstance(item, dict) and item.get("type") == "function_call_output"
    }


class FakeResponsesAPI:
    def __init__(self, turns: list[Turn]) -> None:
        self.turns = list(turns)
        self.requests: list[dict[str, Any]] = []
        self.errors: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                del format, args

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, payload = api.answer(self.path, self.headers.get("Authorization"), body)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self) -> FakeResponsesAPI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(
        self, path: str, auth: str | None, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        self.requests.append(body)
        if path != "/v1/responses" or not auth:
            return 404, {"error": {"message": f"unexpected {path} (auth: {auth})"}}
        problems = [p for tool in body.get("tools", []) for p in strict_problems(tool)]
        if problems:
            self.errors += problems
            return 400, {"error": {"message": "; ".join(problems), "type": "invalid_request_error"}}
        if not self.turns:
            self.errors.append("the client asked for more turns than the script has")
            return 500, {"error": {"message": "script exhausted"}}
        try:
            output = self.turns.pop(0)(body)
        except AssertionError as exc:
            self.errors.append(f"turn {len(self.requests)}: {exc}")
            return 500, {"error": {"message": str(exc)}}
        return 200, {
            "id": f"resp_{next(_ids)}",
            "object": "response",
            "created_at": 0,
            "model": body.get("model", "fake"),
            "status": "completed",
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": "auto",
            "tools": body.get("tools", []),
            "error": None,
            "incomplete_details": None,
            "instructions": None,
            "metadata": {},
            "temperature": 1.0,
            "top_p": 1.0,
            "usage": {
                "input_tokens": 1,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": 1,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": 2,
            },
        }
