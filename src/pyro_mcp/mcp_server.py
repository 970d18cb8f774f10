"""``pyro mcp serve``: the tool contract over the Model Context Protocol.

Built on the official ``mcp`` SDK's low-level server, with every tool taken
from :mod:`pyro_mcp.contract`. How a call runs:

* The blocking VM work runs in a worker thread (never on the event loop), so
  two calls' VMs boot in parallel.
* While it runs, progress notifications go to the client when it sent a
  progress token: one per progress event (rate-limited) and a keep-alive at
  least every :data:`KEEPALIVE_S` seconds, so clients with a 60 s request
  timeout keep waiting through an environment build or a long command. A
  running command's messages end with the tail of its output (its last few
  lines, clipped: "command running (12 s); last output: ...").
* A cancelled request (or a client that went away) sets the call's cancel
  flag; the worker's next progress callback (every second during an exec)
  raises, which closes the control connection to the VM's supervisor (that
  kills the guest command) and lets ``vm_run`` delete its VM. The handler
  waits for that cleanup before it returns.
* Results carry ``structuredContent`` plus a short text; a tool that could not
  do its job answers ``isError`` with the PyroError shape. No traceback reaches
  the client.

``source_path`` arguments are confined to allowed roots: the client's MCP roots
when it offers them, else the ``--allow-path`` folders, else the working
directory (see :func:`pyro_mcp.contract.resolve_source_path`).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import secrets
import signal
import sys
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlparse

import anyio
import anyio.from_thread
import anyio.lowlevel
import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel import Server

from pyro_mcp._version import __version__
from pyro_mcp.contract import (
    DEFAULT_PROFILE,
    Profile,
    ToolCancelled,
    ToolContext,
    ToolOutcome,
    ToolSpec,
    tools_for,
)
from pyro_mcp.errors import InvalidInputError, NotFoundError, PyroError
from pyro_mcp.progress import ProgressEvent, ProgressFn

if TYPE_CHECKING:
    from pyro_mcp.api import Pyro

log = logging.getLogger("pyro_mcp.mcp_server")

TAIL_BYTES = 2048  # of a running command's output kept for its progress message
TAIL_LINES = 3
TAIL_LINE_CHARS = 120
KEEPALIVE_S = 5.0  # longest gap between two progress notifications of a running call
MIN_PROGRESS_GAP_S = 0.5  # at most two notifications a second
CANCEL_CLEANUP_S = 60.0  # how long a cancelled call waits for its VM to be cleaned up
ROOTS_TIMEOUT_S = 10.0


def instructions(tool_names: Sequence[str]) -> str:
    """The server's instructions to the model, mentioning only tools it has."""
    text = (
        "pyro-mcp runs shell commands in disposable local Linux microVMs. Use vm_run for "
        "almost everything: one command, one fresh VM, deleted afterwards."
    )
    if "task_create" in tool_names:
        text += (
            " Use task_create + task_exec only when several commands must share files "
            "(e.g. seed a project folder with source_path, then build and test it), and "
            "task_delete when done."
        )
    if "task_edit_file" in tool_names:
        text += (
            " In a task, read and change files with task_read_file, task_edit_file and "
            "task_write_file rather than through shell commands, and show your work with "
            "task_diff (a patch for the original folder)."
        )
    return text + " Guests have no network."


@dataclass
class ServerConfig:
    profile: Profile = DEFAULT_PROFILE
    allow_paths: Sequence[Path] = ()
    allow_write: Sequence[Path] = ()
    backend: str | None = None
    state_dir: Path | None = None
    reap_on_start: bool = True


class _ThreadProgress:
    """The server's one ProgressFn: routes each event to the call whose worker
    thread produced it (every call runs its VM work in one worker thread)."""

    def __init__(self) -> None:
        self._local = threading.local()

    def __call__(self, event: ProgressEvent) -> None:
        fn: ProgressFn | None = getattr(self._local, "fn", None)
        if fn is not None:
            fn(event)

    @contextlib.contextmanager
    def bound(self, fn: ProgressFn) -> Iterator[None]:
        self._local.fn = fn
        try:
            yield
        finally:
            self._local.fn = None


