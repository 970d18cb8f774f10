"""QEMU ``microvm`` backend: hardware KVM where it really works, TCG otherwise.

The agent channel is a virtio-serial port whose chardev connects to a unix
socket we listen on (no vsock needed). Snapshots use QEMU migration with the
guest RAM in a file (``x-ignore-shared``), so a restore maps the RAM file
copy-on-write and only reads a few kilobytes of device state.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pyro_mcp.errors import BackendUnavailableError, BootError
from pyro_mcp.procs import die_with_parent, tail_text
from pyro_mcp.progress import ProgressFn, no_progress
from pyro_mcp.vmm.base import (
    WORKSPACE_DISK_MIB,
    BackendProbe,
    LaunchPlan,
    LaunchSpec,
    SnapshotRef,
    VMPaths,
    WorkspaceKind,
)
from pyro_mcp.vmm.detect import kvm_status
from pyro_mcp.vmm.qmp import QMPClient

_DRIVE_ERRORS = "werror=report,rerror=report"


def qemu_binary() -> str | None:
    override = os.environ.get("PYRO_QEMU")
    if override:
        return override if os.access(override, os.X_OK) else None
    return shutil.which("qemu-system-x86_64")


def _missing_qemu() -> tuple[str, str]:
    """(why QEMU is not found, how to fix it), naming PYRO_QEMU when that is the cause."""
    override = os.environ.get("PYRO_QEMU")
    if override:
        return (
            f"PYRO_QEMU={override} is not an executable file",
            "point PYRO_QEMU at a qemu-system-x86_64 binary, or unset it to use the one on PATH",
        )
    return (
        "qemu-system-x86_64 not found on PATH",
        "install QEMU: apt-get install qemu-system-x86 qemu-utils",
    )


def qemu_img_binary() -> str | None:
    return shutil.which("qemu-img")


def host_tsc_khz() -> int | None:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("cpu MHz"):
            try:
                return int(float(line.partition(":")[2]) * 1000)
            except ValueError:
                return None
    return None


def kernel_cmdline(spec: LaunchSpec) -> str:
    parts = ["console=ttyS0", "quiet", "panic=-1", "rdinit=/init", "8250.nr_uarts=1"]
    if spec.acceleration == "tcg":
        # Without these, Debian's kernel sometimes hangs calibrating the TSC under TCG.
        khz = host_tsc_khz()
        parts += ["no_timer_check", "tsc=reliable"]
        if khz:
            parts += [f"tsc_early_khz={khz}", f"lpj={khz * 4}"]
    return " ".join(parts)


def boot_files(spec: LaunchSpec) -> tuple[Path, Path]:
    """The spec's kernel and initramfs, which a VM cannot boot without."""
    if spec.kernel is None or spec.initramfs is None:
        raise BootError(
            "the launch has no guest kernel or initramfs (prepared for another backend?)",
            hint="delete the VM and create it again",
        )
    return spec.kernel, spec.initramfs


def build_args(
    binary: str,
    spec: LaunchSpec,
    paths: VMPaths,
    *,
    ram_file: Path | None = None,
    ram_shared: bool = False,
    incoming: bool = False,
) -> list[str]:
    """The QEMU command line. A restore must use the same one as its snapshot's source VM,
    except for host-side paths and the RAM file's sharing mode."""
    kernel, initramfs = boot_files(spec)
    machine = "microvm,rtc=on,acpi=on"
    args = [binary]
    if ram_file is not None:
        share = "on" if ram_shared else "off"
        args += [
            "-object",
            f"memory-backend-file,id=ram0,size={spec.mem_mib}M,mem-path={ram_file},share={share}",
        ]
        machine += ",memory-backend=ram0"
    if spec.acceleration == "kvm":
        accel = ["-accel", "kvm", "-cpu", "host"]
    else:
        accel = ["-accel", "tcg,tb-size=32"]
    args += [
        "-M", machine, *accel,
        "-m", f"{spec.mem_mib}M", "-smp", str(spec.vcpu_count),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(kernel), "-initrd", str(initramfs),
        "-append", kernel_cmdline(spec),
        "-serial", f"file:{paths.console}",
        "-chardev", f"socket,id=ch0,path={paths.channel},server=off",
        "-device", "virtio-serial-device",
        "-device", "virtserialport,chardev=ch0,name=agent",
        # werror/rerror=report: a full host disk is an I/O error in the guest, not a
        # VM paused forever (QEMU's default for ENOSPC).
        "-drive", f"if=none,id=d0,file={paths.disk},format=qcow2,discard=unmap,{_DRIVE_ERRORS}",
        "-device", "virtio-blk-device,drive=d0",
        "-drive", f"if=none,id=d1,file={paths.workspace},format=raw,discard=unmap,{_DRIVE_ERRORS}",
        "-device", "virtio-blk-device,drive=d1",
        "-qmp", f"unix:{paths.qmp},server=on,wait=off",
    ]  # fmt: skip
    if incoming:
        args += ["-incoming", "defer"]
    return args


