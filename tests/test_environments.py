"""Environments: catalog, apt sources, kernel modules, manifests, the store.

Fast tests use a fake rootfs builder and a fake kernel; the ``vm``-marked tests
build the real ``debian:12-base`` once per session (root + mmdebstrap/debootstrap).
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import multiprocessing
import os
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from filelock import FileLock

import pyro_mcp.environments as package
from pyro_mcp.environments import kernel as kernel_mod
from pyro_mcp.environments import rootfs as rootfs_mod
from pyro_mcp.environments.apt import (
    debian_mirror_lines,
    parse_deb822_sources,
    parse_one_line_sources,
    read_apt_sources,
)
from pyro_mcp.environments.catalog import CATALOG, EnvironmentSpec, get_spec, validate_name
from pyro_mcp.environments.integrity import check_files, hash_files
from pyro_mcp.environments.kernel import (
    KernelArtifact,
    KernelBuild,
    extract_vmlinux,
    module_load_order,
    read_modinfo,
)
from pyro_mcp.environments.kernel_cache import KernelCache, KernelFetcher
from pyro_mcp.environments.store import EnvironmentStore, KernelProvider
from pyro_mcp.errors import EnvironmentBuildError, InvalidInputError, NotFoundError
from pyro_mcp.fsio import sha256_file
from pyro_mcp.progress import ProgressEvent

BASE = "debian:12-base"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("PYRO_CACHE_DIR", str(root))
    return root


def fake_kernel_factory(root: Path) -> KernelProvider:
    folder = root / "fake-kernel"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vmlinuz").write_bytes(b"kernel")
    (folder / "m.ko").write_bytes(b"module")
    artifact = KernelArtifact(
        release="6.1.0-0-fake",
        package_version="0",
        image=folder / "vmlinuz",
        modules=(folder / "m.ko",),
        modules_net=(),
        digest="0" * 64,
        path=folder,
    )

    def provide(progress: Any, refresh: bool) -> KernelArtifact:
        return artifact

    return provide


def fake_builder(
    spec: EnvironmentSpec, image: Path, progress: Any, *, log: Path | None = None, delay: float = 0
) -> Mapping[str, Any]:
    if delay:
        time.sleep(delay)
    if log is not None:
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()} {spec.name}\n")
    progress(ProgressEvent("rootfs", f"fake build of {spec.name}"))
    image.write_bytes(b"rootfs:" + spec.name.encode() + os.urandom(4096))
    return {"tool": "fake"}


class Recorder:
    def __init__(self) -> None:
        self.events: list[ProgressEvent] = []

    def __call__(self, event: ProgressEvent) -> None:
        self.events.append(event)

    def messages(self) -> list[str]:
        return [e.message for e in self.events]


def make_store(root: Path, log: Path | None = None, delay: float = 0) -> EnvironmentStore:
    def builder(spec: EnvironmentSpec, image: Path, progress: Any) -> Mapping[str, Any]:
        return fake_builder(spec, image, progress, log=log, delay=delay)

    return EnvironmentStore(root, builder=builder, kernel_provider=fake_kernel_factory(root))


def builds(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


# --------------------------------------------------------------------------- catalog


def test_catalog_entries() -> None:
    assert set(CATALOG) == {"debian:12", "debian:12-base", "debian:12-build"}
    for name, spec in CATALOG.items():
        assert spec.name == name
        assert spec.version.count(".") == 2
        assert isinstance(spec.packages, tuple)
        assert spec.disk_free_mib >= 1024
        assert "/" not in spec.install_dirname
    assert CATALOG[BASE].packages == ()
    assert {"bash", "git", "python3", "curl", "ca-certificates"} <= set(
        CATALOG["debian:12"].packages
    )
    build = set(CATALOG["debian:12-build"].packages)
    assert set(CATALOG["debian:12"].packages) <= build
    assert {"build-essential", "make", "pkg-config"} <= build
    assert get_spec("debian:12").install_dirname == "debian%3A12@1.0.0"


@pytest.mark.parametrize(
    "name",
    ["", "debian", "debian/12", "../etc:x", "Debian:12", "debian:12 ", "debian::12", "debian:.",
     "debian:12/../x", "debian:" + "1" * 80, ":12", "debian:12-"],
)  # fmt: skip
def test_malformed_names_rejected(name: str) -> None:
    with pytest.raises(InvalidInputError):
        get_spec(name)


def test_unknown_name_lists_valid_ones() -> None:
    validate_name("ubuntu:24.04")
    with pytest.raises(NotFoundError) as info:
        get_spec("ubuntu:24.04")
    assert info.value.hint is not None
    for name in CATALOG:
        assert name in info.value.hint
    assert info.value.code == "not_found"


# --------------------------------------------------------------------------- apt sources


def test_parse_one_line_sources() -> None:
    text = """