class _OutputTail:
    """The last bytes of a running command's output (both streams), for the progress
    message: its last :data:`TAIL_LINES` lines, each clipped to :data:`TAIL_LINE_CHARS`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._buf = bytearray()

    def add(self, data: bytes) -> None:
        with self._lock:
            self._buf += data
            del self._buf[:-TAIL_BYTES]

    def text(self) -> str:
        with self._lock:
            raw = bytes(self._buf)
        lines = [line for line in raw.decode("utf-8", "replace").splitlines() if line.strip()]
        clipped = [
            line if len(line) <= TAIL_LINE_CHARS else line[: TAIL_LINE_CHARS - 1] + "\u2026"
            for line in lines[-TAIL_LINES:]
        ]
        return " | ".join(clipped)


class _ProgressState:
    """Latest progress message, written by the worker thread, read by the loop; a
    running command's message ends with the tail of its output."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.seq = 0
        self.message = "working"
        self.tail = _OutputTail()

    def update(self, event: ProgressEvent) -> None:
        message = event.message
        if event.stage == "exec" and (tail := self.tail.text()):
            message = f"{message}; last output: {tail}"
        with self._lock:
            self.seq += 1
            self.message = message

    def read(self) -> tuple[int, str]:
        with self._lock:
            return self.seq, self.message


