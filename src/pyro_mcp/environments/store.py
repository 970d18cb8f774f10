"""Installed environments: built once, verified before each use.

Layout under the cache root (default :func:`pyro_mcp.paths.cache_dir`)::

    environments/<name>@<version>/     one install, both escaped by catalog.slug_of
                                       ("debian:12" 1.0.0 -> "debian%3A12@1.0.0")
        rootfs.ext4                    read-only base image (per-VM qcow2 overlays go on top)
        manifest.json                  what was built, and sha256 + size of each artifact
        fingerprints.json              (size, mtime_ns, ctime_ns, inode) of each verified file
    environments/.tmp-<install>-<hex>/ a build in progress, a crashed one, or one being deleted
    hostfs/<install>-<sha16>/          an install's image unpacked (environments.tree)
    kernels/                           the guest kernel (environments.kernel_cache)
    locks/env-<name slug>.lock, locks/kernel.lock

Rules:

* Installs are atomic: built and verified (every artifact re-hashed against the
  manifest) in a ``.tmp-`` folder, then ``os.rename``'d into place.
* One :class:`filelock.FileLock` per environment name (and one for kernels): a
  second process asking for the same environment waits, then reuses the install.
* Before each use, a cheap check compares each artifact's recorded fingerprint
  with ``stat``; only a mismatch costs a re-hash. A missing, truncated or
  altered artifact is reported (progress + log) and rebuilt, never returned.
* Folders of the earlier layout (``debian_12-1.0.0``, where ``a_b:c`` and
  ``a:b_c`` shared a folder) are never read: no current folder name lacks the
  ``@``. Such an install is rebuilt once under its new name; ``prune`` removes it.
"""

from __future__ import annotations

import builtins
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pyro_mcp._version import __version__
from pyro_mcp.environments.cachefs import (
    TMP_PREFIX,
    Owner,
    allocated_bytes,
    locked,
    new_tmp_dir,
    now_iso,
    remove_aside,
    replace_dir,
    try_lock,
)
from pyro_mcp.environments.catalog import (
    CATALOG,
    VERSION_SEPARATOR,
    EnvironmentSpec,
    get_spec,
    install_folder_name,
)
from pyro_mcp.environments.integrity import (
    MANIFEST_FORMAT,
    finish_install,
    hash_files,
    read_manifest,
    report_damage,
    verify_folder,
)
from pyro_mcp.environments.kernel import KernelArtifact
from pyro_mcp.environments.kernel_cache import KernelCache
from pyro_mcp.environments.rootfs import build_rootfs_image
from pyro_mcp.environments.tools import remove_tree
from pyro_mcp.environments.tree import hostfs_root, prune_rootfs_trees, tree_dirname
from pyro_mcp.errors import EnvironmentBuildError, PyroError
from pyro_mcp.paths import cache_dir
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress

ROOTFS_NAME = "rootfs.ext4"

#: Builds ``spec`` into the image path it is given; returns JSON-ready build facts.
RootfsBuilder = Callable[[EnvironmentSpec, Path, ProgressFn], Mapping[str, Any]]
#: Returns the guest kernel; ``refresh`` asks for a re-resolve through apt.
KernelProvider = Callable[[ProgressFn, bool], KernelArtifact]

_TMP_NAME = re.compile(re.escape(TMP_PREFIX) + r"(.+)-[0-9a-f]{8}(?:-old)?")


@dataclass(frozen=True)
class InstalledEnvironment:
    """A verified install. ``rootfs`` is shared: open it read-only (qcow2 overlay on top).

    ``path`` is ``<cache>/environments/<install folder>``.
    """

    name: str
    version: str
    path: Path
    rootfs: Path
    kernel: KernelArtifact
    manifest: dict[str, Any]

    @property
    def rootfs_sha256(self) -> str:
        """Changes whenever the image is rebuilt: overlays made on another one are stale."""
        return str(self.manifest["files"][ROOTFS_NAME]["sha256"])


