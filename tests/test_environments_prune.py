"""``EnvironmentStore.prune`` with installs the catalog does not know (custom environments)
and with the unpacked trees of images (environments.tree)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from filelock import FileLock

from pyro_mcp.environments.catalog import EnvironmentSpec
from pyro_mcp.environments.store import EnvironmentStore, InstalledEnvironment
from pyro_mcp.environments.tree import hostfs_root, tree_dirname
from test_environments import BASE, make_store

TOOL_V1 = EnvironmentSpec("acme:tool", "1", "a custom environment, first recipe", ())
TOOL_V2 = EnvironmentSpec("acme:tool", "2", "the same name, a later recipe", ())
OTHER = EnvironmentSpec("other_team:box", "7", "another custom environment", ())


def fake_tree(store: EnvironmentStore, env: InstalledEnvironment) -> Path:
    """What ensure_rootfs_tree leaves for ``env`` (its content does not matter here)."""
    tree = hostfs_root(store.root) / tree_dirname(env.path.name, env.rootfs_sha256)
    (tree / "usr").mkdir(parents=True)
    return tree


def test_custom_installs_are_kept_while_intact_and_current(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cache")
    base = store.ensure(BASE)
    other = store.ensure(OTHER)
    assert store.prune() == []
    assert base.rootfs.exists() and other.rootfs.exists()
    # still usable as is: not rebuilt
    assert store.ensure(OTHER).rootfs_sha256 == other.rootfs_sha256


def test_a_superseded_custom_install_goes(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cache")
    v1 = store.ensure(TOOL_V1)
    v2 = store.ensure(TOOL_V2)  # built later: the current install of acme:tool
    other = store.ensure(OTHER)
    assert store.prune() == [str(v1.path)]
    assert v2.rootfs.exists() and other.rootfs.exists()


def test_the_newest_build_wins_whatever_its_version(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cache")
    v2 = store.ensure(TOOL_V2)
    manifest = json.loads((v2.path / "manifest.json").read_text())
    assert manifest["built_at"]
    v1 = store.ensure(TOOL_V1)  # back to the first recipe, built after v2
    # same second? the folder's own change time decides; make v1 clearly newer
    os.utime(v2.path, ns=(0, 0))
    assert store.prune() == [str(v2.path)]
    assert v1.rootfs.exists()


def test_damaged_and_partial_custom_installs_go(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cache")
    damaged = store.ensure(OTHER)
    damaged.rootfs.chmod(0o644)
    with open(damaged.rootfs, "r+b") as fh:
        fh.write(b"X")  # same size, other content: found by the re-hash
    partial = store.environments_dir / "acme%3Ahalf@1"
    partial.mkdir()
    (partial / "rootfs.ext4").write_bytes(b"no manifest")
    stray = store.environments_dir / "notes.txt"
    stray.write_text("not an install")
    assert set(store.prune()) == {str(damaged.path), str(partial), str(stray)}
    assert list(store.environments_dir.iterdir()) == []


def test_a_misplaced_install_goes(tmp_path: Path) -> None:
    """An install whose folder is not the one its manifest names (moved by hand, or the
    earlier layout) is never what a lookup finds, so it only takes space."""
    store = make_store(tmp_path / "cache")
    env = store.ensure(OTHER)
    moved = store.environments_dir / "other_team_box-7"
    env.path.rename(moved)
    assert store.prune() == [str(moved)]


def test_prune_removes_trees_of_images_no_longer_installed(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cache")
    v1 = store.ensure(TOOL_V1)
    old_tree = fake_tree(store, v1)
    base = store.ensure(BASE)
    base_tree = fake_tree(store, base)
    v2 = store.ensure(TOOL_V2)
    v2_tree = fake_tree(store, v2)
    rebuilt = store.pull(BASE, force=True)  # a new image: base_tree is stale now
    assert rebuilt.rootfs_sha256 != base.rootfs_sha256
    rebuilt_tree = fake_tree(store, rebuilt)
    interrupted = hostfs_root(store.root) / f".tmp-{rebuilt_tree.name}-0123abcd"
    interrupted.mkdir()
    unpacking = hostfs_root(store.root) / f".tmp-{v2_tree.name}x-89abcdef"
    unpacking.mkdir()
    with FileLock(str(hostfs_root(store.root) / f".{v2_tree.name}x.lock")):
        removed = set(store.prune())
    assert removed == {str(v1.path), str(old_tree), str(base_tree), str(interrupted)}
    assert v2_tree.exists() and rebuilt_tree.exists() and unpacking.exists()


def test_prune_leaves_the_trees_of_a_busy_install(tmp_path: Path) -> None:
    store = make_store(tmp_path / "cache")
    env = store.ensure(OTHER)
    tree = fake_tree(store, env)
    stale = hostfs_root(store.root) / tree_dirname(env.path.name, "f" * 64)
    stale.mkdir()
    with FileLock(str(store.locks_dir / f"env-{OTHER.slug}.lock")):
        assert store.prune() == []  # a build of other_team:box is running
    assert store.prune() == [str(stale)]
    assert tree.exists()


def test_pyro_env_prune_removes_what_the_store_no_longer_uses(tmp_path: Path) -> None:
    """The command end to end, on a private cache: leftovers and stale trees go, the
    current install and its tree stay."""
    cache = tmp_path / "cache"
    store = make_store(cache)
    base = store.ensure(BASE)
    base_tree = fake_tree(store, base)
    custom = store.ensure(OTHER)  # its tree would go: the CLI's own keep list is the catalog
    stale_tree = hostfs_root(cache) / tree_dirname(base.path.name, "0" * 64)
    stale_tree.mkdir(parents=True)
    leftover = store.environments_dir / ".tmp-debian%3A12@1.0.0-0123abcd"
    leftover.mkdir()
    env = {**os.environ, "PYRO_CACHE_DIR": str(cache), "PYRO_STATE_DIR": str(tmp_path / "st")}
    proc = subprocess.run(
        [sys.executable, "-m", "pyro_mcp.cli", "env", "prune", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    assert set(json.loads(proc.stdout)["removed"]) == {str(leftover), str(stale_tree)}
    for kept in (base.rootfs, base_tree, custom.rootfs):
        assert kept.exists(), kept
