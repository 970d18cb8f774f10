"""The on-disk cache of guest kernels and installed environments.

Layout under the cache root (default :func:`pyro_mcp.paths.cache_dir`)::

    environments/<slug>-<version>/     one install ("debian:12" -> "debian_12-1.0.0")
        rootfs.ext4                    read-only base image (per-VM qcow2 overlays go on top)
        manifest.json                  what was built, and sha256 + size of each artifact
        fingerprints.json              (size, mtime_ns, ctime_ns, inode) of each verified file
    environments/.tmp-<slug>-<hex>/    a build in progress (or a crashed one: `prune`)
    kernels/<release>/                 vmlinuz, config, modules/*.ko, manifest.json, ...
    kernels/current.json               which release ensure_kernel() returns
    locks/env-<slug>.lock, locks/kernel.lock

Rules:

* Installs are atomic: built and verified (every artifact re-hashed against the
  manifest) in a ``.tmp-`` folder, then ``os.rename``'d into place.
* One :class:`filelock.FileLock` per environment (and one for kernels): a second
  process asking for the same environment waits, then reuses the install.
* Before each use, a cheap check compares each artifact's recorded fingerprint
  with ``stat``; only a mismatch costs a re-hash. A missing, truncated or
  altered artifact is reported (progress + log) and rebuilt, never returned.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from filelock import FileLock, Timeout

from pyro_mcp._version import __version__
from pyro_mcp.environments.catalog import CATALOG, EnvironmentSpec, get_spec, slug_of
from pyro_mcp.environments.kernel import (
    KERNEL_META_PACKAGE,
    KernelArtifact,
    KernelBuild,
    fetch_kernel,
    is_root,
    resolve_kernel_package,
)
from pyro_mcp.environments.rootfs import build_rootfs_image, remove_tree
from pyro_mcp.errors import EnvironmentBuildError, StateError
from pyro_mcp.paths import cache_dir
from pyro_mcp.progress import ProgressEvent, ProgressFn, no_progress

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
FINGERPRINTS_NAME = "fingerprints.json"
ROOTFS_NAME = "rootfs.ext4"
LOCK_TIMEOUT_S = 3600.0  # how long to wait for another process's build

#: Builds ``spec`` into the image path it is given; returns JSON-ready build facts.
RootfsBuilder = Callable[[EnvironmentSpec, Path, ProgressFn], Mapping[str, Any]]
#: Returns the guest kernel; ``refresh`` asks for a re-resolve through apt.
KernelProvider = Callable[[ProgressFn, bool], KernelArtifact]
#: Fetches a kernel into the folder it is given (see kernel.fetch_kernel).
KernelFetcher = Callable[[Path, ProgressFn], KernelBuild]

CheckMode = Literal["quick", "auto", "full"]
_SAFE_RELPATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TMP_PREFIX = ".tmp-"
_TMP_NAME = re.compile(r"\.tmp-(.+)-[0-9a-f]{8}(?:-old)?")


# --------------------------------------------------------------------------- manifests


def sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def describe_files(base: Path, relpaths: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``{relpath: {"sha256": ..., "size": ...}}`` for files under ``base``."""
    return hash_files(base, relpaths)[0]