class PyroMCPServer:
    """The tools of one profile, served by an ``mcp`` low-level :class:`Server`."""

    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self._progress = _ThreadProgress()
        self._pyro: Pyro | None = None
        self._pyro_lock = threading.Lock()
        self.tools: dict[str, ToolSpec] = {t.name: t for t in tools_for(self.config.profile)}
        self.server: Server[Any] = Server(
            "pyro-mcp",
            version=__version__,
            title="pyro-mcp: disposable microVMs",
            instructions=instructions(list(self.tools)),
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        self._tool_list = self.mcp_tools()

    @property
    def pyro(self) -> Pyro:
        """The SDK object every call uses, made on first use (server start).

        Making it reaps what dead servers left (``vm_run`` VMs are bound to their
        server's pid) when ``reap_on_start`` is set.
        """
        with self._pyro_lock:
            if self._pyro is None:
                from pyro_mcp.api import Pyro

                self._pyro = Pyro(
                    backend=self.config.backend,
                    state_dir=self.config.state_dir,
                    progress=self._progress,
                    reap=self.config.reap_on_start,
                )
            return self._pyro

    # -- MCP handlers -------------------------------------------------------
    def mcp_tools(self) -> list[types.Tool]:
        return [
            types.Tool(
                name=t.name,
                title=t.title,
                description=t.description,
                input_schema=t.input_schema(),
                output_schema=t.output_schema(),
                annotations=types.ToolAnnotations(
                    title=t.title,
                    read_only_hint=t.hints.read_only,
                    destructive_hint=t.hints.destructive,
                    idempotent_hint=t.hints.idempotent,
                    open_world_hint=t.hints.open_world,
                ),
            )
            for t in self.tools.values()
        ]

    async def _list_tools(
        self, ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        del ctx, params
        return types.ListToolsResult(tools=self._tool_list)

    async def _call_tool(
        self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        spec = self.tools.get(params.name)
        if spec is None:
            names = ", ".join(self.tools)
            outcome = ToolOutcome.from_error(
                NotFoundError(
                    f"unknown tool {params.name!r} (profile {self.config.profile})",
                    hint=f"tools available: {names}; restart with `--profile full` for all",
                    details={"name": params.name, "available": list(self.tools)},
                )
            )
        else:
            try:
                roots = await self._source_roots(ctx) if _takes_source_path(spec) else None
                writable = await self._write_roots(ctx) if _writes_host(spec) else ()
                outcome = await self.run_tool(
                    spec, params.arguments, roots, ctx.session.report_progress, writable
                )
            except PyroError as exc:
                outcome = ToolOutcome.from_error(exc)
            except Exception as exc:  # never a traceback or a protocol error for a tool bug
                log.exception("tools/call %s failed", params.name)
                outcome = ToolOutcome.from_error(
                    PyroError(
                        f"{params.name} failed unexpectedly: {type(exc).__name__}: {exc}",
                        hint="this is a pyro-mcp bug; the server log has the details",
                    )
                )
        return _to_mcp(outcome)

    async def _source_roots(self, ctx: ServerRequestContext[Any]) -> list[Path]:
        """Client roots when offered, else --allow-path, else the working directory."""
        found = await self._client_roots(ctx)
        if found:
            return found
        if self.config.allow_paths:
            return list(self.config.allow_paths)
        return [Path.cwd()]

    async def _write_roots(self, ctx: ServerRequestContext[Any]) -> list[Path]:
        """Where ``task_export`` may write: the client's roots and --allow-write, never
        the working directory unless it is one of them."""
        return [*(await self._client_roots(ctx)), *self.config.allow_write]

    async def _client_roots(self, ctx: ServerRequestContext[Any]) -> list[Path]:
        caps = ctx.session.client_capabilities
        if caps is not None and caps.roots is not None and ctx.session.can_send_request:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    with anyio.fail_after(ROOTS_TIMEOUT_S):
                        result = await ctx.session.list_roots()
            except Exception as exc:
                raise InvalidInputError(
                    f"could not read the client's MCP roots ({type(exc).__name__}: {exc})",
                    hint="retry; or start the server with `--allow-path DIR`",
                ) from None
            roots = [_root_path(str(r.uri)) for r in result.roots]
            return [r for r in roots if r is not None]
        return []

    # -- running a tool off the event loop ----------------------------------
    async def run_tool(
        self,
        spec: ToolSpec,
        arguments: dict[str, Any] | None,
        roots: list[Path] | None,
        report: Callable[[float, float | None, str | None], Awaitable[None]],
        write_roots: Sequence[Path] = (),
    ) -> ToolOutcome:
        state = _ProgressState()
        tool_ctx = ToolContext(
            source_roots=roots, write_roots=write_roots, on_output=state.tail.add
        )
        done = threading.Event()

        def progress(event: ProgressEvent) -> None:
            tool_ctx.check_cancelled()
            state.update(event)

        def work() -> ToolOutcome:
            try:
                with self._progress.bound(progress):
                    return spec.call(self.pyro, arguments, tool_ctx)
            except ToolCancelled:
                return ToolOutcome.from_error(PyroError("the request was cancelled"))
            finally:
                done.set()

        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_send_progress, state, report, started, spec.name)
            try:
                outcome = await anyio.to_thread.run_sync(work, abandon_on_cancel=True)
            except anyio.get_cancelled_exc_class():
                tool_ctx.cancelled.set()
                with anyio.CancelScope(shield=True), anyio.move_on_after(CANCEL_CLEANUP_S):
                    while not done.is_set():
                        await anyio.sleep(0.05)
                raise
            finally:
                tg.cancel_scope.cancel()
        return outcome

    # -- transports -----------------------------------------------------------
    async def serve_stdio(self) -> None:
        """Serve one client on stdin/stdout until it disconnects or SIGTERM/SIGINT.

        Either way in-flight calls are cancelled, which stops their guest commands
        and deletes their ``vm_run`` VMs before the process exits.
        """
        from mcp.server.stdio import stdio_server

        stdin = _StdinLines()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_cancel_on_signal, tg.cancel_scope)
            async with stdio_server(stdin=stdin) as (read_stream, write_stream):  # type: ignore[arg-type]
                await self.server.run(
                    read_stream, write_stream, self.server.create_initialization_options()
                )
            tg.cancel_scope.cancel()

    def http_app(self, *, host: str, port: int, token: str) -> Any:
        """The streamable-HTTP ASGI app: bearer token, Host and Origin checks."""
        from mcp.server.transport_security import TransportSecuritySettings

        names = {host, "127.0.0.1", "localhost", "[::1]"} if _is_loopback(host) else {host}
        names = {f"[{n}]" if ":" in n and not n.startswith("[") else n for n in names}
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[f"{n}:{port}" for n in names],
            allowed_origins=[
                f"{scheme}://{n}:{port}" for n in names for scheme in ("http", "https")
            ],
        )
        app = self.server.streamable_http_app(host=host, transport_security=security)
        return BearerAuth(app, token)

    async def serve_http(self, *, host: str, port: int, token: str) -> None:
        import uvicorn

        config = uvicorn.Config(
            self.http_app(host=host, port=port, token=token),
            host=host,
            port=port,
            log_level="warning",
            lifespan="on",
        )
        await uvicorn.Server(config).serve()


