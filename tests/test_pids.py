"""Where host_compat's pids limit comes from (``vmm/pids.py``), decided from fake
cgroup trees; the real limit is exercised by the fork-bomb tests in
test_host_compat.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pyro_mcp.vmm import pids


def fake_host(tmp_path: Path, self_cgroup: str) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir()
    proc = tmp_path / "self-cgroup"
    proc.write_text(self_cgroup)
    return root, proc


def test_cgroup_v2_needs_pids_enabled_for_our_children(tmp_path: Path) -> None:
    root, proc = fake_host(tmp_path, "0::/system.slice/pyro.service\n")
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    own = root / "system.slice" / "pyro.service"
    own.mkdir(parents=True)
    (own / "cgroup.subtree_control").write_text("memory\n")
    (own.parent / "cgroup.subtree_control").write_text("memory\n")
    assert pids.pids_parent(root, proc) is None
    # A systemd slice enables pids for its units: the leaf goes beside our own cgroup.
    (own.parent / "cgroup.subtree_control").write_text("memory pids\n")
    assert pids.pids_parent(root, proc) == (own.parent, 2)
    # Delegated to us: under our own.
    (own / "cgroup.subtree_control").write_text("memory pids\n")
    assert pids.pids_parent(root, proc) == (own, 2)


def test_cgroup_v2_root_cgroup(tmp_path: Path) -> None:
    root, proc = fake_host(tmp_path, "0::/\n")
    (root / "cgroup.controllers").write_text("cpu pids\n")
    (root / "cgroup.subtree_control").write_text("cpu pids\n")
    assert pids.pids_parent(root, proc) == (root, 2)


def test_cgroup_v1_pids_hierarchy(tmp_path: Path) -> None:
    # A hybrid host: v2 mounted at unified/ without controllers, pids on v1.
    root, proc = fake_host(tmp_path, "8:pids:/\n4:memory:/x\n0::/\n")
    (root / "unified").mkdir()
    (root / "unified" / "cgroup.controllers").write_text("")
    (root / "unified" / "cgroup.subtree_control").write_text("")
    (root / "pids").mkdir()
    (root / "pids" / "cgroup.procs").write_text("1\n")
    assert pids.pids_parent(root, proc) == (root / "pids", 1)


def test_no_pids_controller_at_all(tmp_path: Path) -> None:
    root, proc = fake_host(tmp_path, "4:memory:/\n0::/\n")
    assert pids.pids_parent(root, proc) is None
    missing = tmp_path / "no-such-file"
    assert pids.pids_parent(root, missing) is None


def test_leaf_gets_the_limit_and_is_removed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a fake v1 tree (plain folders): the leaf is made with pids.max, an empty
    leaf is removed on close, and a stale one left by a killed owner is swept."""
    root, proc = fake_host(tmp_path, "8:pids:/\n")
    parent = root / "pids"
    parent.mkdir()
    (parent / "cgroup.procs").write_text("")
    stale = parent / f"{pids.LEAF_PREFIX}1-dead"
    stale.mkdir()
    (stale / "cgroup.procs").write_text("")
    old = os.stat(stale).st_mtime - 2 * pids.STALE_LEAF_AGE_S
    os.utime(stale, (old, old))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    # Plain folders cannot be removed while they hold files; cgroupfs ones can.
    removed: list[Path] = []
    monkeypatch.setattr(Path, "rmdir", lambda self: removed.append(self))  # noqa: PLW0108
    leaf = pids.open_cgroup(77, root, proc)
    assert leaf is not None and leaf.version == 1
    assert leaf.path.parent == parent and leaf.path.name.startswith(
        f"{pids.LEAF_PREFIX}{os.getpid()}-"
    )
    assert (leaf.path / "pids.max").read_text() == "77"
    assert stale in removed
    (leaf.path / "cgroup.procs").write_text("")
    leaf.close(timeout=0.2)
    assert leaf.path in removed


def test_leaf_wrapper_moves_the_command_in(tmp_path: Path) -> None:
    procs = tmp_path / "cgroup.procs"
    procs.write_text("")
    leaf = pids.PidsCgroup(tmp_path, 2)
    out = subprocess.run(
        leaf.wrap(["sh", "-c", "echo $$"]), capture_output=True, text=True, check=False
    )
    assert out.returncode == 0
    assert procs.read_text().strip() == out.stdout.strip()  # exec: the same process


def test_only_root_makes_cgroups(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    root, proc = fake_host(tmp_path, "0::/\n")
    assert pids.open_cgroup(10, root, proc) is None


def test_nproc_fallback_is_for_users_and_counts_their_processes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "getuid", lambda: 0)
    assert pids.nproc_prefix() == []  # host root is exempt from RLIMIT_NPROC
    monkeypatch.setattr(os, "getuid", lambda: 4242)
    monkeypatch.setattr(pids, "tasks_of_uid", lambda uid: 30 if uid == 4242 else 0)
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert pids.nproc_prefix(100) == ["/usr/bin/prlimit", "--nproc=130:130", "--"]


def test_tasks_of_uid_counts_threads() -> None:
    me = os.getuid()
    assert pids.tasks_of_uid(me) >= 1
    assert pids.tasks_of_uid(2**31 - 3) == 0
