"""The guest kernel: Debian's ``linux-image-cloud-amd64``, unpacked, not built.

Fetching it takes seconds (``apt-get download`` + ``dpkg-deb -x``) where a
custom minimal kernel takes minutes to compile. The package's kernel needs its
virtio drivers as modules, so besides the image we keep exactly the modules a
guest loads from its initramfs, in load order (dependencies first):

* :data:`BASE_MODULES` (console channel, disk) -> :attr:`KernelArtifact.modules`
* :data:`NET_MODULES` (optional networking) -> :attr:`KernelArtifact.modules_net`,
  only the ones not already in ``modules``.

Anything the kernel has built in (``modules.builtin``; ext4 is) is skipped.
Dependencies come from ``modules.dep`` when the package ships one, else from
each module's own ``.modinfo`` ``depends=`` field (the Debian package leaves
``modules.dep`` to ``depmod`` at install time, and ``kmod`` need not be present).

This module only fetches and unpacks; caching, locking and verification live in
:mod:`pyro_mcp.environments.kernel_cache` (``KernelCache(root).ensure()`` is the
entry point).
"""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pyro_mcp.environments.tools import is_root, run_tool, tail_lines
from pyro_mcp.errors import EnvironmentBuildError
from pyro_mcp.fsio import write_bytes_atomic
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress

KERNEL_META_PACKAGE = "linux-image-cloud-amd64"
#: Loaded by every guest: the virtio-mmio transport, the agent channel, the disk
#: and the root filesystem (ext4, normally built in).
BASE_MODULES: tuple[str, ...] = ("virtio_mmio", "virtio_console", "virtio_blk", "ext4")
#: Loaded only when networking is enabled.
NET_MODULES: tuple[str, ...] = ("virtio_net",)


@dataclass(frozen=True)
class KernelArtifact:
    """An installed guest kernel. Treat every file as read-only."""

    release: str  # e.g. "6.1.0-56-cloud-amd64"
    package_version: str  # Debian version of the linux-image-<release> package
    image: Path  # the bzImage ("vmlinuz"); QEMU's -kernel takes it as is
    modules: tuple[Path, ...]  # load order, dependencies first
    modules_net: tuple[Path, ...]  # load after ``modules`` to enable virtio-net
    digest: str  # sha256 over the image's and the modules' sha256 (see kernel_digest)
    path: Path  # the kernel's folder: cache_dir()/kernels/<release>
    config: Path | None = None  # the kernel's build configuration, when shipped


@dataclass(frozen=True)
class KernelBuild:
    """What :func:`fetch_kernel` put into its output folder (paths relative to it)."""

    release: str
    package: str
    package_version: str
    image: str
    config: str | None
    modules: tuple[str, ...]
    modules_net: tuple[str, ...]


# --------------------------------------------------------------------------- apt


def _apt_update(progress: ProgressFn) -> None:
    progress(ProgressEvent("kernel", "apt-get update (package lists missing or stale)"))
    run_tool(["apt-get", "update", "-qq"], what="update the apt package lists")


def resolve_kernel_package(meta_package: str = KERNEL_META_PACKAGE) -> str:
    """The versioned package the meta package depends on (``linux-image-<release>``)."""
    proc = run_tool(
        ["apt-cache", "depends", "--important", meta_package],
        what=f"resolve {meta_package}",
        hint="run `sudo apt-get update` (pyro needs Debian's package lists for the kernel)",
    )
    for line in proc.stdout.splitlines():
        key, _, value = line.strip().partition(":")
        value = value.strip().lstrip("|").strip()
        if key.endswith("Depends") and value.startswith("linux-image-"):
            return value
    raise EnvironmentBuildError(
        f"cannot resolve {meta_package}: it depends on no linux-image-<release> package",
        hint="run `sudo apt-get update`",
        details={"output_tail": tail_lines(proc.stdout)},
    )


def _download(package: str, dest: Path) -> Path:
    argv = ["apt-get", "download", "-q"]
    if is_root():
        # apt's _apt sandbox user cannot enter a private cache folder; as root it
        # would fall back to root with a warning anyway.
        argv += ["-o", "APT::Sandbox::User=root"]
    run_tool([*argv, package], what=f"download {package}", cwd=dest)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if len(debs) != 1:
        raise EnvironmentBuildError(f"apt-get download {package} left no single .deb in {dest}")
    return debs[0]