@dataclass(frozen=True)
class EnvironmentInfo:
    """What ``pyro env list/inspect`` show; JSON-ready via ``dataclasses.asdict``."""

    name: str
    version: str
    description: str
    packages: tuple[str, ...]
    installed: bool
    path: str | None
    size_bytes: int | None  # host disk space the install takes (sparse image counted as used)
    verified: bool | None  # True/False after a full re-hash (inspect verify=True), else None
    problems: tuple[str, ...]
    disk_bytes: int | None = None  # the image's size = the guest's disk size
    disk_free_mib: int | None = None  # free space in the guest's disk when new
    rootfs_sha256: str | None = None
    kernel_release: str | None = None
    built_at: str | None = None
    build_seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class EnvironmentStore:
    """Installed environments under ``<root>/environments``.

    ``builder`` and ``kernel_provider`` replace the real rootfs build and kernel
    fetch (tests use cheap fakes).
    """

    def __init__(
        self,
        root: Path | None = None,
        *,
        builder: RootfsBuilder | None = None,
        kernel_provider: KernelProvider | None = None,
    ) -> None:
        self.root = (root or cache_dir()).absolute()
        self.environments_dir = self.root / "environments"
        self.locks_dir = self.root / "locks"
        self._builder = builder or self._default_builder
        self._kernels = KernelCache(self.root)
        self._kernel_provider = kernel_provider or self._default_kernel
        self._owner = Owner(self.root)

    # -- public API -----------------------------------------------------------------

    def list(self) -> list[EnvironmentInfo]:
        """Every catalog environment, installed or not (cheap checks only)."""
        return [self.inspect(name) for name in sorted(CATALOG)]

    def ensure(
        self, name: str | EnvironmentSpec, progress: ProgressFn = no_progress
    ) -> InstalledEnvironment:
        """The verified install of ``name`` (a catalog name, or a spec of one's own);
        built first when missing or damaged."""
        spec = name if isinstance(name, EnvironmentSpec) else get_spec(name)
        manifest = self._usable(spec, progress, report=False)
        if manifest is None:
            with self._lock(spec, progress):
                manifest = self._usable(spec, progress)  # built while we waited?
                if manifest is None:
                    manifest = self._build(spec, progress)
        return self._installed(spec, manifest, self._kernel_provider(progress, False))

    def pull(
        self, name: str, progress: ProgressFn = no_progress, force: bool = False
    ) -> InstalledEnvironment:
        """Install ``name`` (rebuild when ``force``); also refresh the kernel through apt."""
        spec = get_spec(name)
        kernel = self._kernel_provider(progress, True)
        with self._lock(spec, progress):
            manifest = None if force else self._usable(spec, progress)
            if manifest is None:
                manifest = self._build(spec, progress)
        return self._installed(spec, manifest, kernel)

    def inspect(self, name: str, verify: bool = False) -> EnvironmentInfo:
        """State of ``name``'s install; ``verify`` re-hashes every artifact."""
        spec = get_spec(name)
        folder = self._install_dir(spec)
        info = EnvironmentInfo(
            name=spec.name,
            version=spec.version,
            description=spec.description,
            packages=spec.packages,
            installed=False,
            path=None,
            size_bytes=None,
            verified=None,
            problems=(),
            disk_free_mib=spec.disk_free_mib,
        )
        if not folder.is_dir():
            return info
        manifest, problems = _read_env_manifest(
            folder, {"name": spec.name, "version": spec.version}
        )
        if manifest is not None:
            problems = verify_folder(folder, manifest, "full" if verify else "quick")
        facts = manifest or {}
        rootfs_entry = facts.get("files", {}).get(ROOTFS_NAME, {})
        return replace(
            info,
            installed=True,
            path=str(folder),
            size_bytes=allocated_bytes(folder),
            verified=(not problems) if verify else None,
            problems=tuple(problems),
            disk_bytes=rootfs_entry.get("size"),
            rootfs_sha256=rootfs_entry.get("sha256"),
            kernel_release=facts.get("kernel", {}).get("release"),
            built_at=facts.get("built_at"),
            build_seconds=facts.get("build_seconds"),
        )

    def remove(self, name: str) -> bool:
        """Uninstall ``name``; False when it was not installed."""
        spec = get_spec(name)
        with self._lock(spec, no_progress):
            folder = self._install_dir(spec)
            if not folder.exists():
                return False
            remove_aside(folder)
            return True

    def prune(self) -> builtins.list[str]:
        """Remove what no caller will use again; return the removed paths.

        Under ``environments/``: leftover temp folders, and every install that is
        damaged, partial, misplaced (an earlier layout) or superseded. The
        current install of a name is the catalog's version for a catalog name;
        for any other name (custom environments) the most recently built intact
        one. Then unpacked trees of images no longer installed, and every kernel
        but the current one. Folders whose lock another process holds (a build
        running right now) are left alone.
        """
        removed: list[str] = []
        kept: dict[Path, str] = {}  # install -> its image's sha256
        busy: list[Path] = []
        groups: dict[str, list[Path]] = {}
        if self.environments_dir.is_dir():
            for entry in sorted(self.environments_dir.iterdir()):
                groups.setdefault(_lock_slug(entry.name), []).append(entry)
        for slug, entries in groups.items():
            lock = try_lock(self._lock_path(slug))
            if lock is None:
                busy += entries  # being built or used by another process right now
                continue
            try:
                keep = _installs_to_keep(entries)
                kept.update(keep)
                for entry in entries:
                    if entry not in keep:
                        remove_tree(entry)
                        removed.append(str(entry))
            finally:
                lock.release()
        removed += prune_rootfs_trees(
            [tree_dirname(entry.name, sha256) for entry, sha256 in kept.items()],
            root=hostfs_root(self.root),
            keep_prefixes=[f"{entry.name}-" for entry in busy],
        )
        removed += self._kernels.prune()
        return removed

    # -- internals --------------------------------------------------------------------

    def _install_dir(self, spec: EnvironmentSpec) -> Path:
        return self.environments_dir / spec.install_dirname

    def _lock_path(self, slug: str) -> Path:
        return self.locks_dir / f"env-{slug}.lock"

    def _lock(self, spec: EnvironmentSpec, progress: ProgressFn) -> AbstractContextManager[None]:
        return locked(
            self._lock_path(spec.slug), self._owner, progress, "rootfs", f"building {spec.name}"
        )

    def _usable(
        self, spec: EnvironmentSpec, progress: ProgressFn, *, report: bool = True
    ) -> dict[str, Any] | None:
        """The install's manifest when it passes the cheap check (re-hashing what changed)."""
        folder = self._install_dir(spec)
        if not folder.is_dir():
            return None
        manifest, problems = _read_env_manifest(
            folder, {"name": spec.name, "version": spec.version}
        )
        if manifest is not None:
            problems = verify_folder(folder, manifest, "auto")
        if problems:
            if report:
                report_damage(progress, "verify", f"environment {spec.name}", problems)
            return None
        return manifest

    def _build(self, spec: EnvironmentSpec, progress: ProgressFn) -> dict[str, Any]:
        """Build ``spec`` in a temp folder, verify it, rename it into place. Lock held."""
        kernel = self._kernel_provider(progress, False)  # fail fast, before the slow part
        self.environments_dir.mkdir(parents=True, exist_ok=True)
        self._owner.adopt(self.environments_dir)
        tmp = new_tmp_dir(self.environments_dir, spec.install_dirname)
        started = time.monotonic()
        try:
            image = tmp / ROOTFS_NAME
            build_info = dict(self._builder(spec, image, progress))
            if not image.is_file():
                raise EnvironmentBuildError(f"the builder left no {ROOTFS_NAME} for {spec.name}")
            progress(ProgressEvent("verify", f"hashing and verifying {spec.name}"))
            image.chmod(0o444)
            self._owner.adopt(tmp, recursive=True)
            files, hashed = hash_files(tmp, [ROOTFS_NAME])
            manifest: dict[str, Any] = {
                "format": MANIFEST_FORMAT,
                "kind": "environment",
                "name": spec.name,
                "version": spec.version,
                "description": spec.description,
                "suite": spec.suite,
                "packages": list(spec.packages),
                "disk_free_mib": spec.disk_free_mib,
                "built_at": now_iso(),
                "build_seconds": round(time.monotonic() - started, 2),
                "build": build_info,
                "kernel": {
                    "release": kernel.release,
                    "package_version": kernel.package_version,
                    "digest": kernel.digest,
                },
                "files": files,
                "pyro_version": __version__,
            }
            finish_install(tmp, manifest, hashed, self._owner)
            replace_dir(tmp, self._install_dir(spec))
        except BaseException:
            remove_tree(tmp)
            raise
        total = time.monotonic() - started
        progress(ProgressEvent("verify", f"{spec.name} {spec.version} installed in {total:.1f} s"))
        return manifest

    def _installed(
        self, spec: EnvironmentSpec, manifest: dict[str, Any], kernel: KernelArtifact
    ) -> InstalledEnvironment:
        folder = self._install_dir(spec)
        return InstalledEnvironment(
            name=spec.name,
            version=spec.version,
            path=folder,
            rootfs=folder / ROOTFS_NAME,
            kernel=kernel,
            manifest=manifest,
        )

    def _default_builder(
        self, spec: EnvironmentSpec, image: Path, progress: ProgressFn
    ) -> Mapping[str, Any]:
        info = build_rootfs_image(spec, image, progress, cache_root=self.root)
        return asdict(info)

    def _default_kernel(self, progress: ProgressFn, refresh: bool) -> KernelArtifact:
        return self._kernels.ensure(progress, refresh=refresh)