def hash_files(
    base: Path, relpaths: Iterable[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """Manifest entries plus the fingerprint each file had while it was hashed.

    A file whose fingerprint changes during hashing raises EnvironmentBuildError:
    something else is writing it.
    """
    files: dict[str, dict[str, Any]] = {}
    fingerprints: dict[str, list[int]] = {}
    for rel in relpaths:
        path = base / rel
        before = fingerprint(path)
        digest = sha256_file(path)
        after = fingerprint(path)
        if before != after:
            raise EnvironmentBuildError(f"{path} changed while it was being hashed")
        files[rel] = {"sha256": digest, "size": after[0]}
        fingerprints[rel] = after
    return files, fingerprints


def fingerprint(path: Path) -> list[int]:
    """What a cheap check compares: size, mtime_ns, ctime_ns, inode.

    ctime cannot be set from user space, so restoring an mtime after a write
    (``touch -r``) is still noticed.
    """
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


@dataclass
class FileCheck:
    """Outcome of checking a folder's files against its manifest."""

    problems: list[str]
    fingerprints: dict[str, list[int]]  # of the files that are verified now
    rehashed: list[str]  # files whose content had to be (and was) hashed
    unverified: list[str]  # quick mode: changed since last verified, not hashed


def check_files(
    base: Path,
    files: Mapping[str, Any],
    recorded: Mapping[str, Any],
    mode: CheckMode = "auto",
) -> FileCheck:
    """Check ``files`` (a manifest's ``files``) under ``base``.

    ``quick``: stat only (missing, wrong size, fingerprint changed -> unverified);
    ``auto``: re-hash files whose fingerprint differs from ``recorded``;
    ``full``: re-hash everything.
    """
    result = FileCheck(problems=[], fingerprints={}, rehashed=[], unverified=[])
    for rel, entry in files.items():
        if not _valid_entry(rel, entry):
            result.problems.append(f"{rel}: malformed manifest entry")
            continue
        path = base / rel
        try:
            fp = fingerprint(path)
        except FileNotFoundError:
            result.problems.append(f"{rel}: missing")
            continue
        except OSError as exc:
            result.problems.append(f"{rel}: unreadable ({exc.strerror})")
            continue
        if fp[0] != entry["size"]:
            result.problems.append(f"{rel}: size {fp[0]}, expected {entry['size']}")
            continue
        unchanged = recorded.get(rel) == fp
        if mode == "quick" or (mode == "auto" and unchanged):
            if unchanged:
                result.fingerprints[rel] = fp
            else:
                result.unverified.append(rel)
            continue
        try:
            digest = sha256_file(path)
        except OSError as exc:
            result.problems.append(f"{rel}: unreadable ({exc.strerror})")
            continue
        result.rehashed.append(rel)
        if digest != entry["sha256"]:
            result.problems.append(f"{rel}: content changed (sha256 mismatch)")
        else:
            result.fingerprints[rel] = fp
    return result


def _valid_entry(rel: str, entry: Any) -> bool:
    return (
        isinstance(rel, str)
        and _SAFE_RELPATH.fullmatch(rel) is not None
        and ".." not in rel.split("/")
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        and _SHA256.fullmatch(entry["sha256"]) is not None
    )


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside ``path``, fsync it, rename it over ``path``."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; StateError when unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise StateError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(data, dict):
        raise StateError(f"{path} does not hold a JSON object")
    return data


def _read_fingerprints(folder: Path) -> dict[str, Any]:
    try:
        data = read_json(folder / FINGERPRINTS_NAME)
    except (FileNotFoundError, StateError):
        return {}
    return data.get("files", {}) if isinstance(data.get("files"), dict) else {}


def _write_fingerprints(folder: Path, fingerprints: Mapping[str, list[int]]) -> None:
    try:
        write_json_atomic(
            folder / FINGERPRINTS_NAME, {"format": MANIFEST_FORMAT, "files": dict(fingerprints)}
        )
    except OSError as exc:  # a read-only cache still works; checks just re-hash
        log.debug("cannot record fingerprints in %s: %s", folder, exc)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _allocated_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except OSError:
                continue
    return total


class _Owner:
    """Hands files a root process creates in a user's cache back to that user.

    ``sudo env PYRO_CACHE_DIR=~/.cache/pyro-mcp pyro env pull`` builds as root
    into a folder the user owns; without this the user could not lock, prune or
    rebuild it afterwards.
    """

    def __init__(self, root: Path) -> None:
        self.uid: int | None = None
        self.gid: int | None = None
        if is_root():
            try:
                st = root.stat()
            except OSError:
                return
            if st.st_uid != 0:
                self.uid, self.gid = st.st_uid, st.st_gid

    def adopt(self, path: Path, *, recursive: bool = False) -> None:
        if self.uid is None or self.gid is None:
            return
        paths: Iterable[Path] = [path]
        if recursive and path.is_dir():
            paths = [path, *path.rglob("*")]
        for p in paths:
            try:
                os.lchown(p, self.uid, self.gid)
            except OSError as exc:
                log.debug("cannot chown %s: %s", p, exc)


@contextmanager
def _locked(
    lock_path: Path, owner: _Owner, progress: ProgressFn, stage: str, what: str
) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    owner.adopt(lock_path.parent)
    lock = FileLock(str(lock_path), mode=0o664)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress(ProgressEvent(stage, f"waiting for another process to finish {what}"))
        try:
            lock.acquire(timeout=LOCK_TIMEOUT_S)
        except Timeout:
            raise EnvironmentBuildError(
                f"gave up waiting for the lock on {what} after {LOCK_TIMEOUT_S:.0f} s",
                hint=f"another pyro process holds {lock_path}; stop it or remove the lock",
            ) from None
    owner.adopt(lock_path)
    try:
        yield
    finally:
        lock.release()


def _try_lock(lock_path: Path) -> FileLock | None:
    """The lock, acquired without waiting, or None when another process holds it."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path), mode=0o664)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return None
    return lock


def _replace_dir(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final``; an existing ``final`` is moved aside and removed."""
    old: Path | None = None
    if final.exists():
        old = final.with_name(f"{_TMP_PREFIX}{final.name}-{secrets.token_hex(4)}-old")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        remove_tree(old)


# --------------------------------------------------------------------------- kernels


class KernelCache:
    """``<root>/kernels``: the guest kernel, fetched once, verified before each use."""

    def __init__(self, root: Path | None = None, *, fetcher: KernelFetcher = fetch_kernel):
        self.root = (root or cache_dir()).absolute()
        self.kernels_dir = self.root / "kernels"
        self.lock_path = self.root / "locks" / "kernel.lock"
        self._fetcher = fetcher
        self._owner = _Owner(self.root)

    def current_release(self) -> str | None:
        try:
            release = read_json(self.kernels_dir / "current.json").get("release")
        except (FileNotFoundError, StateError):
            return None
        if isinstance(release, str) and _SAFE_RELPATH.fullmatch(release) and "/" not in release:
            return release
        return None

    def load(
        self, release: str, mode: CheckMode = "auto"
    ) -> tuple[KernelArtifact | None, list[str]]:
        """The installed ``release`` (None + problems when absent or damaged)."""
        folder = self.kernels_dir / release
        try:
            manifest = read_json(folder / MANIFEST_NAME)
        except FileNotFoundError:
            return None, ["not installed"]
        except StateError as exc:
            return None, [exc.message]
        problems = _manifest_problems(manifest, "kernel", {"release": release})
        if problems:
            return None, problems
        check = check_files(folder, manifest["files"], _read_fingerprints(folder), mode)
        if check.problems:
            return None, check.problems
        if check.rehashed:
            _write_fingerprints(folder, check.fingerprints)
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
        with _locked(self.lock_path, self._owner, progress, "kernel", "fetching the kernel"):
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
            _report_damage(progress, "kernel", f"kernel {release}", problems)
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
            _report_damage(progress, "kernel", f"kernel {release}", problems)
        return kernel

    def _fetch(self, progress: ProgressFn) -> KernelArtifact:
        started = time.monotonic()
        tmp = self.kernels_dir / f"{_TMP_PREFIX}kernel-{secrets.token_hex(4)}"
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
                "created_at": _now(),
                "fetch_seconds": round(time.monotonic() - started, 2),
                "pyro_version": __version__,
            }
            _finish_install(tmp, manifest, hashed, self._owner, rehash=True)  # small
            final = self.kernels_dir / build.release
            _replace_dir(tmp, final)
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
        lock = _try_lock(self.lock_path)
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


def _manifest_problems(
    manifest: Mapping[str, Any], kind: str, expect: Mapping[str, Any]
) -> list[str]:
    if manifest.get("format") != MANIFEST_FORMAT:
        return [f"manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}"]
    if manifest.get("kind") != kind:
        return [f"manifest is for a {manifest.get('kind')!r}, not a {kind}"]
    problems = [
        f"manifest {key} is {manifest.get(key)!r}, expected {value!r}"
        for key, value in expect.items()
        if manifest.get(key) != value
    ]
    if not isinstance(manifest.get("files"), dict) or not manifest["files"]:
        problems.append("manifest lists no files")
    return problems


def _finish_install(
    tmp: Path,
    manifest: Mapping[str, Any],
    hashed: Mapping[str, list[int]],
    owner: _Owner,
    *,
    rehash: bool = False,
) -> None:
    """Write the manifest, sync, verify the folder against it, record fingerprints.

    The artifacts were hashed once for the manifest (``hashed``: their
    fingerprints then). Verification reads the manifest back from disk and checks
    every artifact against it; an artifact whose fingerprint moved since it was
    hashed is re-hashed, and ``rehash=True`` re-hashes all of them.
    """
    path = tmp / MANIFEST_NAME
    write_json_atomic(path, manifest)
    owner.adopt(path)
    for rel in manifest["files"]:
        _fsync_path(tmp / rel)
    on_disk = read_json(path)
    if on_disk != json.loads(json.dumps(manifest)):
        raise EnvironmentBuildError(f"{path} does not read back as written")
    check = check_files(tmp, on_disk["files"], hashed, "full" if rehash else "auto")
    if check.problems:
        raise EnvironmentBuildError(
            f"new build in {tmp} failed verification",
            details={"problems": check.problems},
        )
    _write_fingerprints(tmp, check.fingerprints)
    owner.adopt(tmp / FINGERPRINTS_NAME)
    _fsync_path(tmp)


def _report_damage(progress: ProgressFn, stage: str, what: str, problems: list[str]) -> None:
    message = f"{what} is damaged ({'; '.join(problems)}); rebuilding"
    log.warning("%s", message)
    progress(ProgressEvent(stage, message))


# --------------------------------------------------------------------------- environments


@dataclass(frozen=True)
class InstalledEnvironment:
    """A verified install. ``rootfs`` is shared: open it read-only (qcow2 overlay on top)."""

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
        self._owner = _Owner(self.root)

    # -- public API -----------------------------------------------------------------

    def list(self) -> list[EnvironmentInfo]:
        """Every catalog environment, installed or not (cheap checks only)."""
        return [self.inspect(name) for name in sorted(CATALOG)]

    def ensure(self, name: str, progress: ProgressFn = no_progress) -> InstalledEnvironment:
        """The verified install of ``name``; built first when missing or damaged."""
        spec = get_spec(name)
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
        manifest, problems = self._read_manifest(spec, folder)
        unverified: builtins.list[str] = []
        if manifest is not None:
            check = check_files(
                folder,
                manifest["files"],
                _read_fingerprints(folder),
                "full" if verify else "quick",
            )
            problems += check.problems
            unverified = check.unverified
            if verify and not check.problems:
                _write_fingerprints(folder, check.fingerprints)
        problems += [f"{rel}: modified since last verified (verify to check)" for rel in unverified]
        facts = manifest or {}
        rootfs_entry = facts.get("files", {}).get(ROOTFS_NAME, {})
        return replace(
            info,
            installed=True,
            path=str(folder),
            size_bytes=_allocated_bytes(folder),
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
            aside = folder.with_name(f"{_TMP_PREFIX}{spec.slug}-{secrets.token_hex(4)}-old")
            os.rename(folder, aside)
            remove_tree(aside)
            return True

    def prune(self) -> builtins.list[str]:
        """Remove leftover temp folders, installs not in the catalog and stale kernels.

        Folders of a build that is running in another process are left alone.
        Returns the removed paths.
        """
        removed: list[str] = []
        current = {spec.install_dirname for spec in CATALOG.values()}
        if self.environments_dir.is_dir():
            for entry in sorted(self.environments_dir.iterdir()):
                if entry.name in current:
                    continue
                lock = _try_lock(self._lock_path(self._slug_of_entry(entry)))
                if lock is None:
                    continue  # being built or used by another process right now
                try:
                    remove_tree(entry)
                    removed.append(str(entry))
                finally:
                    lock.release()
        removed += self._kernels.prune()
        return removed

    # -- internals --------------------------------------------------------------------

    def _install_dir(self, spec: EnvironmentSpec) -> Path:
        return self.environments_dir / spec.install_dirname

    def _lock_path(self, slug: str) -> Path:
        return self.locks_dir / f"env-{slug}.lock"

    def _lock(self, spec: EnvironmentSpec, progress: ProgressFn) -> AbstractContextManager[None]:
        return _locked(
            self._lock_path(spec.slug), self._owner, progress, "rootfs", f"building {spec.name}"
        )

    @staticmethod
    def _slug_of_entry(entry: Path) -> str:
        """The slug whose lock guards ``entry`` (a temp folder or an old install)."""
        name = entry.name
        match = _TMP_NAME.fullmatch(name)
        if match:
            name = match.group(1)
            for spec in CATALOG.values():
                if name in (spec.slug, spec.install_dirname):
                    return spec.slug
        try:
            manifest_name = read_json(entry / MANIFEST_NAME).get("name")
            if isinstance(manifest_name, str) and ":" in manifest_name:
                return slug_of(manifest_name).replace("/", "_")
        except (FileNotFoundError, NotADirectoryError, StateError):
            pass
        return re.sub(r"[^A-Za-z0-9._-]", "_", name)

    def _read_manifest(
        self, spec: EnvironmentSpec, folder: Path
    ) -> tuple[dict[str, Any] | None, builtins.list[str]]:
        try:
            manifest = read_json(folder / MANIFEST_NAME)
        except FileNotFoundError:
            return None, [f"{MANIFEST_NAME}: missing"]
        except StateError as exc:
            return None, [exc.message]
        problems = _manifest_problems(
            manifest, "environment", {"name": spec.name, "version": spec.version}
        )
        if not problems and ROOTFS_NAME not in manifest["files"]:
            problems.append(f"manifest lists no {ROOTFS_NAME}")
        return (None if problems else manifest), problems

    def _usable(
        self, spec: EnvironmentSpec, progress: ProgressFn, *, report: bool = True
    ) -> dict[str, Any] | None:
        """The install's manifest when it passes the cheap check (re-hashing what changed)."""
        folder = self._install_dir(spec)
        if not folder.is_dir():
            return None
        manifest, problems = self._read_manifest(spec, folder)
        if manifest is not None:
            check = check_files(folder, manifest["files"], _read_fingerprints(folder), "auto")
            problems = check.problems
            if not problems and check.rehashed:
                _write_fingerprints(folder, check.fingerprints)
        if problems:
            if report:
                _report_damage(progress, "verify", f"environment {spec.name}", problems)
            return None
        return manifest

    def _build(self, spec: EnvironmentSpec, progress: ProgressFn) -> dict[str, Any]:
        """Build ``spec`` in a temp folder, verify it, rename it into place. Lock held."""
        kernel = self._kernel_provider(progress, False)  # fail fast, before the slow part
        self.environments_dir.mkdir(parents=True, exist_ok=True)
        self._owner.adopt(self.environments_dir)
        tmp = self.environments_dir / f"{_TMP_PREFIX}{spec.slug}-{secrets.token_hex(4)}"
        tmp.mkdir(mode=0o755)
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
                "built_at": _now(),
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
            _finish_install(tmp, manifest, hashed, self._owner)
            _replace_dir(tmp, self._install_dir(spec))
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


__all__ = [
    "EnvironmentInfo",
    "EnvironmentStore",
    "InstalledEnvironment",
    "KernelCache",
    "check_files",
    "describe_files",
    "fingerprint",
    "hash_files",
]