# comment
deb [arch=amd64 signed-by=/k.gpg] http://m.example/debian bookworm main contrib # tail
deb-src http://m.example/debian bookworm main
deb http://m.example/debian-security bookworm-security main
"""
    sources = parse_one_line_sources(text, "x.list")
    assert [s.uri for s in sources] == [
        "http://m.example/debian",
        "http://m.example/debian-security",
    ]
    assert sources[0].signed_by == "/k.gpg"
    assert sources[0].components == ("main", "contrib")


def test_parse_deb822_sources() -> None:
    text = """Types: deb deb-src
# a comment
URIs: http://a.example/debian http://b.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://off.example/debian
Suites: bookworm
Components: main
Enabled: no

Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main
"""
    sources = parse_deb822_sources(text)
    assert [s.uri for s in sources] == ["http://a.example/debian", "http://b.example/debian"]
    assert sources[0].suites == ("bookworm", "bookworm-updates")
    assert sources[0].signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"


def test_read_apt_sources_and_mirror_lines(tmp_path: Path) -> None:
    apt = tmp_path / "apt"
    (apt / "sources.list.d").mkdir(parents=True)
    (apt / "sources.list").write_text("deb http://one.example/debian bookworm main\n")
    (apt / "sources.list.d" / "sec.sources").write_text(
        "Types: deb\nURIs: http://sec.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main non-free-firmware\n"
    )
    (apt / "sources.list.d" / "other.list").write_text(
        "deb https://vendor.example/apt stable main\n"
    )
    (apt / "sources.list.d" / "x.list.disabled").write_text(
        "deb http://disabled.example/debian bookworm main\n"
    )
    sources = read_apt_sources(apt)
    assert {s.uri for s in sources} == {
        "http://one.example/debian",
        "http://sec.example/debian-security",
        "https://vendor.example/apt",
    }
    lines = debian_mirror_lines("bookworm", sources, environ={})
    assert lines == [
        "deb http://one.example/debian bookworm main",
        "deb http://sec.example/debian-security bookworm-security main non-free-firmware",
    ]
    override = debian_mirror_lines(
        "bookworm", sources, environ={"PYRO_DEBIAN_MIRROR": "http://o/d"}
    )
    assert override[0] == "deb http://o/d bookworm main"
    with pytest.raises(EnvironmentBuildError) as info:
        debian_mirror_lines("trixie", sources, environ={})
    assert "PYRO_DEBIAN_MIRROR" in (info.value.hint or "")


# --------------------------------------------------------------------------- kernel modules


def fake_module(name: str, depends: str, vermagic: str = "6.1.0-0-fake SMP") -> bytes:
    """A minimal ELF64 relocatable file with a .modinfo section."""
    modinfo = f"license=GPL\0depends={depends}\0name={name}\0vermagic={vermagic}\0".encode()
    shstrtab = b"\0.modinfo\0.shstrtab\0"
    modinfo_off = 64
    shstr_off = modinfo_off + len(modinfo)
    shoff = shstr_off + len(shstrtab)
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = struct.pack("<16sHHIQQQIHHHHHH", ident, 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, 3, 2)
    sections = [
        (0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        (1, 1, 2, 0, modinfo_off, len(modinfo), 0, 0, 1, 0),
        (10, 3, 0, 0, shstr_off, len(shstrtab), 0, 0, 1, 0),
    ]
    table = b"".join(struct.pack("<IIQQQQIIQQ", *s) for s in sections)
    return header + modinfo + shstrtab + table


def test_read_modinfo(tmp_path: Path) -> None:
    path = tmp_path / "virtio_blk.ko"
    path.write_bytes(fake_module("virtio_blk", "virtio,virtio_ring"))
    info = read_modinfo(path)
    assert info["depends"] == "virtio,virtio_ring"
    assert info["name"] == "virtio_blk"


def test_module_load_order() -> None:
    deps = {
        "virtio_ring": (),
        "virtio": ("virtio_ring",),
        "virtio_mmio": ("virtio", "virtio_ring"),
        "virtio_blk": ("virtio", "virtio_ring"),
        "virtio_net": ("virtio_ring", "virtio", "net_failover"),
        "net_failover": ("failover",),
        "failover": (),
    }
    available = {name: Path(name) for name in deps}
    order = module_load_order(
        ["virtio_mmio", "virtio_blk", "ext4"],
        available=available,
        depends=lambda n: deps[n],
        builtin={"ext4"},
    )
    assert order == ["virtio_ring", "virtio", "virtio_mmio", "virtio_blk"]
    net = module_load_order(
        ["virtio_net"], available=available, depends=lambda n: deps[n], skip=set(order)
    )
    assert net == ["failover", "net_failover", "virtio_net"]
    with pytest.raises(EnvironmentBuildError, match="neither built in"):
        module_load_order(["ext4"], available=available, depends=lambda n: deps[n])
    with pytest.raises(EnvironmentBuildError, match="cycle"):
        module_load_order(
            ["a"],
            available={"a": Path("a"), "b": Path("b")},
            depends=lambda n: ["b" if n == "a" else "a"],
        )


def build_fake_kernel_deb(
    tmp_path: Path, release: str = "6.1.0-0-fake", with_dep: bool = False
) -> Path:
    pkg = tmp_path / "pkgroot"
    mods = pkg / "lib/modules" / release / "kernel"
    layout = {
        "drivers/virtio/virtio_ring.ko": "",
        "drivers/virtio/virtio.ko": "virtio_ring",
        "drivers/virtio/virtio_mmio.ko": "virtio,virtio_ring",
        "drivers/virtio/virtio_pci.ko": "virtio,virtio_ring",
        "drivers/char/virtio_console.ko": "virtio,virtio_ring",
        "drivers/block/virtio_blk.ko": "virtio,virtio_ring",
        "drivers/net/virtio_net.ko": "virtio_ring,virtio,net_failover",
        "drivers/net/net_failover.ko": "failover",
        "net/core/failover.ko": "",
    }
    for rel, depends in layout.items():
        path = mods / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(fake_module(Path(rel).stem, depends, f"{release} SMP mod_unload"))
    (pkg / "lib/modules" / release / "modules.builtin").write_text(
        "kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n"
    )
    if with_dep:
        (pkg / "lib/modules" / release / "modules.dep").write_text(
            "".join(
                f"kernel/{rel}: "
                + " ".join(f"kernel/{r}" for r, _ in layout.items() if Path(r).stem in d.split(","))
                + "\n"
                for rel, d in layout.items()
            )
        )
    (pkg / "boot").mkdir()
    (pkg / "boot" / f"vmlinuz-{release}").write_bytes(b"bzImage")
    (pkg / "boot" / f"config-{release}").write_text("CONFIG_EXT4_FS=y\n")
    (pkg / "DEBIAN").mkdir()
    (pkg / "DEBIAN" / "control").write_text(
        f"Package: linux-image-{release}\nVersion: 6.1.999-1\nArchitecture: amd64\n"
        "Maintainer: test <t@example.org>\nDescription: fake kernel\n"
    )
    deb = tmp_path / f"linux-image-{release}_6.1.999-1_amd64.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "-Zgzip", "-b", str(pkg), str(deb)],
        check=True,
        capture_output=True,
    )
    return deb


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
@pytest.mark.parametrize("with_dep", [False, True])
def test_unpack_kernel_package(tmp_path: Path, with_dep: bool) -> None:
    deb = build_fake_kernel_deb(tmp_path, with_dep=with_dep)
    (tmp_path / "work").mkdir()
    build = kernel_mod.unpack_kernel_package(deb, tmp_path / "work", tmp_path / "out")
    assert build.release == "6.1.0-0-fake"
    assert build.package == "linux-image-6.1.0-0-fake"
    assert build.package_version == "6.1.999-1"
    assert build.modules == tuple(
        f"modules/{n}.ko"
        for n in ("virtio_ring", "virtio", "virtio_mmio", "virtio_console", "virtio_blk")
    )
    assert build.modules_net == (
        "modules/failover.ko",
        "modules/net_failover.ko",
        "modules/virtio_net.ko",
    )
    assert (tmp_path / "out" / "vmlinuz").read_bytes() == b"bzImage"
    assert build.config == "config"
    assert sorted(p.name for p in (tmp_path / "out" / "modules").iterdir()) == sorted(
        Path(m).name for m in (*build.modules, *build.modules_net)
    )


def test_extract_vmlinux_gzip(tmp_path: Path) -> None:
    elf = (
        b"\x7fELF\x02\x01\x01"
        + b"\0" * 9
        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 64, 0, 0, 64, 56, 0, 64, 0, 0)
    )
    payload = gzip.compress(elf)
    setup_sects = 1
    image = bytearray(b"\0" * ((setup_sects + 1) * 512))
    image[0x1F1] = setup_sects
    image[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", image, 0x206, 0x20F)
    struct.pack_into("<II", image, 0x248, 16, len(payload))
    image += b"\0" * 16 + payload + struct.pack("<I", len(elf))
    (tmp_path / "vmlinuz").write_bytes(bytes(image))
    out = extract_vmlinux(tmp_path / "vmlinuz", tmp_path / "vmlinux")
    assert out.read_bytes() == elf
    (tmp_path / "bad").write_bytes(b"\0" * 1024)
    with pytest.raises(EnvironmentBuildError):
        extract_vmlinux(tmp_path / "bad", tmp_path / "x")


def fake_fetcher(release: str, calls: list[str]) -> KernelFetcher:
    def fetch(out: Path, progress: Any) -> KernelBuild:
        calls.append(release)
        (out / "modules").mkdir(parents=True)
        (out / "vmlinuz").write_bytes(b"image-" + release.encode())
        (out / "modules" / "virtio.ko").write_bytes(b"mod")
        (out / "modules" / "virtio_net.ko").write_bytes(b"net")
        return KernelBuild(
            release=release,
            package=f"linux-image-{release}",
            package_version="1",
            image="vmlinuz",
            config=None,
            modules=("modules/virtio.ko",),
            modules_net=("modules/virtio_net.ko",),
        )

    return fetch


def test_kernel_cache_fetches_once_and_repairs(cache: Path) -> None:
    calls: list[str] = []
    kc = KernelCache(cache, fetcher=fake_fetcher("6.1.0-1-fake", calls))
    k1 = kc.ensure()
    assert calls == ["6.1.0-1-fake"]
    assert k1.path == cache / "kernels" / "6.1.0-1-fake"
    assert [p.name for p in k1.modules] == ["virtio.ko"]
    assert [p.name for p in k1.modules_net] == ["virtio_net.ko"]
    manifest = json.loads((k1.path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"vmlinuz", "modules/virtio.ko", "modules/virtio_net.ko"}
    assert manifest["digest"] == k1.digest
    assert kc.ensure() == k1 and calls == ["6.1.0-1-fake"]
    # A damaged module is noticed and the kernel fetched again.
    mod = k1.modules[0]
    mod.chmod(0o644)
    mod.write_bytes(b"MOD")
    rec = Recorder()
    k2 = kc.ensure(rec)
    assert calls == ["6.1.0-1-fake"] * 2
    assert k2.digest == k1.digest
    assert any("damaged" in m for m in rec.messages())
    assert not [p for p in (cache / "kernels").iterdir() if p.name.startswith(".tmp-")]


def test_kernel_cache_prune_keeps_current(cache: Path) -> None:
    calls: list[str] = []
    KernelCache(cache, fetcher=fake_fetcher("6.1.0-1-fake", calls)).ensure()
    newer = KernelCache(cache, fetcher=fake_fetcher("6.1.0-2-fake", calls))
    # A fetch of another release (as after `apt-get update`) becomes current.
    newer._set_current(newer._fetch(lambda e: None))
    (cache / "kernels" / ".tmp-kernel-0badc0de").mkdir()
    removed = newer.prune()
    assert sorted(Path(p).name for p in removed) == [".tmp-kernel-0badc0de", "6.1.0-1-fake"]
    assert newer.ensure().release == "6.1.0-2-fake"


# --------------------------------------------------------------------------- manifests


def test_check_files_modes(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"hello world")
    files = hash_files(tmp_path, ["a"])[0]
    first = check_files(tmp_path, files, {}, "auto")
    assert first.problems == [] and first.rehashed == ["a"]
    fps = first.fingerprints
    again = check_files(tmp_path, files, fps, "auto")
    assert again.problems == [] and again.rehashed == []  # fingerprint matched: no hashing
    # Same size, mtime restored: ctime still differs, so the content gets re-hashed.
    st = (tmp_path / "a").stat()
    (tmp_path / "a").write_bytes(b"hello World")
    os.utime(tmp_path / "a", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert check_files(tmp_path, files, fps, "quick").unverified == ["a"]
    changed = check_files(tmp_path, files, fps, "auto")
    assert changed.problems == ["a: content changed (sha256 mismatch)"]
    (tmp_path / "a").write_bytes(b"hello")
    assert check_files(tmp_path, files, fps, "quick").problems == ["a: size 5, expected 11"]
    (tmp_path / "a").unlink()
    assert check_files(tmp_path, files, fps, "full").problems == ["a: missing"]
    evil = {"../etc/passwd": {"sha256": "0" * 64, "size": 1}}
    assert "malformed" in check_files(tmp_path, evil, {}, "full").problems[0]


# --------------------------------------------------------------------------- the store


def test_ensure_builds_once_and_installs_atomically(cache: Path) -> None:
    log = cache.parent / "builds.log"
    store = make_store(cache, log)
    rec = Recorder()
    env = store.ensure(BASE, rec)
    assert builds(log) == [f"{os.getpid()} {BASE}"]
    assert env.path == cache / "environments" / "debian%3A12-base@1.0.0"
    assert env.rootfs == env.path / "rootfs.ext4"
    assert env.rootfs.stat().st_mode & 0o222 == 0  # read-only base image
    assert env.kernel.release == "6.1.0-0-fake"
    manifest = json.loads((env.path / "manifest.json").read_text())
    assert manifest == env.manifest
    assert manifest["name"] == BASE and manifest["version"] == "1.0.0"
    entry = manifest["files"]["rootfs.ext4"]
    assert entry["size"] == env.rootfs.stat().st_size
    assert entry["sha256"] == sha256_file(env.rootfs) == env.rootfs_sha256
    assert [p.name for p in (cache / "environments").iterdir()] == ["debian%3A12-base@1.0.0"]
    assert any(e.stage == "rootfs" for e in rec.events)
    again = store.ensure(BASE)
    assert again.path == env.path and builds(log) == builds(log)[:1]


def test_list_and_inspect(cache: Path) -> None:
    store = make_store(cache)
    infos = {i.name: i for i in store.list()}
    assert set(infos) == set(CATALOG)
    assert not infos[BASE].installed and infos[BASE].path is None
    store.ensure(BASE)
    info = store.inspect(BASE, verify=True)
    assert info.installed and info.verified is True and info.problems == ()
    assert info.size_bytes and info.size_bytes > 0
    assert info.kernel_release == "6.1.0-0-fake"
    json.dumps(dataclasses.asdict(info))  # JSON-serialisable
    assert store.inspect(BASE).verified is None  # cheap check does not claim verification


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest"])
def test_corruption_detected_and_rebuilt(cache: Path, damage: str) -> None:
    log = cache.parent / "builds.log"
    store = make_store(cache, log)
    env = store.ensure(BASE)
    env.rootfs.chmod(0o644)
    if damage == "truncate":
        with open(env.rootfs, "r+b") as fh:
            fh.truncate(100)
    elif damage == "flip":
        st = env.rootfs.stat()
        with open(env.rootfs, "r+b") as fh:
            fh.seek(2000)
            byte = fh.read(1)
            fh.seek(2000)
            fh.write(bytes([byte[0] ^ 0xFF]))
        os.utime(env.rootfs, ns=(st.st_atime_ns, st.st_mtime_ns))  # hide it from mtime
    elif damage == "delete":
        env.rootfs.unlink()
    else:
        (env.path / "manifest.json").write_text("{not json")
    info = store.inspect(BASE, verify=True)
    assert info.verified is False and info.problems
    rec = Recorder()
    fixed = store.ensure(BASE, rec)
    assert len(builds(log)) == 2
    assert any("damaged" in m for m in rec.messages())
    assert store.inspect(BASE, verify=True).verified is True
    assert fixed.rootfs_sha256 == sha256_file(fixed.rootfs)
    assert not [p for p in (cache / "environments").iterdir() if p.name.startswith(".tmp-")]


def test_failed_build_leaves_nothing(cache: Path) -> None:
    def broken(spec: EnvironmentSpec, image: Path, progress: Any) -> Mapping[str, Any]:
        image.write_bytes(b"half")
        raise EnvironmentBuildError("mirror unreachable")

    store = EnvironmentStore(cache, builder=broken, kernel_provider=fake_kernel_factory(cache))
    with pytest.raises(EnvironmentBuildError):
        store.ensure(BASE)
    assert list((cache / "environments").iterdir()) == []
    assert not store.inspect(BASE).installed


def test_pull_force_rebuilds(cache: Path) -> None:
    log = cache.parent / "builds.log"
    store = make_store(cache, log)
    first = store.pull(BASE)
    assert store.pull(BASE).rootfs_sha256 == first.rootfs_sha256
    second = store.pull(BASE, force=True)
    assert len(builds(log)) == 2
    assert second.rootfs_sha256 != first.rootfs_sha256
    assert store.remove(BASE) is True
    assert store.remove(BASE) is False


def test_prune_removes_leftovers_but_not_running_builds(cache: Path) -> None:
    store = make_store(cache)
    env = store.ensure(BASE)
    envs = cache / "environments"
    crashed = envs / ".tmp-debian%3A12-base@1.0.0-0123abcd"
    crashed.mkdir()
    (crashed / "rootfs.ext4").write_bytes(b"partial")
    old = envs / "debian%3A12@0.9.0"  # a catalog name at a version the catalog left behind
    shutil.copytree(env.path, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "version": "0.9.0"}))
    busy = envs / ".tmp-debian%3A12-build@1.0.0-89abcdef"
    busy.mkdir()
    stale_kernel = cache / "kernels" / "6.1.0-1-old"
    stale_kernel.mkdir(parents=True)
    (cache / "kernels" / "current.json").write_text(json.dumps({"release": "6.1.0-2-new"}))
    # A build by a pyro-mcp of the earlier layout holds the lock that layout named.
    legacy_busy = envs / ".tmp-debian_12-build-0badc0de"
    legacy_busy.mkdir()
    holders = [
        FileLock(str(cache / "locks" / name))
        for name in ("env-debian%3A12-build.lock", "env-debian_12-build.lock")
    ]
    for holder in holders:
        holder.acquire()
    try:
        removed = set(store.prune())
    finally:
        for holder in holders:
            holder.release()
    assert removed == {str(crashed), str(old), str(stale_kernel)}
    assert busy.exists() and legacy_busy.exists() and env.rootfs.exists()
    assert set(store.prune()) == {str(busy), str(legacy_busy)}
    assert store.ensure(BASE).rootfs_sha256 == env.rootfs_sha256  # not rebuilt


def _concurrent_ensure(root: str, log: str, out: Any) -> None:
    store = make_store(Path(root), Path(log), delay=0.5)
    out.put(str(store.ensure(BASE).rootfs))


def test_two_processes_build_once(cache: Path) -> None:
    log = cache.parent / "builds.log"
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_concurrent_ensure, args=(str(cache), str(log), out)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    results = {out.get(timeout=5), out.get(timeout=5)}
    assert len(builds(log)) == 1
    assert results == {str(cache / "environments" / "debian%3A12-base@1.0.0" / "rootfs.ext4")}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")
def test_root_build_in_user_cache_is_handed_back(cache: Path) -> None:
    cache.mkdir(parents=True)
    os.chown(cache, 4321, 4321)
    env = make_store(cache).ensure(BASE)
    for path in (
        env.path,
        env.rootfs,
        env.path / "manifest.json",
        cache / "locks" / "env-debian%3A12-base.lock",
    ):
        assert path.stat().st_uid == 4321, path


def test_not_root_names_the_command(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    store = EnvironmentStore(cache, kernel_provider=fake_kernel_factory(cache))
    with pytest.raises(EnvironmentBuildError) as info:
        store.ensure(BASE)
    assert "sudo" in (info.value.hint or "") and BASE in (info.value.hint or "")
    assert str(cache) in (info.value.hint or "")
    assert not [p for p in (cache / "environments").iterdir()]


def test_kernel_not_root_stale_lists(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)

    def fail(argv: Any, **kw: Any) -> Any:
        raise EnvironmentBuildError("cannot resolve linux-image-cloud-amd64")

    monkeypatch.setattr(kernel_mod, "run_tool", fail)
    with pytest.raises(EnvironmentBuildError) as info:
        kernel_mod.download_kernel_package(tmp_path)
    assert "apt-get update" in (info.value.hint or "")


# --------------------------------------------------------------------------- real build


def _can_build() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not (shutil.which("mmdebstrap") or shutil.which("debootstrap")):
        return "needs mmdebstrap or debootstrap"
    if not (shutil.which("apt-get") and shutil.which("dpkg-deb") and shutil.which("mkfs.ext4")):
        return "needs apt-get, dpkg-deb and mkfs.ext4"
    return None


@pytest.fixture(scope="session")
def real_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EnvironmentStore, Any]]:
    reason = _can_build()
    if reason:
        pytest.skip(reason)
    root = Path(os.environ.get("PYRO_TEST_ENV_CACHE") or tmp_path_factory.mktemp("envcache"))
    store = EnvironmentStore(root)
    rec = Recorder()
    env = store.ensure(BASE, rec)
    yield store, env


def debugfs(image: Path, request: str) -> str:
    return subprocess.run(
        ["debugfs", "-R", request, str(image)], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.vm
@pytest.mark.slow
def test_real_base_image(real_base: tuple[EnvironmentStore, Any]) -> None:
    store, env = real_base
    image = env.rootfs
    listing = debugfs(image, "ls -p /usr/bin")
    for tool in ("bash", "sh", "ls", "apt-get", "dpkg"):
        assert f"/{tool}/" in listing, tool
    assert debugfs(image, "cat /etc/hostname").strip() == "pyro"
    assert "Size: 0" in debugfs(image, "stat /etc/machine-id")
    assert "Type: directory" in debugfs(image, "stat /workspace")
    assert "root:x:0:0:root:/root:/bin/bash" in debugfs(image, "cat /etc/passwd")
    assert "/usr/share/man" not in debugfs(image, "ls -p /usr/share")
    subprocess.run(["e2fsck", "-fn", str(image)], check=True, capture_output=True)
    label = subprocess.run(["e2label", str(image)], capture_output=True, text=True, check=True)
    assert label.stdout.strip() == "pyro-root"
    build = env.manifest["build"]
    assert build["free_bytes"] >= get_spec(BASE).disk_free_mib * 1024 * 1024
    assert build["image_allocated_bytes"] < build["image_bytes"]  # sparse
    info = store.inspect(BASE, verify=True)
    assert info.verified is True, info.problems


@pytest.mark.vm
@pytest.mark.slow
def test_real_kernel(real_base: tuple[EnvironmentStore, Any], tmp_path: Path) -> None:
    _store, env = real_base
    kernel: KernelArtifact = env.kernel
    assert kernel.release.endswith("-cloud-amd64")
    assert kernel.image.read_bytes()[0x202:0x206] == b"HdrS"
    names = [p.stem for p in kernel.modules]
    assert names[-3:] == ["virtio_mmio", "virtio_console", "virtio_blk"]
    assert names.index("virtio_ring") < names.index("virtio") < names.index("virtio_mmio")
    assert [p.stem for p in kernel.modules_net][-1] == "virtio_net"
    for module in (*kernel.modules, *kernel.modules_net):
        assert read_modinfo(module)["vermagic"].startswith(kernel.release + " ")
    assert kernel.config is not None
    config = kernel.config.read_text()
    assert "CONFIG_EXT4_FS=y" in config and "CONFIG_VIRTIO_MMIO=m" in config
    if shutil.which("lz4") or "CONFIG_KERNEL_LZ4=y" not in config:
        vmlinux = extract_vmlinux(kernel.image, tmp_path / "vmlinux")
        assert vmlinux.read_bytes()[:4] == b"\x7fELF"


def test_rootfs_trim_and_configure(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    for rel in (
        "etc",
        "bin",
        "usr/share/doc/pkg",
        "usr/share/man/man1",
        "usr/share/locale/de",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/log/apt",
    ):
        (tree / rel).mkdir(parents=True)  # fmt: skip
    (tree / "usr/share/doc/pkg/copyright").write_text("c")
    (tree / "usr/share/doc/pkg/README.gz").write_text("r")
    (tree / "usr/share/man/man1/ls.1.gz").write_text("m")
    (tree / "usr/share/locale/locale.alias").write_text("a")
    (tree / "var/lib/apt/lists/deb.debian.org_Packages").write_text("p")
    (tree / "var/cache/apt/pkgcache.bin").write_text("b")
    (tree / "var/log/apt/history.log").write_text("h")
    (tree / "bin/bash").write_text("")
    (tree / "etc/passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nbin:x:2:2:bin:/bin:/usr/sbin/nologin\n"
    )
    (tree / "etc/resolv.conf").symlink_to("/run/systemd/resolve/stub-resolv.conf")
    rootfs_mod.trim(tree)
    rootfs_mod.configure_guest(tree)
    assert (tree / "usr/share/doc/pkg/copyright").exists()
    assert not (tree / "usr/share/doc/pkg/README.gz").exists()
    assert not list((tree / "usr/share/man").iterdir())
    assert [p.name for p in (tree / "usr/share/locale").iterdir()] == ["locale.alias"]
    assert [p.name for p in (tree / "var/lib/apt/lists").iterdir()] == ["partial"]
    assert not (tree / "var/cache/apt/pkgcache.bin").exists()
    assert not (tree / "var/log/apt/history.log").exists()
    assert (tree / "etc/hostname").read_text() == "pyro\n"
    assert not (tree / "etc/resolv.conf").is_symlink()
    assert (tree / "etc/machine-id").read_bytes() == b""
    assert (tree / "workspace").is_dir()
    assert (tree / "etc/passwd").read_text().splitlines()[0] == "root:x:0:0:root:/root:/bin/bash"


@pytest.mark.skipif(shutil.which("mkfs.ext4") is None, reason="needs e2fsprogs")
def test_make_image_free_space(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/hostname").write_text("pyro\n")
    (tree / "big").write_bytes(os.urandom(3 * 1024 * 1024))
    image = tmp_path / "img.ext4"
    stats = rootfs_mod.make_image(tree, image, 64)
    assert stats.free_bytes >= 64 * 1024 * 1024
    assert stats.free_bytes < 64 * 1024 * 1024 * 1.25
    assert image.stat().st_blocks * 512 < image.stat().st_size  # sparse


# --------------------------------------------------------------------------- structure


def test_environment_modules_import_without_a_circle() -> None:
    """Every import between the package's modules, deferred ones included, points one way."""
    folder = Path(package.__file__).parent
    prefix = "pyro_mcp.environments."
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps |= {n[len(prefix) :] for n in names if n.startswith(prefix)}
        graph[path.stem] = {d for d in deps if (folder / f"{d}.py").exists()}
    assert graph["__init__"] == set()
    assert graph["tools"] == graph["catalog"] == graph["apt"] == set()
    done: set[str] = set()

    def visit(module: str, chain: tuple[str, ...]) -> None:
        assert module not in chain, " -> ".join((*chain, module))
        if module in done:
            return
        for dep in graph[module]:
            visit(dep, (*chain, module))
        done.add(module)

    for module in graph:
        visit(module, ())
