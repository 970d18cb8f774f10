"""host_compat: run a task's commands on the host, confined by bubblewrap.

For hosts where no VM backend works, and only when the user opts in
(``--backend host_compat`` or ``Pyro(allow_host_compat=True)``): it is never
chosen silently, and every result says ``execution_mode: "host_compat"``.
It is weaker isolation than a microVM (one shared kernel).

Each command runs in ``bwrap`` with its own user, PID, mount, IPC, UTS, cgroup
and network namespaces (``--unshare-all``: loopback only), no capabilities,
``no_new_privs`` (bwrap's default) and:

* ``/``: the environment's own root filesystem, read-only: its ``rootfs.ext4``
  unpacked once into a folder (:func:`pyro_mcp.environments.tree.ensure_rootfs_tree`,
  re-exported here), so commands see the same Debian userland as in the VM and
  none of the host's files.
* ``/workspace``: the task's workspace folder, the only writable host path.
* ``/tmp``, ``/run``, ``/root``: fresh tmpfs per command (only /workspace
  persists between a task's commands); ``/dev``: minimal devtmpfs-like set;
  ``/proc``: of the sandbox's PID namespace; no ``/sys``.

The sandbox dies with the command: bwrap is PID 1 of the namespace and gets
SIGKILL if we die (``--die-with-parent``); a timeout kills bwrap's process
group, and with it every process of the sandbox. Its number of processes is
bounded by a pids cgroup or RLIMIT_NPROC (:mod:`pyro_mcp.vmm.pids`).

:class:`HostCompatBackend` is its face in :mod:`pyro_mcp.vmm`: a
:class:`~pyro_mcp.vmm.base.SandboxBackend`, not a VM backend. There is no
long-lived guest, so no ``start``, handle, supervisor or snapshot: each
command is its own sandbox over the task's workspace folder
(``workspace_kind`` "directory"), which is why it serves tasks and one-shot
runs but not ``pyro vm``.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pyro_mcp.commands import source_error
from pyro_mcp.environments.tree import ensure_rootfs_tree
from pyro_mcp.errors import BackendUnavailableError, InvalidInputError, PyroError
from pyro_mcp.procs import kill_process_group
from pyro_mcp.vmm import pids
from pyro_mcp.vmm.base import BackendProbe, WorkspaceKind

if TYPE_CHECKING:
    from pyro_mcp.guest.channel import AgentChannel

NAME = "host_compat"
AGENT_IN_SANDBOX = "/tmp/.pyro-agent"
HOSTNAME = "pyro-task"


def bwrap_binary() -> str | None:
    return shutil.which("bwrap")


@lru_cache(maxsize=1)
def probe() -> BackendProbe:
    """Is bubblewrap installed and able to make its namespaces here?"""
    binary = bwrap_binary()
    if binary is None:
        return BackendProbe(
            name=NAME,
            available=False,
            acceleration=None,
            reason="bubblewrap (bwrap) is not installed",
            advice=("install it: apt-get install bubblewrap",),
        )
    true = shutil.which("true") or "/bin/true"
    try:
        proc = subprocess.run(
            [binary, "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/", "--", true],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return BackendProbe(NAME, False, None, f"bwrap could not run: {exc}", binary=binary)
    if proc.returncode != 0:
        return BackendProbe(
            name=NAME,
            available=False,
            acceleration=None,
            reason=f"bwrap cannot create its namespaces here: {proc.stderr.strip()}",
            binary=binary,
            advice=(
                "enable unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1)",
            ),
        )
    return BackendProbe(
        name=NAME,
        available=True,
        acceleration="none",
        reason="bubblewrap can create namespaces (no VM: commands share the host kernel)",
        binary=binary,
    )


def require() -> str:
    info = probe()
    if not info.available or info.binary is None:
        raise BackendUnavailableError(
            f"the host_compat backend is not usable: {info.reason}",
            hint="; ".join(info.advice) or "run `pyro doctor`",
        )
    return info.binary


# --------------------------------------------------------------------------- running


def bwrap_argv(
    binary: str,
    rootfs: Path,
    workspace: Path,
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
) -> list[str]:
    args = [
        binary,
        "--unshare-all", "--die-with-parent", "--new-session",
        "--cap-drop", "ALL", "--uid", "0", "--gid", "0",
        "--hostname", HOSTNAME,
        "--ro-bind", str(rootfs), "/",
        "--dev", "/dev", "--proc", "/proc",
        "--tmpfs", "/tmp", "--tmpfs", "/run", "--tmpfs", "/root",
        "--bind", str(workspace), "/workspace",
        "--chdir", cwd,
        "--clearenv",
    ]  # fmt: skip
    for key, value in env.items():
        args += ["--setenv", key, value]
    return [*args, "--", *argv]


def run(
    rootfs: Path,
    workspace: Path,
    argv: Sequence[str],
    *,
    cwd: str,
    env: Mapping[str, str],
    timeout_seconds: float,
    stdout_cap: int,
    stderr_cap: int,
    stdin: Iterable[bytes] | None = None,
    on_output: Callable[[int, bytes], None] | None = None,
) -> dict[str, Any]:
    """Run ``argv`` confined; returns the fields of an exec outcome.

    ``on_output(stream, data)`` (stream 1 stdout, 2 stderr) gets each chunk as it
    is read, within the caps.

    Output beyond a cap is read and dropped (the command is never blocked on a
    full pipe). On timeout, or if we are interrupted, the whole sandbox is killed.
    ``stdin`` (None: /dev/null) is written to the command's stdin pipe as it reads
    it (:class:`_StdinFeeder`).
    """
    binary = require()
    if not workspace.is_dir():
        raise InvalidInputError(f"the task workspace {workspace} is missing")
    full = bwrap_argv(binary, rootfs, workspace, argv, cwd=cwd, env=env)
    cgroup = pids.open_cgroup()
    try:
        full = cgroup.wrap(full) if cgroup is not None else [*pids.nproc_prefix(), *full]
        return _run_confined(full, timeout_seconds, stdout_cap, stderr_cap, stdin, on_output)
    finally:
        if cgroup is not None:
            cgroup.close()


class _StdinFeeder:
    """Writes a command's stdin to its pipe on a thread: blocking writes, so the pipe
    is the backpressure and one chunk at a time is held. The command closing its
    stdin (or exiting: the sandbox dies with it) ends the feeding quietly; a source
    that fails kills the sandbox and the error is raised by the caller."""

    def __init__(self, proc: subprocess.Popen[bytes], chunks: Iterable[bytes]) -> None:
        assert proc.stdin is not None
        self._proc = proc
        self._pipe = proc.stdin
        self._chunks = chunks
        self.error: PyroError | None = None
        self._thread = threading.Thread(target=self._run, name="pyro-stdin", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        source = iter(self._chunks)
        try:
            while True:
                try:
                    chunk = next(source)
                except StopIteration:
                    break
                except Exception as exc:  # the caller's source failed: kill the sandbox
                    self.error = source_error(exc)
                    kill_process_group(self._proc.pid)
                    break
                self._pipe.write(chunk)
                self._pipe.flush()
        except OSError:
            pass  # EPIPE: the command stopped reading
        with contextlib.suppress(OSError):
            self._pipe.close()

    def finish(self) -> None:
        """The command is over. A source blocked in a read is left to its daemon
        thread, whose next write fails."""
        self._thread.join(timeout=0.5)
        if self.error is not None:
            raise self.error


def _run_confined(
    full: list[str],
    timeout_seconds: float,
    stdout_cap: int,
    stderr_cap: int,
    stdin: Iterable[bytes] | None = None,
    on_output: Callable[[int, bytes], None] | None = None,
) -> dict[str, Any]:
    started = time.monotonic()
    proc = subprocess.Popen(
        full,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        close_fds=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    feeder = _StdinFeeder(proc, stdin) if stdin is not None else None
    buffers = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray()}
    caps = {proc.stdout.fileno(): stdout_cap, proc.stderr.fileno(): stderr_cap}
    truncated = dict.fromkeys(buffers, False)
    timed_out = False
    deadline = started + timeout_seconds
    sel = selectors.DefaultSelector()
    try:
        for stream in (proc.stdout, proc.stderr):
            sel.register(stream, selectors.EVENT_READ)
        open_streams = 2
        while open_streams:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                kill_process_group(proc.pid)
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                fd = key.fd
                data = os.read(fd, 65536)
                if not data:
                    sel.unregister(key.fileobj)
                    open_streams -= 1
                    continue
                buf = buffers[fd]
                room = caps[fd] - len(buf)
                if len(data) > room:
                    truncated[fd] = True
                    data = data[: max(room, 0)]
                buf.extend(data)
                if on_output is not None and data:
                    on_output(1 if fd == proc.stdout.fileno() else 2, data)
        try:
            returncode = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_process_group(proc.pid)
            returncode = proc.wait()
    except BaseException:
        kill_process_group(proc.pid)
        proc.wait()
        raise
    finally:
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
    if timed_out:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
    if feeder is not None:
        feeder.finish()
    exit_code = returncode if returncode >= 0 else 128 - returncode
    if timed_out:
        exit_code = 128 + signal.SIGKILL
    out_fd, err_fd = list(buffers)
    return {
        "exit_code": exit_code,
        "stdout": bytes(buffers[out_fd]),
        "stderr": bytes(buffers[err_fd]),
        "stdout_truncated": truncated[out_fd],
        "stderr_truncated": truncated[err_fd],
        "timed_out": timed_out,
        "duration_ms": int((time.monotonic() - started) * 1000),
    }


@contextlib.contextmanager
def files(rootfs: Path, workspace: Path) -> Iterator[AgentChannel]:
    """The guest agent (``--stdio``) in the same sandbox a command gets, for file
    operations on the task's workspace: the host itself never walks the folder the
    sandbox writes (its links could point anywhere on the host)."""
    from pyro_mcp.guest.build import ensure_agent_binary
    from pyro_mcp.guest.channel import AgentChannel, PipeIO

    binary = require()
    if not workspace.is_dir():
        raise InvalidInputError(f"the task workspace {workspace} is missing")
    agent = ensure_agent_binary()
    full = bwrap_argv(binary, rootfs, workspace, [AGENT_IN_SANDBOX, "--stdio"], cwd="/", env={})
    # The agent is bound in after /tmp's tmpfs exists (bwrap applies options in order).
    at = full.index("--chdir")
    full[at:at] = ["--ro-bind", str(agent), AGENT_IN_SANDBOX]
    proc = subprocess.Popen(
        full,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )
    try:
        channel = AgentChannel(PipeIO(proc))
        channel.wait_hello(timeout=30)
        yield channel
    finally:
        kill_process_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class HostCompatBackend:
    """Commands on the host kernel, one bubblewrap sandbox each (see the module
    docstring): a per-command sandbox, never a VM."""

    name: ClassVar[str] = NAME
    execution_mode: ClassVar[str] = "host_compat"  # the host kernel, namespaces only
    workspace_kind: ClassVar[WorkspaceKind] = "directory"
    runs_vms: ClassVar[bool] = False

    def probe(self, *, detailed: bool = False) -> BackendProbe:
        del detailed  # the probe is one bwrap run, cached for the process
        return probe()

    def require(self) -> None:
        require()

    # The module's functions serve as they are: there is no per-backend state.
    prepare_root = staticmethod(ensure_rootfs_tree)
    run = staticmethod(run)
    files = staticmethod(files)
