"""QEMU warm start: boot each guest configuration once, save it, restore it per VM.

Used by :meth:`pyro_mcp.vmm.qemu.QemuBackend.prepare`; nothing above ``vmm/``
imports this module (``pyro_mcp.vmm.list_snapshots``/``prune_snapshots`` ask
every backend).

A snapshot is taken from a dedicated clean boot (never a user's VM), right
after the guest agent said HELLO, and stored in the cache under a key that
hashes everything a restore must match: VMM binary, machine options, memory,
vCPUs, kernel, initramfs (so the agent), root image and command line. A
snapshot whose files changed or whose digest is wrong is discarded and taken
again; it is never restored.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock

from pyro_mcp import paths
from pyro_mcp.commands import BASE_ENV
from pyro_mcp.errors import BootError, PyroError
from pyro_mcp.fsio import sha256_file
from pyro_mcp.models import iso_utc
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress
from pyro_mcp.vmm.base import LaunchSpec, SnapshotRef, VMPaths, snapshots_enabled

if TYPE_CHECKING:
    from pyro_mcp.guest.channel import AgentChannel

SNAPSHOT_FORMAT = 2
ARTIFACTS = ("ram", "state", "disk.qcow2")


def snapshots_root() -> Path:
    return paths.cache_dir() / "snapshots"


def _fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def snapshot_key(spec: LaunchSpec) -> str:
    from pyro_mcp.vmm.qemu import boot_files, build_args, qemu_binary

    kernel, initramfs = boot_files(spec)
    binary = qemu_binary() or "qemu-system-x86_64"
    placeholder = VMPaths(Path("/vm"))
    material = {
        "format": SNAPSHOT_FORMAT,
        "backend": "qemu",  # kept in the material so existing snapshots keep their key
        "binary": os.path.realpath(binary),
        "binary_fp": _fingerprint(Path(binary)) if Path(binary).exists() else None,
        "args": build_args("qemu", spec, placeholder, ram_file=Path("/ram")),
        "kernel_fp": _fingerprint(kernel),
        "initramfs_fp": _fingerprint(initramfs),
        "rootfs_fp": _fingerprint(spec.rootfs),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def check_snapshot(directory: Path, key: str) -> str | None:
    """None if the snapshot is intact and matches ``key``, else the problem."""
    try:
        meta = json.loads((directory / "meta.json").read_text())
    except (OSError, ValueError):
        return "missing or unreadable meta.json"
    if meta.get("key") != key or meta.get("format") != SNAPSHOT_FORMAT:
        return "key mismatch"
    try:
        for name in ARTIFACTS:
            if _fingerprint(directory / name) != meta["fingerprints"][name]:
                return f"{name} changed since the snapshot was taken"
        if sha256_file(directory / "state") != meta["state_sha256"]:
            return "device state digest mismatch"
    except (OSError, KeyError):
        return "artifact missing"
    return None


def snapshot_for_launch(spec: LaunchSpec, progress: ProgressFn = no_progress) -> SnapshotRef | None:
    """The snapshot to restore this launch from, taking it first if needed.

    Returns None (cold boot) when snapshots are off (``PYRO_SNAPSHOTS=0``).
    """
    if not snapshots_enabled():
        return None
    key = snapshot_key(spec)
    root = snapshots_root()
    directory = root / key[:24]
    if check_snapshot(directory, key) is None:
        return SnapshotRef(directory, key)
    paths.ensure_private_dir(root)
    with FileLock(str(root / f".{key[:24]}.lock")):
        problem = check_snapshot(directory, key)
        if problem is None:
            return SnapshotRef(directory, key)
        if directory.exists():
            shutil.rmtree(directory, ignore_errors=True)
        take_snapshot(spec, directory, key, progress)
    return SnapshotRef(directory, key)


def take_snapshot(spec: LaunchSpec, directory: Path, key: str, progress: ProgressFn) -> None:
    from pyro_mcp.guest.channel import AgentChannel
    from pyro_mcp.vmm.qemu import QemuBackend

    tmp = directory.parent / f".tmp-{secrets.token_hex(4)}"
    tmp.mkdir(mode=0o700)
    vm_paths = VMPaths(tmp / "vm")
    progress(
        ProgressEvent("snapshot", "booting a clean guest to snapshot (once per configuration)")
    )
    started = time.monotonic()
    handle = None
    try:
        handle = QemuBackend().start(spec, vm_paths, snapshot_source=tmp, timeout=90)
        channel = AgentChannel(handle)
        try:
            channel.wait_hello(timeout=90)
        except PyroError as exc:
            exc.details.setdefault("console_tail", handle.console_tail())
            raise
        _warm_up(channel)
        handle.save_snapshot(tmp)
        handle.kill()
        handle = None
        os.replace(vm_paths.disk, tmp / "disk.qcow2")
        shutil.rmtree(vm_paths.vm_dir, ignore_errors=True)
        for name in ARTIFACTS:
            (tmp / name).chmod(0o400)
        digests = {name: sha256_file(tmp / name) for name in ARTIFACTS}
        meta: dict[str, Any] = {
            "format": SNAPSHOT_FORMAT,
            "key": key,
            "created_at": time.time(),
            "boot_seconds": round(time.monotonic() - started, 3),
            "mem_mib": spec.mem_mib,
            "vcpu_count": spec.vcpu_count,
            "rootfs": str(spec.rootfs),
            "sha256": digests,
            "state_sha256": digests["state"],
            "fingerprints": {name: _fingerprint(tmp / name) for name in ARTIFACTS},
            "inputs": {
                str(path): _fingerprint(path)
                for path in (spec.kernel, spec.initramfs, spec.rootfs)
                if path is not None
            },
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        os.rename(tmp, directory)
    except BaseException as exc:
        if handle is not None:
            handle.kill()
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, PyroError | KeyboardInterrupt):
            raise
        raise BootError(f"taking the warm-start snapshot failed: {exc!r}") from exc
    progress(ProgressEvent("snapshot", "snapshot saved"))


WARM_UP_COMMANDS: tuple[tuple[str, ...], ...] = (("true",), ("sh", "-lc", "true"))


def _warm_up(channel: AgentChannel) -> None:
    """Run a few read-only commands before saving, so the binaries, libc and the login
    profile that a first command needs are already in the snapshot's page cache."""
    from pyro_mcp.guest import protocol as p

    env = (f"PATH={BASE_ENV['PATH']}", f"HOME={BASE_ENV['HOME']}")
    for argv in WARM_UP_COMMANDS:
        request_id, q = channel.open()
        try:
            channel.send(request_id, p.Exec(argv, "/", env, 30_000, 4096, 4096))
            while True:
                item = q.get(timeout=60)
                if isinstance(item, p.Exit | p.Error) or not isinstance(item, p.Output):
                    break
        finally:
            channel.close_request(request_id)


