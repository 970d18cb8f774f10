"""gVisor backend: each VM is a ``runsc`` sandbox whose init is the guest agent.

No hardware virtualisation is needed. gVisor's application kernel (the
"Sentry", a Go program under a tight seccomp filter) serves the guest's system
calls in user space, and a separate "gofer" process is its only access to host
files. Guest code runs natively on the host CPU; with the ``ptrace`` platform
every system call is intercepted and served by the Sentry. So CPU-bound work
runs at about native speed and system-call-heavy work pays per call, where a
QEMU guest under TCG pays ~20x on every instruction.

One VM = one sandbox, started with ``runsc run`` from an OCI bundle in the VM's
folder:

* ``/``: the environment's root filesystem (the same ``rootfs.ext4`` the VM
  backends boot, unpacked once into a folder, see
  :func:`pyro_mcp.environments.tree.ensure_rootfs_tree`), read-only, under a
  private writable overlay whose upper layer is a file in the VM's folder
  (``--overlay2=root:<vm_dir>``). Nothing a guest writes reaches the shared tree.
* the container's process is ``pyro-agent --stdio`` (bind-mounted read-only at
  :data:`AGENT_PATH`): the same agent and wire protocol as in a microVM, over the
  ``runsc`` process's stdin/stdout instead of a virtio-serial port. Its stderr
  (and runsc's own messages) go to ``console.log``.
* ``/workspace``: a bind mount of ``<vm_dir>/workspace`` when that folder (or a
  symlink to one) exists - a task's workspace; otherwise the rootfs's own
  (empty) ``/workspace`` in the overlay.
* no network (``--network=none``: loopback only, gVisor's own network stack);
  ``mem_mib`` is the sandbox's memory cgroup limit (Sentry + guest processes, as
  a VM's RAM holds its kernel too), ``vcpu_count`` its CPU quota, and
  :data:`PIDS_LIMIT` host tasks its pids limit (the Sentry's and gofer's threads
  plus, on ``ptrace``, a stub process of ~20 threads per guest process: about 400
  guest processes). Exceeding the memory or pids limit ends the whole sandbox
  (the host kills it), not a single guest process; the exec error says which.

Runsc releases from before 2023 (Debian 12 ships ``0.0~20221219``) reject
``AT_NO_AUTOMOUNT`` in ``statx``/``newfstatat``, which Debian 12's coreutils
pass: ``ls`` and ``stat`` fail with EINVAL. For those releases a tiny preload
library (``COMPAT_SHIM_SOURCE``, listed in ``/etc/ld.so.preload``) clears the
flag, which gVisor ignores anyway.

The sandbox's makings (runsc flags, OCI config, the compat shim, the cgroup
sweep) are in :mod:`pyro_mcp.vmm.gvisor_bundle`; this module finds and probes
runsc and starts and stops sandboxes.

Lifetime: ``runsc run`` dies with the supervisor (PR_SET_PDEATHSIG) and starts
the sandbox ``--attached``, so the sandbox dies with it; closing the agent's
stdin also ends the agent and with it the sandbox. A cgroup a killed ``runsc
run`` left behind is removed by the next start (``sweep_stale_cgroups``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

from pyro_mcp.errors import BackendUnavailableError, BootError, InvalidInputError, PyroError
from pyro_mcp.procs import die_with_parent, tail_text
from pyro_mcp.progress import ProgressFn, no_progress
from pyro_mcp.vmm.base import (
    BackendProbe,
    LaunchPlan,
    LaunchSpec,
    SnapshotRef,
    VMPaths,
    WorkspaceKind,
)
from pyro_mcp.vmm.gvisor_bundle import (
    AGENT_PATH,
    FLAGS_ENV,
    PIDS_LIMIT,
    _gvisor_cache,
    _run,
    ensure_compat_shim,
    global_flags,
    oci_config,
    sweep_stale_cgroups,
)

NAME = "gvisor"
RUNSC_ENV = "PYRO_RUNSC"
PLATFORM_ENV = "PYRO_RUNSC_PLATFORM"
WORKSPACE_DIRNAME = "workspace"
#: runsc releases dated before this reject AT_NO_AUTOMOUNT (see the module docstring).
STATX_FIXED_DATE = 20230401
PROBE_FORMAT = 1
PROBE_FAILURE_TTL_S = 300.0
INSTALL_HINT = "install gVisor: apt-get install runsc (or point PYRO_RUNSC at a runsc binary)"


_VERSION_DATE = re.compile(r"(20\d{6})")


# --------------------------------------------------------------------------- finding runsc


def runsc_binary() -> str | None:
    """``PYRO_RUNSC`` (a path, or a name looked up on PATH), else ``runsc`` on PATH."""
    override = os.environ.get(RUNSC_ENV, "").strip()
    if override:
        found = shutil.which(override) if "/" not in override else override
        if found and os.path.isfile(found) and os.access(found, os.X_OK):
            return os.path.abspath(found)
        return None
    return shutil.which("runsc")


def version_date(version: str | None) -> int | None:
    """The YYYYMMDD a runsc version names (``0.0~20221219.0``, ``release-20240401.0``)."""
    if not version:
        return None
    match = _VERSION_DATE.search(version)
    return int(match.group(1)) if match else None


def needs_statx_compat(version: str | None) -> bool:
    """Whether this runsc rejects AT_NO_AUTOMOUNT; undated builds get the shim too
    (it is harmless where the flag is accepted)."""
    date = version_date(version)
    return date is None or date < STATX_FIXED_DATE


@dataclass(frozen=True)
class RunscInfo:
    """What the probe learnt about one runsc binary (cached per binary and user)."""

    binary: str
    version: str | None
    platforms: tuple[str, ...]
    platform: str
    rootless: bool
    works: bool
    reason: str
    probed_at: float

    @property
    def date(self) -> int | None:
        return version_date(self.version)

    @property
    def statx_compat(self) -> bool:
        return needs_statx_compat(self.version)


def _probe_cache_path(binary: str) -> Path:
    st = os.stat(binary)
    material = json.dumps(
        [
            PROBE_FORMAT,
            os.path.realpath(binary),
            st.st_size,
            st.st_mtime_ns,
            os.geteuid(),
            os.uname().release,
            os.environ.get(PLATFORM_ENV, ""),
            os.environ.get(FLAGS_ENV, ""),
        ]
    )
    key = hashlib.sha256(material.encode()).hexdigest()[:16]
    return _gvisor_cache() / f"probe-{key}.json"


def _query_version(binary: str) -> str | None:
    try:
        out = _run([binary, "--version"]).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.startswith("runsc version"):
            return line.removeprefix("runsc version").strip() or None
    return None


def _query_platforms(binary: str) -> tuple[str, ...]:
    try:
        out = _run([binary, "help", "platforms"]).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ()
    return tuple(word for word in out.split() if re.fullmatch(r"[a-z][a-z0-9_]*", word))


def _choose_platform(platforms: tuple[str, ...]) -> str:
    """``PYRO_RUNSC_PLATFORM``, else systrap (newer runsc, faster), else ptrace."""
    forced = os.environ.get(PLATFORM_ENV, "").strip()
    if forced:
        return forced
    return "systrap" if "systrap" in platforms else "ptrace"


def runsc_info(*, refresh: bool = False) -> RunscInfo | None:
    """The (cached) probe of the runsc this process would use; None if none is found.

    The probe starts a real sandbox with the flags VMs use, running the static
    guest agent's ``--version`` (~0.3 s, once per runsc binary, user and host
    kernel). A failure is re-probed after :data:`PROBE_FAILURE_TTL_S`.
    """
    binary = runsc_binary()
    if binary is None:
        return None
    try:
        cache = _probe_cache_path(binary)
    except OSError:
        return None
    if not refresh:
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(cache.read_text())
            data["platforms"] = tuple(data["platforms"])
            info = RunscInfo(**data)
            if info.works or time.time() - info.probed_at < PROBE_FAILURE_TTL_S:
                return info
    info = _probe(binary)
    with contextlib.suppress(OSError):
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(json.dumps(asdict(info)))
        os.replace(tmp, cache)
    return info


def _probe(binary: str) -> RunscInfo:
    version = _query_version(binary)
    platforms = _query_platforms(binary)
    info = RunscInfo(
        binary=binary,
        version=version,
        platforms=platforms,
        platform=_choose_platform(platforms),
        rootless=os.geteuid() != 0,
        works=False,
        reason="",
        probed_at=time.time(),
    )
    if version is None:
        return replace(info, reason=f"{binary} --version failed: is it a runsc binary?")
    try:
        _probe_sandbox(binary, info.platform, info.rootless)
    except PyroError as exc:
        return replace(info, reason=exc.message)
    except (OSError, subprocess.SubprocessError) as exc:
        return replace(info, reason=f"runsc could not run: {exc}")
    mode = "rootless, no cgroup limits" if info.rootless else "memory/pids/CPU limits via cgroups"
    return replace(
        info,
        works=True,
        reason=f"starts sandboxes here (platform {info.platform}, {mode})",
    )


def _probe_sandbox(binary: str, platform: str, rootless: bool) -> None:
    """Start a throwaway sandbox (empty root + the agent) exactly as VMs are started."""
    import tempfile

    from pyro_mcp.guest.build import ensure_agent_binary

    agent = ensure_agent_binary()
    base = _gvisor_cache()
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="probe-", dir=base))
    try:
        rootfs = work / "rootfs"
        rootfs.mkdir()
        (work / "state").mkdir()
        bundle = work / "bundle"
        bundle.mkdir()
        cid = f"pyro-probe-{secrets.token_hex(4)}"
        config = oci_config(
            rootfs=rootfs,
            agent=agent,
            args=(AGENT_PATH, "--version"),
            mem_mib=128,
            vcpu_count=1,
            container_id=cid,
            rootless=rootless,
        )
        (bundle / "config.json").write_text(json.dumps(config))
        argv = [
            binary,
            *global_flags(
                root=work / "state", overlay_dir=work, platform=platform, rootless=rootless
            ),
            "run",
            "--bundle",
            str(bundle),
            cid,
        ]
        try:
            proc = _run(argv, timeout=60)
        except subprocess.TimeoutExpired:
            raise BackendUnavailableError("a runsc test sandbox did not finish in 60 s") from None
        if proc.returncode != 0 or "pyro-agent" not in proc.stdout:
            log = tail_text(work / "state" / "runsc.log", 6) or proc.stderr.strip()[-800:]
            raise BackendUnavailableError(
                f"runsc cannot start a sandbox here (exit {proc.returncode}): {log or 'no output'}"
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def probe_backend(*, detailed: bool = False) -> BackendProbe:
    """Automatic selection (cached probe) and ``pyro doctor`` (``detailed``: probes
    again): is gVisor usable here, and why (not)."""
    binary = runsc_binary()
    if binary is None:
        override = os.environ.get(RUNSC_ENV, "").strip()
        reason = (
            f"{RUNSC_ENV}={override} is not an executable file"
            if override
            else "runsc (gVisor) is not installed"
        )
        return BackendProbe(NAME, False, None, reason, advice=(INSTALL_HINT,))
    info = runsc_info(refresh=detailed)
    if info is None:
        return BackendProbe(NAME, False, None, f"{binary} is unreadable", binary=binary)
    advice: list[str] = []
    if not info.works:
        advice.append("see `pyro doctor`; run as root or point PYRO_RUNSC at a newer runsc")
    elif info.statx_compat:
        advice.append(
            f"runsc {info.version} predates 2023: pyro preloads a statx compat shim and some "
            "newer syscalls are missing; for a newer gVisor download a release from "
            "gvisor.dev and set PYRO_RUNSC=/path/to/runsc"
        )
    if info.works and info.rootless:
        advice.append("run as root to enforce the memory, pids and CPU limits (cgroups)")
    return BackendProbe(
        name=NAME,
        available=info.works,
        acceleration=info.platform if info.works else None,
        reason=info.reason,
        binary=info.binary,
        version=info.version,
        advice=tuple(advice),
    )


def require_runsc() -> RunscInfo:
    info = runsc_info()
    if info is None:
        raise BackendUnavailableError(
            "runsc (gVisor) not found" if not os.environ.get(RUNSC_ENV) else
            f"{RUNSC_ENV} does not name an executable runsc",
            hint=INSTALL_HINT,
        )  # fmt: skip
    if not info.works:
        raise BackendUnavailableError(
            f"the gvisor backend is not usable here: {info.reason}",
            hint="run `pyro doctor`; use --backend qemu meanwhile",
        )
    return info


# --------------------------------------------------------------------------- running


def _explain_exit(status: int, mem_mib: int) -> tuple[str, str]:
    """Why a sandbox that nobody stopped is gone, from ``runsc run``'s exit status."""
    if status == 128 + signal.SIGKILL:
        return (
            "the gVisor sandbox was killed (SIGKILL), most likely because its processes "
            f"went over the VM's memory limit of {mem_mib} MiB (on gvisor that ends the "
            "whole VM, not one process)",
            "create the VM with a larger mem_mib, or make the command use less memory",
        )
    return (
        f"the gVisor sandbox stopped (runsc exit status {status}); it does so when it "
        f"reaches its limit of {PIDS_LIMIT} host tasks (processes and threads) or when "
        "gVisor's kernel fails (see the VM's console.log)",
        "run fewer processes at once; the VM is gone: create a new one",
    )


