"""``<cache>/kernels``: the guest kernel, fetched once, verified before each use.

Layout::

    kernels/<release>/      vmlinuz, config, modules/*.ko, manifest.json, fingerprints.json
    kernels/current.json    which release :meth:`KernelCache.ensure` returns
    locks/kernel.lock

The warm path makes no apt call: ``current.json`` names the release, whose
files pass the cheap fingerprint check. ``ensure(refresh=True)`` (what
``pyro env pull`` does) re-resolves the package through apt.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from pyro_mcp._version import __version__
from pyro_mcp.environments.cachefs import (
    TMP_PREFIX,
    Owner,
    locked,
    now_iso,
    replace_dir,
    try_lock,
)
from pyro_mcp.environments.integrity import (
    MANIFEST_FORMAT,
    finish_install,
    hash_files,
    is_safe_relpath,
    read_manifest,
    report_damage,
    verify_folder,
)
from pyro_mcp.environments.kernel import (
    KERNEL_META_PACKAGE,
    KernelArtifact,
    KernelBuild,
    fetch_kernel,
    resolve_kernel_package,
)
from pyro_mcp.environments.tools import remove_tree
from pyro_mcp.errors import EnvironmentBuildError, StateError
from pyro_mcp.fsio import read_json_object, write_json_atomic
from pyro_mcp.paths import cache_dir
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress

#: Fetches a kernel into the folder it is given (see kernel.fetch_kernel).
KernelFetcher = Callable[[Path, ProgressFn], KernelBuild]


class KernelCache:
    """``<root>/kernels``: the guest kernel, fetched once, verified before each use."""

    def __init__(self, root: Path | None = None, *, fetcher: KernelFetcher = fetch_kernel):
        self.root = (root or cache_dir()).absolute()
        self.kernels_dir = self.root / "kernels"
        self.lock_path = self.root / "locks" / "kernel.lock"
        self._fetcher = fetcher
        self._owner = Owner(self.root)

    def current_release(self) -> str | None:
        try:
            release = read_json_object(self.kernels_dir / "current.json").get("release")
        except (FileNotFoundError, StateError):
            return None
        if isinstance(release, str) and is_safe_relpath(release) and "/" not in release:
            return release
        return None

    def load(self, release: str) -> tuple[KernelArtifact | None, list[str]]:
        """The installed ``release`` (None + problems when absent or damaged)."""
        folder = self.kernels_dir / release
        if not folder.is_dir():
            return None, ["not installed"]
        manifest, problems = read_manifest(folder, "kernel", {"release": release})
        if manifest is None:
            return None, problems
        problems = verify_folder(folder, manifest, "auto")
        if problems:
            return None, problems
        try:
            return self._artifact(folder, manifest), []
        except (KeyError, TypeError) as exc:
            return None, [f"malformed kernel manifest ({exc})"]

    @staticmethod
    def _artifact(folder: Path, manifest: Mapping[str, Any]) -> KernelArtifact:
        files = manifest["files"]
        for rel in [manifest["image"], *manifest["modules"], *manifest["modules_net"]]:
            if rel not in files:
                raise KeyError(rel)
        config = manifest.get("config")
        return KernelArtifact(
            release=manifest["release"],
            package_version=manifest["package_version"],
            image=folder / manifest["image"],
            modules=tuple(folder / rel for rel in manifest["modules"]),
            modules_net=tuple(folder / rel for rel in manifest["modules_net"]),
            digest=manifest["digest"],
            path=folder,
            config=folder / config if isinstance(config, str) and config in files else None,
        )

    def ensure(
        self, progress: ProgressFn = no_progress, *, refresh: bool = False
    ) -> KernelArtifact:
        """The current kernel; fetched when missing or damaged, re-resolved when ``refresh``."""
        if not refresh:
            kernel = self._current(progress, report=False)  # damage is reported below
            if kernel is not None:
                return kernel
        self.kernels_dir.mkdir(parents=True, exist_ok=True)
        self._owner.adopt(self.kernels_dir)
        with locked(self.lock_path, self._owner, progress, "kernel", "fetching the kernel"):
            kernel = self._refreshed(progress) if refresh else self._current(progress)
            if kernel is None:
                kernel = self._fetch(progress)
            self._set_current(kernel)
            return kernel

    def _current(self, progress: ProgressFn, *, report: bool = True) -> KernelArtifact | None:
        release = self.current_release()
        if release is None:
            return None
        kernel, problems = self.load(release)
        if kernel is None and report and problems != ["not installed"]:
            report_damage(progress, "kernel", f"kernel {release}", problems)
        return kernel

    def _refreshed(self, progress: ProgressFn) -> KernelArtifact | None:
        """The installed kernel apt now resolves to; None when it must be fetched."""
        try:
            package = resolve_kernel_package()
        except EnvironmentBuildError as exc:
            kernel = self._current(progress)
            if kernel is None:
                raise
            progress(ProgressEvent("kernel", f"keeping kernel {kernel.release}: {exc.message}"))
            return kernel
        release = package.removeprefix("linux-image-")
        kernel, problems = self.load(release)
        if kernel is None and problems != ["not installed"]:
            report_damage(progress, "kernel", f"kernel {release}", problems)
        return kernel

    def _fetch(self, progress: ProgressFn) -> KernelArtifact:
        started = time.monotonic()
        tmp = self.kernels_dir / f"{TMP_PREFIX}kernel-{secrets.token_hex(4)}"
        try:
            build = self._fetcher(tmp, progress)
            progress(ProgressEvent("kernel", f"verifying kernel {build.release}"))
            files = [build.image, *build.modules, *build.modules_net]
            if build.config:
                files.append(build.config)
            for rel in files:
                (tmp / rel).chmod(0o444)
            self._owner.adopt(tmp, recursive=True)
            described, hashed = hash_files(tmp, files)
            digest = kernel_digest(described, [build.image, *build.modules, *build.modules_net])
            manifest: dict[str, Any] = {
                "format": MANIFEST_FORMAT,
                "kind": "kernel",
                "release": build.release,
                "package": build.package,
                "package_version": build.package_version,
                "meta_package": KERNEL_META_PACKAGE,
                "image": build.image,
                "config": build.config,
                "modules": list(build.modules),
                "modules_net": list(build.modules_net),
                "digest": digest,
                "files": described,
                "created_at": now_iso(),
                "fetch_seconds": round(time.monotonic() - started, 2),
                "pyro_version": __version__,
            }
            finish_install(tmp, manifest, hashed, self._owner, rehash=True)  # small
            final = self.kernels_dir / build.release
            replace_dir(tmp, final)
        finally:
            if tmp.exists():
                remove_tree(tmp)
        kernel, problems = self.load(build.release)
        if kernel is None:
            raise EnvironmentBuildError(f"kernel {build.release} failed verification: {problems}")
        progress(ProgressEvent("kernel", f"kernel {kernel.release} ready"))
        return kernel

    def _set_current(self, kernel: KernelArtifact) -> None:
        if self.current_release() != kernel.release:
            path = self.kernels_dir / "current.json"
            write_json_atomic(
                path, {"release": kernel.release, "package_version": kernel.package_version}
            )
            self._owner.adopt(path)

    def prune(self) -> list[str]:
        """Remove leftover temp folders and every kernel but the current one."""
        if not self.kernels_dir.is_dir():
            return []
        lock = try_lock(self.lock_path)
        if lock is None:
            return []
        removed: list[str] = []
        try:
            current = self.current_release()
            for entry in sorted(self.kernels_dir.iterdir()):
                if not entry.is_dir() or entry.name == current:
                    continue
                remove_tree(entry)
                removed.append(str(entry))
        finally:
            lock.release()
        return removed


def kernel_digest(files: Mapping[str, Mapping[str, Any]], order: Iterable[str]) -> str:
    """sha256 over ``"<relpath> <sha256>\\n"`` of the image and modules, in load order."""
    h = hashlib.sha256()
    for rel in order:
        h.update(f"{rel} {files[rel]['sha256']}\n".encode())
    return h.hexdigest()


__all__ = ["KernelCache", "KernelFetcher", "kernel_digest"]
