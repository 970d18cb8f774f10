"""Verified folders: manifests of sha256 + size per file, and cheap checks against them.

A cached kernel or environment is a folder with ``manifest.json`` (what was
built, and the sha256 and size of each artifact) and ``fingerprints.json``
(the ``(size, mtime_ns, ctime_ns, inode)`` each artifact had when it was last
verified). A check compares fingerprints first and re-hashes only what moved;
:func:`finish_install` writes a new folder's manifest and verifies the folder
against the manifest as read back from disk.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pyro_mcp.environments.cachefs import Owner
from pyro_mcp.errors import EnvironmentBuildError, StateError
from pyro_mcp.fsio import fsync_path, read_json_object, sha256_file, write_json_atomic
from pyro_mcp.progress import ProgressEvent, ProgressFn

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
MANIFEST_NAME = "manifest.json"
FINGERPRINTS_NAME = "fingerprints.json"

CheckMode = Literal["quick", "auto", "full"]
_SAFE_RELPATH = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def is_safe_relpath(rel: str) -> bool:
    """A relative path a manifest may name: plain components, no ``..``, no leading ``.``."""
    return _SAFE_RELPATH.fullmatch(rel) is not None and ".." not in rel.split("/")


def fingerprint(path: Path) -> list[int]:
    """What a cheap check compares: size, mtime_ns, ctime_ns, inode.

    ctime cannot be set from user space, so restoring an mtime after a write
    (``touch -r``) is still noticed.
    """
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def hash_files(
    base: Path, relpaths: Iterable[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, list[int]]]:
    """Manifest entries ``{relpath: {"sha256", "size"}}`` plus each file's fingerprint
    while it was hashed.

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
        and is_safe_relpath(rel)
        and isinstance(entry, dict)
        and isinstance(entry.get("size"), int)
        and isinstance(entry.get("sha256"), str)
        and _SHA256.fullmatch(entry["sha256"]) is not None
    )


# --------------------------------------------------------------------------- manifests


def read_manifest(
    folder: Path, kind: str, expect: Mapping[str, Any]
) -> tuple[dict[str, Any] | None, list[str]]:
    """``folder``'s manifest when it is one of ``kind`` with the ``expect``\\ ed fields,
    else None and what is wrong with it."""
    try:
        manifest = read_json_object(folder / MANIFEST_NAME)
    except (FileNotFoundError, NotADirectoryError):
        return None, [f"{MANIFEST_NAME}: missing"]
    except StateError as exc:
        return None, [exc.message]
    problems = _manifest_problems(manifest, kind, expect)
    return (None if problems else manifest), problems


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


def read_fingerprints(folder: Path) -> dict[str, Any]:
    """The fingerprints recorded in ``folder`` ({} when none or unreadable: re-hash)."""
    try:
        data = read_json_object(folder / FINGERPRINTS_NAME)
    except (FileNotFoundError, NotADirectoryError, StateError):
        return {}
    return data.get("files", {}) if isinstance(data.get("files"), dict) else {}


def write_fingerprints(folder: Path, fingerprints: Mapping[str, list[int]]) -> None:
    try:
        write_json_atomic(
            folder / FINGERPRINTS_NAME, {"format": MANIFEST_FORMAT, "files": dict(fingerprints)}
        )
    except OSError as exc:  # a read-only cache still works; checks just re-hash
        log.debug("cannot record fingerprints in %s: %s", folder, exc)


def verify_folder(folder: Path, manifest: Mapping[str, Any], mode: CheckMode) -> list[str]:
    """Problems of ``folder``'s files against ``manifest`` (fingerprints first, as ``mode``
    says); the fingerprints of what had to be re-hashed and matched are recorded."""
    check = check_files(folder, manifest["files"], read_fingerprints(folder), mode)
    if not check.problems and check.rehashed:
        write_fingerprints(folder, check.fingerprints)
    return check.problems + [
        f"{rel}: modified since last verified (verify to check)" for rel in check.unverified
    ]


def finish_install(
    tmp: Path,
    manifest: Mapping[str, Any],
    hashed: Mapping[str, list[int]],
    owner: Owner,
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
        fsync_path(tmp / rel)
    on_disk = read_json_object(path)
    if on_disk != json.loads(json.dumps(manifest)):
        raise EnvironmentBuildError(f"{path} does not read back as written")
    check = check_files(tmp, on_disk["files"], hashed, "full" if rehash else "auto")
    if check.problems:
        raise EnvironmentBuildError(
            f"new build in {tmp} failed verification",
            details={"problems": check.problems},
        )
    write_fingerprints(tmp, check.fingerprints)
    owner.adopt(tmp / FINGERPRINTS_NAME)
    fsync_path(tmp)


def report_damage(progress: ProgressFn, stage: str, what: str, problems: list[str]) -> None:
    message = f"{what} is damaged ({'; '.join(problems)}); rebuilding"
    log.warning("%s", message)
    progress(ProgressEvent(stage, message))


__all__ = [
    "FINGERPRINTS_NAME",
    "MANIFEST_FORMAT",
    "MANIFEST_NAME",
    "CheckMode",
    "FileCheck",
    "check_files",
    "fingerprint",
    "finish_install",
    "hash_files",
    "is_safe_relpath",
    "read_fingerprints",
    "read_manifest",
    "report_damage",
    "verify_folder",
    "write_fingerprints",
]
