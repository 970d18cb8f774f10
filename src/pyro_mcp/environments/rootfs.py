"""Build a guest root filesystem image for an :class:`EnvironmentSpec`.

Steps (each reported as a :class:`ProgressEvent`):

1. ``rootfs``: ``mmdebstrap --variant=minbase`` (``debootstrap --variant=minbase``
   when mmdebstrap is missing) of the spec's suite plus its packages, from the
   Debian mirror the host's apt is configured with (``/etc/apt/sources.list``,
   ``sources.list.d/*.list`` and deb822 ``*.sources``; ``PYRO_DEBIAN_MIRROR``
   overrides). Docs, man pages and locales are never unpacked (a dpkg
   ``path-exclude`` config that stays in the guest, so later ``apt-get install``
   keeps them out too); apt lists, caches and logs are removed.
2. ``rootfs``: guest settings: ``/etc/hostname``, ``/etc/hosts``, a placeholder
   ``/etc/resolv.conf``, an empty ``/etc/machine-id``, ``/workspace``, bash as
   root's shell.
3. ``image``: ``mkfs.ext4 -d TREE -L pyro-root`` into a sparse image holding the
   tree plus ``spec.disk_free_mib`` of free space (the guest's disk limit),
   then ``e2fsck -fn``.

Bootstrapping needs root (chroot, device nodes, file ownership). The image
itself needs no loop mount.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyro_mcp.environments.apt import debian_mirror_lines, redact_credentials
from pyro_mcp.environments.catalog import EnvironmentSpec
from pyro_mcp.environments.tools import (
    is_root,
    remove_tree,
    run_tool,
    stream_tool,
    tool_version,
)
from pyro_mcp.errors import EnvironmentBuildError
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress

IMAGE_LABEL = "pyro-root"
GUEST_HOSTNAME = "pyro"
_MIB = 1024 * 1024

#: dpkg configuration that keeps documentation out of the guest (copyright files stay).
DPKG_EXCLUDES: tuple[str, ...] = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/doc-base/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
)

#: mmdebstrap's "I:" lines, in the order it prints them: progress steps.
_MMDEBSTRAP_STEPS = (
    "running apt-get update",
    "downloading packages",
    "extracting archives",
    "installing essential packages",
    "installing remaining packages",
    "cleaning package lists",
)


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class RootfsBuildInfo:
    """How an image was built; stored in the environment's manifest."""

    tool: str
    tool_version: str
    suite: str
    mirrors: tuple[str, ...]
    packages: tuple[str, ...]
    installed_packages: int
    tree_bytes: int  # allocated bytes of the unpacked tree
    tree_files: int
    image_bytes: int  # apparent size of the image = the guest's disk size
    image_allocated_bytes: int  # what the sparse image really takes on the host
    free_bytes: int  # free space inside the image (the guest's disk limit)
    inodes: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------- helpers


def sudo_hint(spec: EnvironmentSpec, cache_root: Path | None = None) -> str:
    if cache_root is None:
        return f"run `sudo pyro env pull {spec.name}`"
    return f"run `sudo env PYRO_CACHE_DIR={cache_root} pyro env pull {spec.name}`"


def require_root(spec: EnvironmentSpec, cache_root: Path | None = None) -> None:
    """Raise EnvironmentBuildError (with the command to run) unless we are root."""
    if not is_root():
        raise EnvironmentBuildError(
            f"building environment {spec.name} needs root (mmdebstrap/debootstrap "
            "create device nodes and chroot)",
            hint=sudo_hint(spec, cache_root),
        )


def pick_bootstrapper() -> str:
    """``mmdebstrap`` (faster: one apt run) when installed, else ``debootstrap``."""
    for tool in ("mmdebstrap", "debootstrap"):
        if shutil.which(tool):
            return tool
    raise EnvironmentBuildError(
        "neither mmdebstrap nor debootstrap is installed",
        hint="apt-get install mmdebstrap (or debootstrap)",
        details={"missing_tool": "mmdebstrap"},
    )


def _stream(
    argv: Sequence[str], what: str, progress: ProgressFn, steps: Sequence[str] = ()
) -> None:
    stream_tool(
        argv,
        what=what,
        progress=progress,
        stage="rootfs",
        steps=steps,
        hint="see details.output_tail; check that the Debian mirror is reachable",
    )


# --------------------------------------------------------------------------- stages