class _StdinLines:
    """The client's lines on stdin, read by a daemon thread.

    The SDK reads stdin in an anyio worker thread that a cancellation cannot
    interrupt, so a SIGTERM would leave the server blocked in ``readline``; a
    daemon thread does not keep the process alive. fd 0 is pointed at the null
    device meanwhile (as the SDK does), so no child process reads the wire.
    """

    def __init__(self) -> None:
        private = os.dup(0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        self._file = os.fdopen(private, "r", encoding="utf-8", errors="replace")
        self._send, self._receive = anyio.create_memory_object_stream[str](16)
        self._token = anyio.lowlevel.current_token()
        threading.Thread(target=self._pump, name="pyro-mcp stdin", daemon=True).start()

    def _pump(self) -> None:
        try:
            for line in self._file:
                anyio.from_thread.run(self._send.send, line, token=self._token)
        except Exception:  # the loop is gone or the stream closed: stop reading
            return
        with contextlib.suppress(Exception):
            anyio.from_thread.run_sync(self._send.close, token=self._token)

    def __aiter__(self) -> _StdinLines:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._receive.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None


class BearerAuth:
    """ASGI wrapper: every HTTP request needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self._expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self._expected):
                body = b'{"error": "missing or wrong bearer token"}'
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [
                            (b"content-type", b"application/json"),
                            (b"www-authenticate", b"Bearer"),
                            (b"content-length", str(len(body)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def _cancel_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.warning("%s received: cancelling running calls", signal.Signals(signum).name)
            scope.cancel()
            return


async def _send_progress(
    state: _ProgressState,
    report: Callable[[float, float | None, str | None], Awaitable[None]],
    started: float,
    tool: str,
) -> None:
    """Notify on new events (rate-limited) and at least every KEEPALIVE_S seconds."""
    sent_seq = 0
    last_sent = started
    while True:
        await anyio.sleep(0.1)
        now = time.monotonic()
        seq, message = state.read()
        fresh = seq != sent_seq and now - last_sent >= MIN_PROGRESS_GAP_S
        if fresh or now - last_sent >= KEEPALIVE_S:
            elapsed = now - started
            text = message if fresh else f"{tool}: {message} ({elapsed:.0f} s)"
            with contextlib.suppress(Exception):
                await report(round(elapsed, 1), None, text)
            sent_seq, last_sent = seq, now


def _to_mcp(outcome: ToolOutcome) -> types.CallToolResult:
    return types.CallToolResult(
        content=[types.TextContent(text=outcome.text)],
        structured_content=outcome.structured,
        is_error=not outcome.ok,
    )


def _takes_source_path(spec: ToolSpec) -> bool:
    return "source_path" in spec.input_model.model_fields


def _writes_host(spec: ToolSpec) -> bool:
    return "dest" in spec.input_model.model_fields


def _root_path(uri: str) -> Path | None:
    parsed = urlparse(uri)
    if parsed.scheme != "file" or parsed.netloc not in ("", "localhost"):
        return None
    return Path(unquote(parsed.path))


def _is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1", "[::1]") or host.startswith("127.")


def serve(
    config: ServerConfig,
    *,
    transport: str = "stdio",
    host: str = "127.0.0.1",
    port: int = 8765,
    token: str | None = None,
) -> None:
    """Run the server until the client disconnects (stdio) or it is interrupted."""
    logging.basicConfig(
        level=os.environ.get("PYRO_LOG_LEVEL", "WARNING").upper(),
        stream=sys.stderr,
        format="pyro-mcp: %(levelname)s %(name)s: %(message)s",
    )
    server = PyroMCPServer(config)
    server.pyro  # noqa: B018 - make it now: reaps leftovers of dead servers before serving
    if transport == "stdio":
        anyio.run(server.serve_stdio)
        return
    if transport != "streamable-http":
        raise InvalidInputError(
            f"unknown transport {transport!r}", hint="use stdio or streamable-http"
        )
    if not token:
        token = secrets.token_urlsafe(24)
        print(
            f"pyro-mcp: no --token given; this run's token is {token}\n"
            f"pyro-mcp: clients send 'Authorization: Bearer {token}'",
            file=sys.stderr,
            flush=True,
        )
    print(f"pyro-mcp: serving on http://{host}:{port}/mcp", file=sys.stderr, flush=True)
    anyio.run(lambda: server.serve_http(host=host, port=port, token=token))