# --------------------------------------------------------------------------- prune helpers


def _read_env_manifest(
    folder: Path, expect: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, builtins.list[str]]:
    manifest, problems = read_manifest(folder, "environment", expect)
    if manifest is not None and ROOTFS_NAME not in manifest["files"]:
        return None, [f"manifest lists no {ROOTFS_NAME}"]
    return manifest, problems


def _lock_slug(entry_name: str) -> str:
    """The name slug whose lock guards the folder ``entry_name``: an install
    (``<slug>@<version>``) or a temp folder named after one."""
    match = _TMP_NAME.fullmatch(entry_name)
    name = match.group(1) if match else entry_name
    slug, sep, _version = name.partition(VERSION_SEPARATOR)
    if sep:
        return slug
    # The earlier layout: its builds took env-<folder stem>.lock, so the same name
    # leaves a build of an older pyro-mcp alone.
    return name[:200]


def _installs_to_keep(entries: Iterable[Path]) -> dict[Path, str]:
    """The current intact install of each name among ``entries`` (one lock's folders),
    with the sha256 of its image."""
    newest: dict[str, tuple[tuple[str, int], Path, str]] = {}
    for entry in entries:
        if entry.name.startswith(TMP_PREFIX) or not entry.is_dir():
            continue
        manifest, _problems = _read_env_manifest(entry, {})
        if manifest is None:
            continue  # partial or damaged
        name, version = manifest.get("name"), manifest.get("version")
        if not isinstance(name, str) or not isinstance(version, str):
            continue
        try:
            if entry.name != install_folder_name(name, version):
                continue  # an earlier layout, or moved by hand
        except PyroError:
            continue
        spec = CATALOG.get(name)
        if spec is not None and spec.version != version:
            continue  # superseded by the catalog's recipe
        if verify_folder(entry, manifest, "auto"):
            continue  # damaged
        built_at = manifest.get("built_at")
        rank = (built_at if isinstance(built_at, str) else "", entry.stat().st_mtime_ns)
        if name not in newest or rank > newest[name][0]:
            newest[name] = (rank, entry, str(manifest["files"][ROOTFS_NAME]["sha256"]))
    return {entry: sha256 for _rank, entry, sha256 in newest.values()}


__all__ = [
    "ROOTFS_NAME",
    "EnvironmentInfo",
    "EnvironmentStore",
    "InstalledEnvironment",
    "KernelProvider",
    "RootfsBuilder",
]