def bootstrap(
    spec: EnvironmentSpec,
    tree: Path,
    mirrors: Sequence[str],
    progress: ProgressFn = no_progress,
    tool: str | None = None,
) -> str:
    """Install ``spec``'s suite + packages into the (absent or empty) folder ``tree``."""
    tool = tool or pick_bootstrapper()
    includes = ",".join(spec.packages)
    if tool == "mmdebstrap":
        argv = [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            "--format=directory",
            '--aptopt=Acquire::Languages "none"',
            *(f"--dpkgopt={opt}" for opt in DPKG_EXCLUDES),
        ]
        if includes:
            argv.append(f"--include={includes}")
        argv += [spec.suite, str(tree), *mirrors]
        progress(ProgressEvent("rootfs", f"mmdebstrap {spec.suite} ({spec.name})"))
        _stream(argv, f"bootstrap {spec.name}", progress, _MMDEBSTRAP_STEPS)
    elif tool == "debootstrap":
        # debootstrap takes one mirror: the main suite's (no -updates/-security).
        uri = mirrors[0].split()[-3] if mirrors else ""
        argv = ["debootstrap", "--variant=minbase"]
        if includes:
            argv.append(f"--include={includes}")
        argv += [spec.suite, str(tree), uri]
        progress(ProgressEvent("rootfs", f"debootstrap {spec.suite} ({spec.name})"))
        _stream(argv, f"bootstrap {spec.name}", progress)
        cfg = tree / "etc" / "dpkg" / "dpkg.cfg.d" / "01-pyro-nodoc"
        cfg.write_text("\n".join(DPKG_EXCLUDES) + "\n")
        (tree / "etc" / "apt" / "sources.list").write_text("\n".join(mirrors) + "\n")
    else:
        raise EnvironmentBuildError(f"unknown bootstrapper {tool!r}")
    return tool


def _glob_remove(tree: Path, patterns: Iterable[str], keep: Iterable[str] = ()) -> None:
    keep_set = {tree / k for k in keep}
    for pattern in patterns:
        for path in tree.glob(pattern):
            if path in keep_set or any(k.is_relative_to(path) for k in keep_set):
                continue
            if path.is_dir() and not path.is_symlink():
                remove_tree(path)
            else:
                path.unlink(missing_ok=True)