def create_overlay(base: Path, overlay: Path, base_format: str) -> None:
    tool = qemu_img_binary()
    if tool is None:
        raise BackendUnavailableError(
            "qemu-img not found", hint="install it: apt-get install qemu-utils"
        )
    proc = subprocess.run(
        [tool, "create", "-q", "-f", "qcow2", "-b", str(base), "-F", base_format, str(overlay)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise BootError(
            f"could not create the VM disk: {proc.stderr.strip()}",
            hint="check that the state folder (PYRO_STATE_DIR) is writable and has free space",
        )


def console_tail(path: Path, max_lines: int = 40) -> str:
    return tail_text(path, max_lines)


@dataclass
class QemuHandle:
    process: subprocess.Popen[bytes]
    conn: socket.socket
    paths: VMPaths

    @property
    def pid(self) -> int:
        return self.process.pid

    def read(self, size: int) -> bytes:
        try:
            return self.conn.recv(size)
        except OSError:
            return b""

    def write(self, data: bytes) -> None:
        self.conn.sendall(data)

    def poll(self) -> int | None:
        return self.process.poll()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        with contextlib.suppress(OSError):
            self.conn.close()

    def console_tail(self, max_lines: int = 40) -> str:
        return console_tail(self.paths.console, max_lines)

    def save_snapshot(self, snapshot_dir: Path) -> None:
        """Migrate the running guest's device state into ``snapshot_dir/state``.

        The guest must have been started with its RAM in ``snapshot_dir/ram``
        (shared); the migration pauses it, so kill it afterwards.
        """
        qmp = QMPClient(self.paths.qmp)
        try:
            qmp.execute(
                "migrate-set-capabilities",
                capabilities=[{"capability": "x-ignore-shared", "state": True}],
            )
            state = snapshot_dir / "state"
            qmp.execute("migrate", uri=f"exec:cat > {_shell_quote(str(state))}")
            qmp.wait_migration()
        finally:
            qmp.close()


def _shell_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


class QemuBackend:
    """QEMU ``microvm``: a guest kernel per VM; its per-VM disk is a qcow2 overlay
    (``VMPaths.disk``) over the environment's image or over the snapshot's disk."""

    name: ClassVar[str] = "qemu"
    execution_mode: ClassVar[str] = "microvm"  # its own guest kernel behind a VMM
    workspace_kind: ClassVar[WorkspaceKind] = "disk"
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
        """The environment's kernel and image, an initramfs with the agent, and the
        warm-start snapshot (taken now if missing). A VM that already has its disk
        (a restart after a stop) boots cold on it: a restore would replace it."""
        from pyro_mcp.guest.build import ensure_initramfs
        from pyro_mcp.vmm.qemu_snapshot import snapshot_for_launch

        spec = LaunchSpec(
            rootfs=env.rootfs,
            vcpu_count=vcpu_count,
            mem_mib=mem_mib,
            network=network,
            acceleration=acceleration,
            kernel=env.kernel.image,
            initramfs=ensure_initramfs(env.kernel.modules, progress=progress),
        )
        restore = None
        if paths is None or not self.has_disk(paths):
            restore = snapshot_for_launch(spec, progress=progress)
        return LaunchPlan(spec, tuple(mounts), restore)

    def has_disk(self, paths: VMPaths) -> bool:
        """Whether the VM already has its own disk (it ran before)."""
        return paths.disk.exists()

    def list_snapshots(self) -> list[dict[str, Any]]:
        from pyro_mcp.vmm.qemu_snapshot import list_snapshots

        return list_snapshots()

    def prune_snapshots(self) -> list[str]:
        from pyro_mcp.vmm.qemu_snapshot import prune_snapshots

        return prune_snapshots()

    def probe(self, *, detailed: bool = False) -> BackendProbe:
        """Cheap by default (no subprocess); ``detailed`` also asks QEMU its version."""
        binary = qemu_binary()
        if binary is None:
            reason, fix = _missing_qemu()
            return BackendProbe(
                name=self.name,
                available=False,
                acceleration=None,
                reason=reason,
                advice=(fix,),
            )
        version = None
        if detailed:
            version = _qemu_version(binary)
        advice: tuple[str, ...] = ()
        if qemu_img_binary() is None:
            advice = ("install qemu-img: apt-get install qemu-utils",)
        kvm = kvm_status()
        accel = "kvm" if kvm.usable else "tcg"
        return BackendProbe(
            name=self.name,
            available=qemu_img_binary() is not None,
            acceleration=accel,
            reason=kvm.reason,
            binary=binary,
            version=version,
            advice=advice,
        )

    def start(
        self,
        spec: LaunchSpec,
        paths: VMPaths,
        *,
        restore: SnapshotRef | None = None,
        snapshot_source: Path | None = None,
        timeout: float = 30.0,
    ) -> QemuHandle:
        """Start a guest cold, as a snapshot source (RAM in ``snapshot_source/ram``),
        or restored from ``restore``. Returns once QEMU connected the agent channel."""
        binary = qemu_binary()
        if binary is None:
            reason, advice = _missing_qemu()
            raise BackendUnavailableError(reason, hint=advice)
        paths.vm_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if len(str(paths.channel)) > 100:
            raise BootError(
                f"state path too long for a unix socket: {paths.channel}",
                hint="set PYRO_STATE_DIR to a shorter directory",
            )
        if restore is not None:
            create_overlay(restore.directory / "disk.qcow2", paths.disk, "qcow2")
            args = build_args(
                binary, spec, paths, ram_file=restore.directory / "ram", incoming=True
            )
        elif snapshot_source is not None:
            create_overlay(spec.rootfs, paths.disk, "raw")
            args = build_args(
                binary, spec, paths, ram_file=snapshot_source / "ram", ram_shared=True
            )
        else:
            if not paths.disk.exists():
                create_overlay(spec.rootfs, paths.disk, "raw")
            args = build_args(binary, spec, paths)

        if not paths.workspace.exists():
            with paths.workspace.open("wb") as fh:
                fh.truncate(WORKSPACE_DISK_MIB << 20)
        for stale in (paths.channel, paths.qmp):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(paths.channel))
        listener.listen(1)
        try:
            with paths.console.open("ab"):
                pass
            process = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=(paths.vm_dir / "vmm.log").open("ab"),
                preexec_fn=die_with_parent,  # noqa: PLW1509 - no threads yet in the supervisor
                close_fds=True,
            )
            deadline = time.monotonic() + timeout
            conn: socket.socket | None = None
            listener.settimeout(0.05)
            while conn is None:
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    if process.poll() is not None:
                        raise BootError(
                            f"QEMU exited with status {process.returncode} before connecting",
                            details={"vmm_log": _tail(paths.vm_dir / "vmm.log")},
                        ) from None
                    if time.monotonic() > deadline:
                        process.kill()
                        raise BootError("QEMU did not connect the agent channel in time") from None
            conn.settimeout(None)
        finally:
            listener.close()
            with contextlib.suppress(FileNotFoundError):
                paths.channel.unlink()
        handle = QemuHandle(process=process, conn=conn, paths=paths)
        if restore is not None:
            try:
                qmp = QMPClient(paths.qmp, timeout=max(1.0, deadline - time.monotonic()))
                try:
                    qmp.execute(
                        "migrate-set-capabilities",
                        capabilities=[{"capability": "x-ignore-shared", "state": True}],
                    )
                    state = restore.directory / "state"
                    qmp.execute("migrate-incoming", uri=f"exec:cat {_shell_quote(str(state))}")
                finally:
                    qmp.close()
            except BaseException:
                handle.kill()
                raise
        return handle


def _qemu_version(binary: str) -> str | None:
    try:
        out = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.splitlines()[0].strip() if out else None


def _tail(path: Path) -> str:
    return console_tail(path, 20)