def download_kernel_package(dest: Path, progress: ProgressFn = no_progress) -> Path:
    """Resolve and download the kernel package into ``dest``; return the .deb.

    When the package lists are missing or stale (the resolved version is gone
    from the mirror) and we are root, ``apt-get update`` runs and the download is
    retried once; when not root the error names the command to run.
    """
    for attempt in (1, 2):
        try:
            package = resolve_kernel_package()
            progress(ProgressEvent("kernel", f"downloading {package}"))
            return _download(package, dest)
        except EnvironmentBuildError as exc:
            if "missing_tool" in exc.details:
                raise
            if attempt == 1 and is_root():
                _apt_update(progress)
                continue
            if not is_root():
                raise EnvironmentBuildError(
                    exc.message,
                    hint="run `sudo apt-get update`, then retry",
                    details=exc.details,
                ) from exc
            raise
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- modules


def read_modinfo(module: Path) -> dict[str, str]:
    """The ``.modinfo`` section of a kernel module (ELF64 little-endian) as a dict."""
    data = _read_module_bytes(module)
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise EnvironmentBuildError(f"{module} is not an ELF64 little-endian module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [
        struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)
    ]
    names_offset = sections[shstrndx][4]
    for sh_name, _type, _flags, _addr, offset, size, *_ in sections:
        start = names_offset + sh_name
        if data[start : data.index(b"\0", start)] == b".modinfo":
            fields: dict[str, str] = {}
            for item in data[offset : offset + size].split(b"\0"):
                key, sep, value = item.decode("utf-8", "replace").partition("=")
                if sep and key not in fields:
                    fields[key] = value
            return fields
    return {}


def _read_module_bytes(module: Path) -> bytes:
    if module.name.endswith(".ko.xz"):
        return lzma.decompress(module.read_bytes())
    return module.read_bytes()


def module_name(path: str | Path) -> str:
    """``kernel/drivers/char/virtio_console.ko`` -> ``virtio_console`` (``-`` -> ``_``)."""
    name = Path(path).name
    for suffix in (".ko.xz", ".ko.zst", ".ko.gz", ".ko"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name.replace("-", "_")


def module_load_order(
    wanted: Sequence[str],
    *,
    available: Mapping[str, Path],
    depends: Callable[[str], Sequence[str]],
    builtin: set[str] | frozenset[str] = frozenset(),
    skip: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Modules to load for ``wanted``, dependencies first; built-ins and ``skip`` left out."""
    order: list[str] = []
    done: set[str] = set(skip) | set(builtin)

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in done:
            return
        if name in chain:
            raise EnvironmentBuildError(f"module dependency cycle: {' -> '.join((*chain, name))}")
        if name not in available:
            raise EnvironmentBuildError(
                f"kernel module {name} (needed for {chain[0] if chain else name}) "
                "is neither built in nor shipped by the kernel package"
            )
        for dep in depends(name):
            visit(dep, (*chain, name))
        done.add(name)
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


@dataclass(frozen=True)
class _ModuleTree:
    available: dict[str, Path]
    builtin: frozenset[str]
    deps: dict[str, tuple[str, ...]] | None  # from modules.dep, when present

    def depends(self, name: str) -> tuple[str, ...]:
        if self.deps is not None:
            return self.deps.get(name, ())
        raw = read_modinfo(self.available[name]).get("depends", "")
        return tuple(module_name(d) for d in raw.split(",") if d)


def _scan_modules(moddir: Path) -> _ModuleTree:
    available: dict[str, Path] = {}
    for path in sorted(moddir.rglob("*.ko*")):
        if path.is_file():
            available.setdefault(module_name(path), path)
    builtin_file = moddir / "modules.builtin"
    builtin = frozenset(module_name(line) for line in _read_lines(builtin_file) if line.strip())
    deps: dict[str, tuple[str, ...]] | None = None
    dep_file = moddir / "modules.dep"
    if dep_file.exists():
        deps = {}
        for line in _read_lines(dep_file):
            head, sep, rest = line.partition(":")
            if sep:
                deps[module_name(head)] = tuple(module_name(d) for d in rest.split())
    return _ModuleTree(available=available, builtin=builtin, deps=deps)


def _read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []


# --------------------------------------------------------------------------- unpack


def unpack_kernel_package(deb: Path, workdir: Path, out_dir: Path) -> KernelBuild:
    """Unpack ``deb`` in ``workdir``; copy the image, config and needed modules to ``out_dir``."""
    fields = run_tool(
        ["dpkg-deb", "--field", str(deb), "Package", "Version"],
        what=f"read {deb.name}",
        hint="install dpkg",
    ).stdout
    info = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in fields.splitlines())
    )
    tree = workdir / "pkg"
    run_tool(["dpkg-deb", "-x", str(deb), str(tree)], what=f"unpack {deb.name}")
    release_dirs = [p for p in (tree / "lib" / "modules").glob("*") if p.is_dir()]
    if len(release_dirs) != 1:
        raise EnvironmentBuildError(f"{deb.name} does not hold exactly one lib/modules/<release>")
    moddir = release_dirs[0]
    release = moddir.name
    image_src = tree / "boot" / f"vmlinuz-{release}"
    if not image_src.is_file():
        raise EnvironmentBuildError(f"{deb.name} holds no boot/vmlinuz-{release}")

    modtree = _scan_modules(moddir)
    base = module_load_order(
        BASE_MODULES, available=modtree.available, depends=modtree.depends, builtin=modtree.builtin
    )
    net = module_load_order(
        NET_MODULES,
        available=modtree.available,
        depends=modtree.depends,
        builtin=modtree.builtin,
        skip=set(base),
    )
    for name in (*base, *net):
        vermagic = read_modinfo(modtree.available[name]).get("vermagic", "")
        if vermagic.split(" ", 1)[0] != release:
            raise EnvironmentBuildError(
                f"module {name} was built for {vermagic.split(' ', 1)[0]!r}, not {release!r}"
            )

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "modules").mkdir(exist_ok=True)
    shutil.copyfile(image_src, out_dir / "vmlinuz")
    config: str | None = None
    config_src = tree / "boot" / f"config-{release}"
    if config_src.is_file():
        shutil.copyfile(config_src, out_dir / "config")
        config = "config"

    def copy_module(name: str) -> str:
        rel = f"modules/{name}.ko"
        (out_dir / rel).write_bytes(_read_module_bytes(modtree.available[name]))
        return rel

    return KernelBuild(
        release=release,
        package=info.get("Package", f"linux-image-{release}"),
        package_version=info.get("Version", "unknown"),
        image="vmlinuz",
        config=config,
        modules=tuple(copy_module(n) for n in base),
        modules_net=tuple(copy_module(n) for n in net),
    )


def fetch_kernel(out_dir: Path, progress: ProgressFn = no_progress) -> KernelBuild:
    """Download and unpack the guest kernel into ``out_dir`` (no caching, no locking)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".kernel-work-", dir=out_dir.parent) as tmp:
        work = Path(tmp)
        download_dir = work / "download"
        download_dir.mkdir()
        deb = download_kernel_package(download_dir, progress)
        progress(ProgressEvent("kernel", f"unpacking {deb.name}"))
        return unpack_kernel_package(deb, work, out_dir)


# --------------------------------------------------------------------------- vmlinux

_COMPRESSORS: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b\x08", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
)


