"""The rootfs-tree cache (environments.tree): an image unpacked into a folder, once.

Each test makes a small real ext4 image (``mkfs.ext4 -d``) and unpacks it with the
real ``debugfs``, as gvisor and host_compat do with an environment's rootfs.ext4.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp.environments.catalog import EnvironmentSpec
from pyro_mcp.environments.store import EnvironmentStore
from pyro_mcp.environments.tree import (
    READY_MARK,
    ensure_rootfs_tree,
    hostfs_root,
    prune_rootfs_trees,
    tree_dirname,
)
from pyro_mcp.errors import EnvironmentBuildError
from pyro_mcp.fsio import sha256_file
from pyro_mcp.progress import ProgressEvent
from test_environments import BASE, Recorder, fake_kernel_factory

pytestmark = pytest.mark.skipif(
    shutil.which("debugfs") is None or shutil.which("mkfs.ext4") is None,
    reason="needs e2fsprogs (debugfs, mkfs.ext4)",
)


@dataclass(frozen=True)
class Image:
    """An install as ensure_rootfs_tree sees it."""

    name: str
    version: str
    path: Path
    rootfs: Path
    rootfs_sha256: str


def make_ext4(image: Path, marker: str) -> None:
    tree = image.parent / f".src-{image.name}"
    (tree / "usr/bin").mkdir(parents=True)
    (tree / "etc").mkdir()
    (tree / "usr/bin/hello").write_text("#!/bin/sh\necho hello\n")
    (tree / "usr/bin/hello").chmod(0o755)
    (tree / "etc/marker").write_text(marker)
    (tree / "usr/bin/sh").symlink_to("hello")
    (tree / "usr/lib").mkdir()
    (tree / "usr/lib").chmod(0o555)  # read-only folders must not stop a prune
    subprocess.run(
        ["mkfs.ext4", "-q", "-F", "-d", str(tree), str(image), "8M"],
        check=True,
        capture_output=True,
    )
    (tree / "usr/lib").chmod(0o755)
    shutil.rmtree(tree)


def make_image(cache: Path, marker: str = "one", folder: str = "acme%3Aimg@1") -> Image:
    install = cache / "environments" / folder
    install.mkdir(parents=True, exist_ok=True)
    rootfs = install / "rootfs.ext4"
    make_ext4(rootfs, marker)
    return Image("acme:img", "1", install, rootfs, sha256_file(rootfs))


def test_unpacks_once_into_the_cache_of_the_install(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    image = make_image(cache)
    rec = Recorder()
    tree = ensure_rootfs_tree(image, rec)
    assert tree == cache / "hostfs" / f"acme%3Aimg@1-{image.rootfs_sha256[:16]}"
    assert (tree / "etc/marker").read_text() == "one"
    assert os.access(tree / "usr/bin/hello", os.X_OK)
    assert os.readlink(tree / "usr/bin/sh") == "hello"
    for mount_point in ("workspace", "tmp", "run", "root", "dev", "proc"):
        assert (tree / mount_point).is_dir()
    assert (tree / READY_MARK).read_text().split() == ["acme:img", "1", image.rootfs_sha256]
    assert tree.stat().st_mode & 0o777 == 0o755
    assert (cache / "hostfs").stat().st_mode & 0o777 == 0o700
    assert sum("unpacking" in m for m in rec.messages()) == 1
    # Warm: the image is not read again (here it is even gone).
    image.rootfs.unlink()
    again = Recorder()
    assert ensure_rootfs_tree(image, again) == tree
    assert again.messages() == []
    assert [p.name for p in (cache / "hostfs").iterdir() if p.is_dir()] == [tree.name]


def test_a_new_image_gets_a_new_tree(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = ensure_rootfs_tree(make_image(cache, "one"))
    second = ensure_rootfs_tree(make_image(cache, "two"))
    assert first != second
    assert (second / "etc/marker").read_text() == "two"
    assert (first / "etc/marker").read_text() == "one"  # still there until a prune


def test_an_incomplete_tree_is_unpacked_again(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    image = make_image(cache)
    tree = ensure_rootfs_tree(image)
    (tree / READY_MARK).unlink()  # as if an older unpack died before its last step
    (tree / "etc/marker").write_text("stale")
    assert ensure_rootfs_tree(image) == tree
    assert (tree / "etc/marker").read_text() == "one"
    assert not [p for p in (cache / "hostfs").iterdir() if p.name.startswith(".tmp-")]


def test_a_broken_image_fails_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    image = make_image(cache)
    image.rootfs.write_bytes(b"\0" * 4096)
    with pytest.raises(EnvironmentBuildError) as info:
        ensure_rootfs_tree(image)
    assert "pyro env inspect" in (info.value.hint or "")
    assert not [p for p in (cache / "hostfs").iterdir() if p.is_dir()]


def _unpack_in_child(image: Image, log: str) -> None:
    def progress(event: ProgressEvent) -> None:
        with open(log, "a") as fh:
            fh.write(event.message + "\n")

    ensure_rootfs_tree(image, progress)


def test_two_processes_unpack_once(tmp_path: Path) -> None:
    image = make_image(tmp_path / "cache")
    log = tmp_path / "progress.log"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_unpack_in_child, args=(image, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sum("unpacking" in line for line in log.read_text().splitlines()) == 1


def test_prune_keeps_what_it_is_told_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ``pyro env prune`` path: trees of the installed images are named by the caller."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("PYRO_CACHE_DIR", str(cache))
    old = ensure_rootfs_tree(make_image(cache, "one"))
    current = ensure_rootfs_tree(make_image(cache, "two"))
    assert hostfs_root() == cache / "hostfs"
    assert prune_rootfs_trees([current]) == [str(old)]
    assert current.exists() and not old.exists()
    assert prune_rootfs_trees([current.name]) == []


def _ext4_builder(spec: EnvironmentSpec, image: Path, progress: Any) -> Mapping[str, Any]:
    make_ext4(image, f"{spec.name} {os.urandom(4).hex()}")
    return {"tool": "mkfs.ext4"}


def test_store_prune_follows_rebuilds(tmp_path: Path) -> None:
    """After a rebuild the old image's tree goes with ``EnvironmentStore.prune``."""
    cache = tmp_path / "cache"
    store = EnvironmentStore(
        cache, builder=_ext4_builder, kernel_provider=fake_kernel_factory(cache)
    )
    old_tree = ensure_rootfs_tree(store.ensure(BASE))
    assert old_tree.name == tree_dirname("debian%3A12-base@1.0.0", store.ensure(BASE).rootfs_sha256)
    new_tree = ensure_rootfs_tree(store.pull(BASE, force=True))
    assert new_tree != old_tree
    assert store.prune() == [str(old_tree)]
    assert (new_tree / "etc/marker").read_text().startswith(BASE)