@dataclass
class GvisorHandle:
    """One running sandbox: the ``runsc run`` process and the agent's stdio pipes."""

    process: subprocess.Popen[bytes]
    runsc: list[str]  # runsc + global flags, for `runsc delete` after a failure
    state_root: Path
    container_id: str
    paths: VMPaths
    mem_mib: int
    _stopping: bool = False
    _ended: bool = False

    @property
    def pid_file(self) -> Path:
        return self.paths.vm_dir / "sandbox.pid"

    @property
    def pid(self) -> int:
        """The sandbox (Sentry) process once it exists: killing it ends the VM."""
        with contextlib.suppress(OSError, ValueError):
            return int(self.pid_file.read_text().strip())
        return self.process.pid

    def read(self, size: int) -> bytes:
        assert self.process.stdout is not None
        try:
            return os.read(self.process.stdout.fileno(), size)
        except (OSError, ValueError):
            return b""

    def write(self, data: bytes) -> None:
        assert self.process.stdin is not None
        fd = self.process.stdin.fileno()
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]

    def poll(self) -> int | None:
        status = self.process.poll()
        if status is not None and not self._ended:
            self._ended = True
            if not self._stopping:
                self._note_unexpected_exit(status)
        return status

    def exit_reason(self, wait: float = 2.0) -> tuple[str, str] | None:
        """(message, hint) saying why the sandbox ended on its own; None while it runs
        (after ``wait`` seconds) or when it was stopped on purpose."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=wait)
        status = self.poll()
        if status is None or self._stopping:
            return None
        return _explain_exit(status, self.mem_mib)

    def _note_unexpected_exit(self, status: int) -> None:
        """Say in the console why the sandbox is gone (it ended on its own)."""
        message, _ = _explain_exit(status, self.mem_mib)
        with contextlib.suppress(OSError), self.paths.console.open("a") as console:
            console.write(f"pyro: {message}\n")

    def kill(self) -> None:
        """End the sandbox: EOF on the agent's stdin ends it cleanly (and ``runsc run``
        removes the container); SIGKILL after a grace period; ``runsc delete`` if
        state was left behind."""
        self._stopping = self._stopping or self.process.poll() is None
        if self.process.stdin is not None:
            with contextlib.suppress(OSError):
                self.process.stdin.close()
        try:
            self.process.wait(timeout=3)
        except subprocess.TimeoutExpired:
            sandbox = self.pid
            for pid in {sandbox, self.process.pid}:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=10)
        if self.process.stdout is not None:
            with contextlib.suppress(OSError):
                self.process.stdout.close()
        if any(self.state_root.glob(f"*{self.container_id}*.state")):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                _run([*self.runsc, "delete", "--force", self.container_id], timeout=20)

    def console_tail(self, max_lines: int = 40) -> str:
        tail = tail_text(self.paths.console, max_lines)
        log = tail_text(self.state_root / "runsc.log", 10)
        if log:
            tail = f"{tail}\n--- runsc.log ---\n{log}" if tail else log
        return tail


class GvisorBackend:
    """gVisor sandboxes: no guest kernel, no per-VM disk (the overlay's upper layer is
    in the VM's folder and dies with it) and no snapshots; a task's /workspace is a
    host folder bind-mounted into the sandbox."""

    name: ClassVar[str] = NAME
    execution_mode: ClassVar[str] = "gvisor_sandbox"  # gVisor's user-space kernel, no VM
    workspace_kind: ClassVar[WorkspaceKind] = "directory"
    runs_vms: ClassVar[bool] = True

    def prepare(
        self,
        env: Any,
        *,
        vcpu_count: int,
        mem_mib: int,
        network: bool,
        acceleration: str,
        mounts: Sequence[Mapping[str, Any]] = (),
        paths: VMPaths | None = None,
        progress: ProgressFn = no_progress,
    ) -> LaunchPlan:
        """The environment's root filesystem unpacked into a shared read-only tree and
        the agent binary; a task's workspace is the VM folder's ``workspace`` link, bind
        mounted at start, so the guest agent mounts nothing. Always a cold start."""
        from pyro_mcp.environments.tree import ensure_rootfs_tree
        from pyro_mcp.guest.build import ensure_agent_binary

        del paths  # nothing per-VM to find: every start is fresh
        if mounts:
            raise InvalidInputError(
                "the gvisor backend takes no guest disk mounts",
                hint="a gvisor task's /workspace is a folder (workspace_kind 'directory')",
            )
        spec = LaunchSpec(
            rootfs=ensure_rootfs_tree(env, progress),
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            network=network,
            acceleration=acceleration,
            agent=ensure_agent_binary(progress),
        )
        return LaunchPlan(spec)

    def list_snapshots(self) -> list[dict[str, Any]]:
        return []

    def prune_snapshots(self) -> list[str]:
        return []

    def probe(self, *, detailed: bool = False) -> BackendProbe:
        return probe_backend(detailed=detailed)

    def start(
        self,
        spec: LaunchSpec,
        paths: VMPaths,
        *,
        restore: SnapshotRef | None = None,
        timeout: float = 30.0,
    ) -> GvisorHandle:
        """Start the sandbox; its agent's stdio is the channel (connected at once)."""
        del timeout  # nothing to wait for: the caller waits for the agent's HELLO
        if restore is not None:
            raise BootError("the gvisor backend has no snapshots to restore")
        if spec.network:
            raise InvalidInputError(
                "guest networking is not available on the gvisor backend",
                hint="run without --network (guests have loopback only)",
            )
        info = require_runsc()
        agent = spec.agent
        if agent is None:
            from pyro_mcp.guest.build import ensure_agent_binary

            agent = ensure_agent_binary()
        compat = ensure_compat_shim() if info.statx_compat else None
        if not (spec.rootfs / "usr").is_dir():
            raise BootError(
                f"{spec.rootfs} is not an unpacked root filesystem",
                hint="the gvisor backend needs the environment's rootfs folder; "
                "run `pyro env pull` again",
            )
        vm_dir = paths.vm_dir
        vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        state_root = vm_dir / "runsc"
        state_root.mkdir(exist_ok=True, mode=0o700)
        bundle = vm_dir / "bundle"
        bundle.mkdir(exist_ok=True, mode=0o700)
        workspace_link = vm_dir / WORKSPACE_DIRNAME
        workspace = Path(os.path.realpath(workspace_link)) if workspace_link.is_dir() else None
        container_id = vm_dir.name
        config = oci_config(
            rootfs=spec.rootfs,
            agent=agent,
            mem_mib=spec.mem_mib,
            vcpu_count=spec.vcpu_count,
            container_id=container_id,
            compat=compat,
            workspace=workspace,
            rootless=info.rootless,
        )
        (bundle / "config.json").write_text(json.dumps(config, indent=1))
        if not info.rootless:
            sweep_stale_cgroups()
        runsc = [
            info.binary,
            *global_flags(
                root=state_root, overlay_dir=vm_dir, platform=info.platform, rootless=info.rootless
            ),
        ]
        pid_file = vm_dir / "sandbox.pid"
        pid_file.unlink(missing_ok=True)
        with paths.console.open("ab") as console:
            process = subprocess.Popen(
                [*runsc, "run", "--pid-file", str(pid_file), "--bundle", str(bundle), container_id],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=console,
                cwd=vm_dir,
                preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads yet in the supervisor
                close_fds=True,
            )
        return GvisorHandle(
            process=process,
            runsc=runsc,
            state_root=state_root,
            container_id=container_id,
            paths=paths,
            mem_mib=spec.mem_mib,
        )