def _snapshot_rootfs(meta: dict[str, Any]) -> str | None:
    """The root image a snapshot was taken of: recorded as ``rootfs``; in older
    snapshots the last of the ``inputs`` (kernel, initramfs, rootfs)."""
    rootfs = meta.get("rootfs")
    if isinstance(rootfs, str):
        return rootfs
    inputs = meta.get("inputs")
    return list(inputs)[-1] if isinstance(inputs, dict) and inputs else None


def list_snapshots() -> list[dict[str, Any]]:
    """Every snapshot in the cache: id, path, disk_bytes, rootfs (the root image it
    was taken of), created_at (ISO 8601 UTC), mem_mib, vcpu_count, boot_seconds."""
    out = []
    root = snapshots_root()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for d in sorted(root.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            try:
                meta = json.loads((d / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {}
            size = sum(f.stat().st_blocks * 512 for f in d.iterdir() if f.is_file())
            created = meta.get("created_at")
            out.append(
                {
                    "id": d.name,
                    "path": str(d),
                    "disk_bytes": size,
                    "rootfs": _snapshot_rootfs(meta),
                    "created_at": iso_utc(created) if isinstance(created, int | float) else None,
                    **{k: meta.get(k) for k in ("mem_mib", "vcpu_count", "boot_seconds")},
                }
            )
    return out


def prune_snapshots() -> list[str]:
    """Remove snapshots whose inputs (kernel, initramfs, root image) changed or vanished,
    damaged ones, and leftovers of interrupted snapshot runs."""
    removed = []
    root = snapshots_root()
    with contextlib.suppress(FileNotFoundError):
        for d in sorted(root.iterdir()):
            if not d.is_dir():
                continue
            stale = d.name.startswith(".tmp-")
            if not stale:
                try:
                    meta = json.loads((d / "meta.json").read_text())
                    stale = any(
                        not Path(p).exists() or _fingerprint(Path(p)) != fp
                        for p, fp in meta["inputs"].items()
                    )
                except (OSError, ValueError, KeyError):
                    stale = True
            if stale:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(str(d))
    return removed