def trim(tree: Path) -> None:
    """Drop what a disposable guest never reads: docs, locales, apt lists, caches, logs."""
    _glob_remove(
        tree,
        [
            "usr/share/man/*",
            "usr/share/info/*",
            "usr/share/doc-base/*",
            "usr/share/lintian/*",
            "usr/share/linda/*",
            "var/lib/apt/lists/*",
            "var/cache/apt/*.bin",
            "var/cache/apt/archives/*.deb",
            "var/cache/apt/archives/partial/*",
            "var/cache/debconf/*-old",
            "var/lib/dpkg/*-old",
            "var/log/*.log",
            "var/log/apt/*",
            "var/log/bootstrap.log",
            "tmp/*",
            "var/tmp/*",
        ],
        keep=["var/lib/apt/lists/partial", "var/lib/apt/lists/lock"],
    )
    locale = tree / "usr/share/locale"
    if locale.is_dir():
        _glob_remove(tree, ["usr/share/locale/*"], keep=["usr/share/locale/locale.alias"])
    doc = tree / "usr/share/doc"
    if doc.is_dir():
        for path in doc.rglob("*"):
            if path.is_file() and path.name != "copyright":
                path.unlink()
        for path in sorted(doc.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not path.is_symlink() and not any(path.iterdir()):
                path.rmdir()


def configure_guest(tree: Path) -> None:
    """Guest settings every environment shares."""
    etc = tree / "etc"
    (etc / "hostname").write_text(f"{GUEST_HOSTNAME}\n")
    (etc / "hosts").write_text(
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{GUEST_HOSTNAME}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    resolv = etc / "resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    resolv.write_text("# pyro-mcp: written at boot when the VM has networking\n")
    resolv.chmod(0o644)
    machine_id = etc / "machine-id"
    machine_id.unlink(missing_ok=True)
    machine_id.touch(mode=0o444)
    (tree / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    workspace = tree / "workspace"
    workspace.mkdir(exist_ok=True)
    workspace.chmod(0o755)
    passwd = etc / "passwd"
    if passwd.is_file() and (tree / "bin/bash").exists():
        lines = passwd.read_text().splitlines()
        for i, line in enumerate(lines):
            fields = line.split(":")
            if fields[0] == "root" and len(fields) == 7:
                fields[6] = "/bin/bash"
                lines[i] = ":".join(fields)
        passwd.write_text("\n".join(lines) + "\n")


def _tree_usage(tree: Path) -> tuple[int, int]:
    """(allocated bytes, number of inodes) of ``tree``; hard links counted once."""
    seen: set[int] = set()
    total = 0
    count = 0
    for dirpath, dirnames, filenames in os.walk(tree):
        for name in (*dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
            count += 1
            total += st.st_blocks * 512
    return total, count + 1


def _count_installed(tree: Path) -> int:
    status = tree / "var/lib/dpkg/status"
    try:
        return status.read_text(errors="replace").count("Status: install ok installed")
    except OSError:
        return 0


def _free_bytes(image: Path) -> tuple[int, int]:
    """(free bytes, inode count) from the image's superblock."""
    out = run_tool(["dumpe2fs", "-h", str(image)], what="read the image superblock").stdout
    fields: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return (
        int(fields["Free blocks"]) * int(fields["Block size"]),
        int(fields["Inode count"]),
    )


@dataclass(frozen=True)
class ImageStats:
    tree_bytes: int
    tree_files: int
    free_bytes: int
    inodes: int


def make_image(tree: Path, image: Path, disk_free_mib: int) -> ImageStats:
    """``mkfs.ext4 -d tree`` into a sparse image with ``disk_free_mib`` free; fsck it."""
    used, files = _tree_usage(tree)
    free_target = disk_free_mib * _MIB
    inodes = files + max(disk_free_mib * 64, 16384)  # one spare inode per 16 KiB free
    journal_mib = 16
    # Tree (+10 % for ext4's own directory/extent blocks) + free space (+1 % for
    # bitmaps and group descriptors) + inode tables (256 B each) + journal + slack.
    size = int(used * 1.10 + free_target * 1.01) + inodes * 256 + (journal_mib + 8) * _MIB
    size = -(-size // _MIB) * _MIB
    image.unlink(missing_ok=True)
    mkfs = [
        "mkfs.ext4", "-q", "-F", "-L", IMAGE_LABEL, "-d", str(tree), "-b", "4096",
        "-m", "0", "-N", str(inodes), "-J", f"size={journal_mib}",
        # Zero inode tables and journal now (sparse on the host) so the guest
        # kernel runs no lazy-init thread that writes into every VM's overlay.
        "-E", "lazy_itable_init=0,lazy_journal_init=0",
        str(image), f"{size // 1024}k",
    ]  # fmt: skip
    run_tool(mkfs, what="create the ext4 image", hint="apt-get install e2fsprogs")
    free, inode_count = _free_bytes(image)
    if free < free_target:
        size += -(-(free_target - free + 8 * _MIB) // _MIB) * _MIB
        run_tool(["resize2fs", "-f", str(image), f"{size // 1024}K"], what="grow the image")
        free, inode_count = _free_bytes(image)
    run_tool(["e2fsck", "-fn", str(image)], what="check the new image")
    return ImageStats(tree_bytes=used, tree_files=files, free_bytes=free, inodes=inode_count)


# --------------------------------------------------------------------------- entry point


def build_rootfs_image(
    spec: EnvironmentSpec,
    image: Path,
    progress: ProgressFn = no_progress,
    *,
    workdir: Path | None = None,
    tool: str | None = None,
    cache_root: Path | None = None,
) -> RootfsBuildInfo:
    """Build ``spec`` into the ext4 image ``image``; return how it went.

    ``workdir`` (default: the image's folder) holds the unpacked tree while
    building; it must be on a filesystem with room for it (a few hundred MB).
    ``cache_root`` only shapes the hint when not root.
    """
    require_root(spec, cache_root)
    for needed in ("mkfs.ext4", "e2fsck", "dumpe2fs"):
        if shutil.which(needed) is None:
            raise EnvironmentBuildError(
                f"{needed} is not installed", hint="apt-get install e2fsprogs"
            )
    tool = tool or pick_bootstrapper()
    mirrors = debian_mirror_lines(spec.suite)
    work = workdir or image.parent
    tree = work / f".tree-{spec.slug}-{os.getpid()}"
    stages: dict[str, float] = {}
    started = time.monotonic()
    try:
        remove_tree(tree)
        bootstrap(spec, tree, mirrors, progress, tool)
        stages["bootstrap"] = time.monotonic() - started

        mark = time.monotonic()
        progress(ProgressEvent("rootfs", "trimming docs, locales, apt lists and caches"))
        trim(tree)
        configure_guest(tree)
        installed = _count_installed(tree)
        stages["customize"] = time.monotonic() - mark

        mark = time.monotonic()
        progress(ProgressEvent("image", f"mkfs.ext4 ({spec.disk_free_mib} MiB free)"))
        stats = make_image(tree, image, spec.disk_free_mib)
        stages["image"] = time.monotonic() - mark
    finally:
        remove_tree(tree)
    st = image.stat()
    return RootfsBuildInfo(
        tool=tool,
        tool_version=tool_version(tool),
        suite=spec.suite,
        mirrors=tuple(redact_credentials(m) for m in mirrors),
        packages=spec.packages,
        installed_packages=installed,
        tree_bytes=stats.tree_bytes,
        tree_files=stats.tree_files,
        image_bytes=st.st_size,
        image_allocated_bytes=st.st_blocks * 512,
        free_bytes=stats.free_bytes,
        inodes=stats.inodes,
        seconds=round(time.monotonic() - started, 2),
        stage_seconds={k: round(v, 2) for k, v in stages.items()},
    )


__all__ = [
    "ImageStats",
    "RootfsBuildInfo",
    "bootstrap",
    "build_rootfs_image",
    "configure_guest",
    "make_image",
    "require_root",
    "trim",
]
