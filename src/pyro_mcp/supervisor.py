"""The per-VM supervisor: one small process that owns one VM.

The manager starts it detached (``python -m pyro_mcp.supervisor VM_DIR``). It
starts the VMM, waits for the guest agent's readiness signal (never a fixed
sleep), then serves clients on ``VM_DIR/ctl.sock`` with newline-delimited JSON,
so a VM outlives the ``pyro`` process that created it and can be used from
several processes. It enforces the TTL and, for ephemeral VMs, dies with its
owner; the VMM dies with it (PR_SET_PDEATHSIG), so nothing outlives both.

Control protocol (one request per connection):
  -> {"op": "exec", "argv": [...], "cwd": str, "env": ["K=V", ...],
      "timeout_ms": int, "stdout_cap": int, "stderr_cap": int}
  <- {"event": "heartbeat", "elapsed_ms": int}   (every second while running)
  <- {"event": "result", "ok": true, "exit_code": ..., "stdout_b64": ..., ...}
  -> {"op": "ping"} / {"op": "shutdown"}
  <- {"event": "result", "ok": true}
Closing the connection while an exec runs kills that command.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import secrets
import select
import shutil
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pyro_mcp.errors import GuestProtocolError, InvalidInputError, PyroError
from pyro_mcp.guest import protocol as p
from pyro_mcp.guest.channel import AgentChannel, ChannelClosed
from pyro_mcp.state import ProcessId, write_json_atomic
from pyro_mcp.vmm.base import LaunchSpec, SnapshotRef, VMPaths

HOST_GRACE_S = 10.0  # extra time the host gives the agent beyond a command's timeout
MAX_REQUEST_BYTES = 1 << 20


def _send(conn: socket.socket, obj: dict[str, Any]) -> bool:
    try:
        conn.sendall(json.dumps(obj).encode() + b"\n")
        return True
    except OSError:
        return False


def _client_gone(conn: socket.socket) -> bool:
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        if not readable:
            return False
        return conn.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class Supervisor:
    def __init__(self, vm_dir: Path) -> None:
        self.vm_dir = vm_dir
        self.paths = VMPaths(vm_dir)
        self.launch = json.loads((vm_dir / "launch.json").read_text())
        self.ctl_path = vm_dir / "ctl.sock"
        self.stop_event = threading.Event()
        self.stop_reason = "stopped"
        self._wake_r, self._wake_w = os.pipe()
        self.channel: AgentChannel | None = None

    # -- boot ---------------------------------------------------------------
    def boot(self) -> dict[str, Any]:
        from pyro_mcp.vmm import get_backend

        launch = self.launch
        spec = LaunchSpec.from_launch(launch)
        restore = None
        if launch.get("restore"):
            restore = SnapshotRef(Path(launch["restore"]["directory"]), launch["restore"]["key"])
        backend = get_backend(launch["backend"])
        started = time.monotonic()
        boot_timeout = float(launch.get("boot_timeout", 60.0))
        self.handle = backend.start(spec, self.paths, restore=restore, timeout=boot_timeout)
        try:
            self.channel = AgentChannel(self.handle)
            remaining = boot_timeout - (time.monotonic() - started)
            if restore is None:
                self.channel.wait_hello(timeout=max(1.0, remaining))
            mounts = tuple(p.Mount(**m) for m in launch.get("mounts", []))
            reply = self.channel.call(
                p.Init(time.time_ns(), secrets.token_bytes(256), mounts),
                timeout=max(1.0, boot_timeout - (time.monotonic() - started)),
            )
            if isinstance(reply, p.Error):
                raise GuestProtocolError(f"guest initialisation failed: {reply.message}")
        except PyroError as exc:
            exc.details.setdefault("console_tail", self.handle.console_tail())
            self.handle.kill()
            raise
        except BaseException:
            self.handle.kill()
            raise
        vmm = ProcessId.of(self.handle.pid)
        return {
            "vmm": vmm.to_dict() if vmm else None,
            "boot": "restored" if restore else "cold",
            "boot_ms": int((time.monotonic() - started) * 1000),
        }

    def request_stop(self, reason: str) -> None:
        self.stop_reason = reason
        self.stop_event.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    # -- serving ------------------------------------------------------------
    def listen(self) -> socket.socket:
        """Bind and listen before readiness is announced, so no client is refused."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            self.ctl_path.unlink()
        listener.bind(str(self.ctl_path))
        listener.listen(128)
        listener.setblocking(False)
        return listener

    def serve(self, listener: socket.socket) -> None:
        expires_at = float(self.launch.get("expires_at") or 0)
        owner = ProcessId.from_dict(self.launch.get("owner"))
        try:
            while not self.stop_event.is_set():
                readable, _, _ = select.select([listener.fileno(), self._wake_r], [], [], 0.2)
                if listener.fileno() in readable:
                    with contextlib.suppress(BlockingIOError, InterruptedError):
                        conn, _ = listener.accept()
                        conn.setblocking(True)
                        threading.Thread(target=self._client, args=(conn,), daemon=True).start()
                if self.stop_event.is_set():
                    break
                if self.handle.poll() is not None:
                    self.stop_reason = "vmm_exited"
                    break
                if self.channel is not None and self.channel.closed_reason is not None:
                    self.stop_reason = "agent_channel_closed"
                    break
                if expires_at and time.time() >= expires_at:
                    self.stop_reason = "ttl_expired"
                    break
                if owner is not None and not owner.alive():
                    self.stop_reason = "owner_exited"
                    break
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                self.ctl_path.unlink()

    def _client(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                buf = b""
                while b"\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                    if len(buf) > MAX_REQUEST_BYTES:
                        raise InvalidInputError("control request too large")
                conn.settimeout(None)
                request = json.loads(buf.partition(b"\n")[0])
                op = request.get("op")
                if op == "ping":
                    _send(conn, {"event": "result", "ok": True})
                elif op == "shutdown":
                    # Kill the VMM before answering: once the caller hears back,
                    # the guest is gone; this process exits right after.
                    self.handle.kill()
                    _send(conn, {"event": "result", "ok": True})
                    self.request_stop(str(request.get("reason") or "stopped"))
                elif op == "exec":
                    self._exec(conn, request)
                else:
                    raise InvalidInputError(f"unknown control operation {op!r}")
            except PyroError as exc:
                _send(conn, {"event": "result", "ok": False, "error": exc.to_dict()})
            except (ValueError, KeyError, TypeError) as exc:
                error = {"code": "invalid_input", "message": f"bad control request: {exc}"}
                _send(conn, {"event": "result", "ok": False, "error": error})
            except OSError:
                pass

    def _exec(self, conn: socket.socket, request: dict[str, Any]) -> None:
        assert self.channel is not None
        message = p.Exec(
            argv=tuple(request["argv"]),
            cwd=str(request["cwd"]),
            env=tuple(request["env"]),
            timeout_ms=int(request["timeout_ms"]),
            stdout_cap=int(request["stdout_cap"]),
            stderr_cap=int(request["stderr_cap"]),
        )
        request_id, q = self.channel.open()
        # The caps are enforced here too: a compromised agent must not grow this process.
        streams = {p.STDOUT: bytearray(), p.STDERR: bytearray()}
        caps = {p.STDOUT: message.stdout_cap, p.STDERR: message.stderr_cap}
        cut = {p.STDOUT: False, p.STDERR: False}
        stdout, stderr = streams[p.STDOUT], streams[p.STDERR]
        started = time.monotonic()
        host_deadline = (
            started + message.timeout_ms / 1000 + HOST_GRACE_S if message.timeout_ms else None
        )
        last_beat = last_check = started
        cancelled = False
        try:
            self.channel.send(request_id, message)
            while True:
                try:
                    item = q.get(timeout=0.1)
                except queue.Empty:
                    item = None
                now = time.monotonic()
                # Checked also while frames keep coming, so a flood cannot outlast them.
                if item is None or now - last_check >= 0.1:
                    last_check = now
                    if not cancelled and _client_gone(conn):
                        cancelled = True
                        self.channel.send(request_id, p.Signal(signal.SIGKILL))
                        host_deadline = now + HOST_GRACE_S
                    if host_deadline is not None and now > host_deadline:
                        raise GuestProtocolError(
                            "the guest agent did not finish the command after its timeout",
                            hint="the VM may be overloaded or broken; delete it",
                        )
                    if now - last_beat >= 1.0 and not cancelled:
                        last_beat = now
                        elapsed = int((now - started) * 1000)
                        _send(conn, {"event": "heartbeat", "elapsed_ms": elapsed})
                if item is None:
                    continue
                if isinstance(item, p.Output):
                    buf = streams[item.stream]
                    room = max(0, caps[item.stream] - len(buf))
                    if len(item.data) > room:
                        cut[item.stream] = True
                    buf.extend(item.data[:room])
                elif isinstance(item, p.Exit):
                    _send(
                        conn,
                        {
                            "event": "result",
                            "ok": True,
                            "exit_code": item.exit_code,
                            "signal": item.signal,
                            "timed_out": item.timed_out,
                            "stdout_truncated": item.stdout_truncated or cut[p.STDOUT],
                            "stderr_truncated": item.stderr_truncated or cut[p.STDERR],
                            "duration_ms": item.duration_ms,
                            "stdout_b64": base64.b64encode(stdout).decode(),
                            "stderr_b64": base64.b64encode(stderr).decode(),
                        },
                    )
                    return
                elif isinstance(item, p.Error):
                    raise InvalidInputError(item.message)
                elif isinstance(item, ChannelClosed):
                    # A backend that knows why its VMM ended (gVisor: a memory-limit kill)
                    # says so instead of the bare "channel closed".
                    explain = getattr(self.handle, "exit_reason", None)
                    why = explain() if callable(explain) else None
                    if why:
                        raise GuestProtocolError(why[0], hint=why[1])
                    raise GuestProtocolError(item.reason)
        finally:
            self.channel.close_request(request_id)

    # -- teardown -----------------------------------------------------------
    def shutdown(self) -> None:
        handle = getattr(self, "handle", None)
        if handle is not None:
            handle.kill()
        if self.stop_reason == "deleted":
            return  # the manager removes the folder; write nothing into it
        ephemeral_reasons = {"ttl_expired", "owner_exited"}
        if self.stop_reason in ephemeral_reasons:
            # Nobody may be around to clean up: reap our own folder and the manager's
            # lock file beside it (``.<vm_id>.lock``).
            shutil.rmtree(self.vm_dir, ignore_errors=True)
            with contextlib.suppress(OSError):
                (self.vm_dir.parent / f".{self.vm_dir.name}.lock").unlink(missing_ok=True)
            return
        with contextlib.suppress(OSError):
            write_json_atomic(
                self.vm_dir / "exit.json",
                {"reason": self.stop_reason, "at": time.time()},
            )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    vm_dir = Path(args[0])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the creator's terminal is not ours
    sup = Supervisor(vm_dir)
    signal.signal(signal.SIGTERM, lambda *_: sup.request_stop("terminated"))
    ready_out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    try:
        info = sup.boot()
    except PyroError as exc:
        ready_out.write(json.dumps({"ok": False, "error": exc.to_dict()}) + "\n")
        ready_out.close()
        return 1
    except Exception as exc:
        error = {"code": "boot_failed", "message": f"VM start failed: {exc!r}"}
        ready_out.write(json.dumps({"ok": False, "error": error}) + "\n")
        ready_out.close()
        sup.shutdown()
        return 1
    try:
        serve_thread = threading.Thread(target=sup.serve, args=(sup.listen(),), daemon=True)
        serve_thread.start()
        info["supervisor"] = {"pid": os.getpid()}
        try:
            ready_out.write(json.dumps({"ok": True, **info}) + "\n")
            ready_out.close()
        except OSError:
            # The creator died before learning the VM is ready; an ephemeral VM is
            # reaped now rather than at the next pyro invocation.
            sup.request_stop("owner_exited" if sup.launch.get("owner") else "creator_exited")
        while serve_thread.is_alive():
            serve_thread.join(0.5)
    finally:
        sup.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
