"""The manager's end of a VM's supervisor: start it, talk to it, stop it.

One supervisor process per VM (:mod:`pyro_mcp.supervisor`) owns the VMM. The
messages both ends exchange are :mod:`pyro_mcp.control`'s; this module is the
only place the manager opens ``ctl.sock`` or starts the process.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pyro_mcp import control
from pyro_mcp.commands import source_error
from pyro_mcp.errors import BootError, InvalidInputError, PyroError, VMStateError, hints
from pyro_mcp.procs import kill_process_group, tail_text
from pyro_mcp.progress import ProgressEvent, ProgressFn
from pyro_mcp.state import ProcessId

if TYPE_CHECKING:
    from pyro_mcp.guest.channel import AgentChannel

READY_SLACK_S = 15.0  # on top of the boot timeout: the supervisor's own start-up


def spawn(vm_dir: Path, launch: control.Launch, progress: ProgressFn) -> control.Ready:
    """Write ``launch.json``, start the supervisor detached, and wait for its start-up
    line. A failed start raises the supervisor's error (class and code kept)."""
    vm_id = vm_dir.name
    launch.write(vm_dir / "launch.json")
    log = (vm_dir / "supervisor.log").open("ab")
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "pyro_mcp.supervisor", str(vm_dir)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    finally:
        log.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + launch.boot_timeout + READY_SLACK_S
    line = b""
    try:
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise BootError(f"VM {vm_id} did not become ready in time")
            readable, _, _ = select.select([proc.stdout], [], [], min(remaining, 5.0))
            if not readable:
                progress(ProgressEvent("boot", "waiting for the guest agent"))
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            line += chunk
    except BaseException:
        kill_process_group(proc.pid)
        raise
    finally:
        proc.stdout.close()
    if not line:
        kill_process_group(proc.pid)
        tail = tail_text(vm_dir / "supervisor.log")
        raise BootError(
            f"the VM supervisor failed to start: {tail or 'no output'}",
            details={"console_tail": tail_text(vm_dir / "console.log")},
        )
    try:
        event = control.decode_event(line)
    except VMStateError:
        kill_process_group(proc.pid)
        raise
    if isinstance(event, control.Ready):
        return event
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    if isinstance(event, control.Failed):
        error = event.error
        error.details.setdefault("console_tail", tail_text(vm_dir / "console.log"))
        raise error
    kill_process_group(proc.pid)
    raise BootError(f"the VM supervisor answered {type(event).__name__} at start-up")


def _connect(vm_dir: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(vm_dir / "ctl.sock"))
    except OSError as exc:
        sock.close()
        raise VMStateError(
            f"VM {vm_dir.name} is not reachable ({exc.strerror})",
            hints=hints(
                cli="check `pyro vm status`; delete and recreate it if it is broken",
                sdk="check Pyro.status_vm(); delete and recreate it if it is broken",
                mcp="check it with the vm_status tool; delete and recreate it if it is broken",
            ),
        ) from None
    return sock


class _StdinSender:
    """Streams a command's stdin to the supervisor as control messages, on its own
    thread (reading the source may block, e.g. on a pipe). Memory stays bounded: one
    chunk at a time, held back by the socket's buffer. The supervisor closing the
    connection (the command is over) ends it quietly; a source that fails closes the
    connection, which kills the command, and the error is raised to the caller."""

    def __init__(self, sock: socket.socket, chunks: Iterable[bytes]) -> None:
        self._sock = sock
        self._chunks = chunks
        self._stopped = threading.Event()
        self.error: PyroError | None = None
        self._thread = threading.Thread(target=self._run, name="pyro-stdin", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        step = control.MAX_STDIN_CHUNK
        source = iter(self._chunks)
        try:
            while not self._stopped.is_set():
                try:
                    chunk = next(source)
                except StopIteration:
                    self._sock.sendall(control.encode(control.StdinEof()))
                    return
                except Exception as exc:  # the caller's source failed: abandon the command
                    self.error = source_error(exc)
                    self._sock.shutdown(socket.SHUT_RDWR)
                    return
                for i in range(0, len(chunk), step):
                    if self._stopped.is_set():
                        return
                    self._sock.sendall(control.encode(control.StdinData(chunk[i : i + step])))
        except OSError:
            pass  # the supervisor closed the connection: the command is over

    def stop(self) -> None:
        """No more stdin (the result is in, or the caller gave up). A send blocked on
        the socket is woken; a source blocked in a read is left to its daemon thread,
        which sends nothing once it returns."""
        self._stopped.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)
        self._thread.join(timeout=0.5)