def extract_vmlinux(image: Path, dest: Path) -> Path:
    """Write the uncompressed ELF kernel inside bzImage ``image`` to ``dest``.

    Only needed by VMMs that want an ELF ``vmlinux`` (Firecracker); QEMU boots the
    bzImage. Uses the boot header's payload offset (boot protocol >= 2.08).
    Decompresses gzip/xz in Python and lz4/zstd with the ``lz4``/``zstd`` tools.
    """
    data = image.read_bytes()
    if data[0x202:0x206] != b"HdrS":
        raise EnvironmentBuildError(f"{image} is not a bzImage")
    (protocol,) = struct.unpack_from("<H", data, 0x206)
    if protocol < 0x208:
        raise EnvironmentBuildError(f"{image}: boot protocol {protocol:#x} is too old")
    setup_sects = data[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", data, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = data[start : start + payload_length]
    kind = next((k for magic, k in _COMPRESSORS if payload.startswith(magic)), None)
    if kind is None:
        raise EnvironmentBuildError(f"{image}: unknown kernel compression")
    if kind == "gzip":
        import zlib

        elf = zlib.decompressobj(wbits=31).decompress(payload)
    elif kind == "xz":
        elf = lzma.LZMADecompressor().decompress(payload)
    else:
        # The payload ends with the 4-byte uncompressed size, which the tools
        # report as trailing garbage (exit status 1) after writing everything.
        tool = "lz4" if kind == "lz4" else "zstd"
        try:
            proc = subprocess.run([tool, "-dc"], input=payload, capture_output=True, check=False)
        except FileNotFoundError:
            raise EnvironmentBuildError(
                f"cannot extract vmlinux: {tool} is not installed", hint=f"apt-get install {tool}"
            ) from None
        elf = proc.stdout
    _check_elf(elf, image)
    write_bytes_atomic(dest, elf)
    return dest


def _check_elf(elf: bytes, source: Path) -> None:
    if elf[:4] != b"\x7fELF" or len(elf) < 64:
        raise EnvironmentBuildError(f"{source}: decompressed kernel is not an ELF file")
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        _type, _flags, offset, _va, _pa, filesz, *_ = struct.unpack_from(
            "<IIQQQQQQ", elf, phoff + i * phentsize
        )
        if offset + filesz > len(elf):
            raise EnvironmentBuildError(f"{source}: decompressed kernel is truncated")