def request(
    vm_dir: Path, message: control.Request, stdin: Iterable[bytes] | None = None
) -> Iterator[control.Event]:
    """Send one request to the VM's supervisor and yield its events; ``stdin`` (only
    with an exec whose ``stdin`` is set) is streamed after the request line."""
    if (stdin is not None) != (isinstance(message, control.ExecRequest) and message.stdin):
        raise InvalidInputError("stdin goes with, and only with, an exec request with stdin")
    sock = _connect(vm_dir)
    sender: _StdinSender | None = None
    try:
        sock.sendall(control.encode(message))
        if stdin is not None:
            sender = _StdinSender(sock, stdin)
        buf = b""
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                if sender is not None and sender.error is not None:
                    raise sender.error
                return
            buf += chunk
            while b"\n" in buf:
                line, _, buf = buf.partition(b"\n")
                event = control.decode_event(line)
                if sender is not None and not isinstance(event, control.Heartbeat | control.Output):
                    sender.stop()  # the final event: the rest of the stdin is not wanted
                yield event
    finally:
        if sender is not None:
            sender.stop()
        sock.close()


@contextlib.contextmanager
def tunnel(vm_dir: Path) -> Iterator[AgentChannel]:
    """An :class:`AgentChannel` to the VM's guest agent for file operations, relayed
    by its supervisor (:mod:`pyro_mcp.guest.relay`); closed on leaving the block."""
    from pyro_mcp.guest.channel import AgentChannel, SocketIO

    sock = _connect(vm_dir)
    try:
        sock.sendall(control.encode(control.TunnelRequest()))
        line = b""
        while not line.endswith(b"\n"):  # byte by byte: what follows is the agent's
            byte = sock.recv(1)
            if not byte:
                raise VMStateError(
                    f"VM {vm_dir.name}'s supervisor closed the connection",
                    hints=hints(
                        cli="check `pyro vm status`",
                        sdk="check Pyro.status_vm()",
                        mcp="check it with the vm_status tool",
                    ),
                )
            line += byte
            if len(line) > control.MAX_LINE_BYTES:
                raise VMStateError(f"VM {vm_dir.name}'s supervisor sent an overlong line")
        event = control.decode_event(line)
        if isinstance(event, control.Failed):
            raise event.error
        if not isinstance(event, control.Ok):
            raise VMStateError(f"the supervisor answered {type(event).__name__} to a tunnel")
        yield AgentChannel(SocketIO(sock))
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def stop(
    vm_dir: Path,
    supervisor: ProcessId | None,
    vmm: ProcessId | None,
    *,
    wait_exit: bool = True,
    reason: str = "stopped",
) -> None:
    """Stop the VM's supervisor and VMM. ``wait_exit=False`` (used when the folder is
    about to be removed) returns once the VMM is dead, while the supervisor finishes
    exiting on its own. ``reason`` "deleted" tells the supervisor to leave the folder
    alone."""
    if supervisor is not None and supervisor.alive():
        acknowledged = False
        with contextlib.suppress(PyroError, OSError):
            for event in request(vm_dir, control.ShutdownRequest(reason)):
                acknowledged = isinstance(event, control.Ok)
                break
        if wait_exit or not acknowledged:
            deadline = time.monotonic() + 5
            while supervisor.alive() and time.monotonic() < deadline:
                time.sleep(0.005)
            if supervisor.alive():
                kill_process_group(supervisor.pid)
    if vmm is not None and vmm.alive():
        with contextlib.suppress(ProcessLookupError):
            os.kill(vmm.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while vmm.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
