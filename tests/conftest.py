"""Shared test fixtures.

VM tests use the user's real cache (so an environment and its snapshot are
built once per machine and CI run) but a private state folder per test, and a
fixture that always cleans up and prints the guest console when a test fails.
Tests that boot a VM or sandbox are marked ``vm``; suite_rules.py enforces that
and, under ``PYRO_REQUIRE_VMS=1``, fails VM tests skipped for a missing backend.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import suite_rules
from pyro_mcp.api import Pyro
from pyro_mcp.errors import PyroError
from pyro_mcp.vmm import host_compat
from suite_rules import (  # noqa: F401 - hooks and an autouse fixture for pytest
    _no_vm_outside_vm_tests,
    pytest_collection_modifyitems,
)

TEST_ENV = os.environ.get("PYRO_TEST_ENV", "debian:12-base")


def _qemu_missing_reason() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (run scripts/bootstrap.sh as root)"
    return None


@functools.cache
def available_backends() -> tuple[str, ...]:
    """The VM backends this machine can run: qemu when QEMU is installed, gvisor when
    runsc is installed and starts a sandbox here (probed once, cached on disk)."""
    from pyro_mcp.vmm.gvisor import runsc_info

    found = [] if _qemu_missing_reason() else ["qemu"]
    info = runsc_info()
    if info is not None and info.works:
        found.append("gvisor")
    return tuple(found)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "backends(*names): run this test only on these VM backends (default: all)"
    )
    suite_rules.configure(config)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test (or fixture) that asks for ``backend`` runs once per available backend,
    limited by ``@pytest.mark.backends("qemu", ...)``."""
    if "backend" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("backends")
    wanted = list(marker.args) if marker else ["qemu", "gvisor"]
    names = [b for b in wanted if b in available_backends()]
    if names:
        metafunc.parametrize("backend", names, ids=names)
    else:
        reason = f"none of the backends {wanted} is available on this machine"
        metafunc.parametrize("backend", [pytest.param(None, marks=pytest.mark.skip(reason))])


@pytest.fixture(scope="session")
def vm_environment() -> str:
    """Build (once) the environment VM tests boot; skip only if QEMU is absent."""
    reason = _qemu_missing_reason()
    if reason:
        pytest.skip(reason)
    Pyro(reap=False).pull_environment(TEST_ENV)
    return TEST_ENV


@pytest.fixture
def state_dir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    # Unix socket paths are limited to 108 bytes: keep this short, not under tmp_path.
    path = Path(tempfile.mkdtemp(prefix="pyro-t-"))
    monkeypatch.setenv("PYRO_STATE_DIR", str(path))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def pyro(vm_environment: str, state_dir: Path, request: pytest.FixtureRequest) -> Iterator[Pyro]:
    """A Pyro on a private state dir; every VM it leaves is deleted afterwards,
    and the guest consoles are printed if the test failed. On the backend the test
    is parametrised with when it asks for ``backend``, else the default (auto or
    PYRO_BACKEND)."""
    backend = request.getfixturevalue("backend") if "backend" in request.fixturenames else None
    client = Pyro(state_dir=state_dir, backend=backend)
    yield client
    failed = getattr(request.node, "rep_call", None)
    for info in client.list_vms():
        if failed is not None and failed.failed:
            console = state_dir / "vms" / info.vm_id / "console.log"
            if console.exists():
                print(f"--- console of {info.vm_id} ---")
                print(console.read_text(errors="replace")[-4000:])
        client.delete_vm(info.vm_id)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    suite_rules.require_backends(report)
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def hc_environment() -> str:
    """The environment host_compat tests use, built once; skipped (saying why) where
    bubblewrap cannot run."""
    probe = host_compat.probe()
    if not probe.available:
        pytest.skip(f"host_compat cannot run here: {probe.reason}")
    try:
        Pyro(reap=False).manager.store.ensure(TEST_ENV)
    except PyroError as exc:
        pytest.skip(f"environment {TEST_ENV} cannot be built here: {exc.message}")
    return TEST_ENV


@pytest.fixture
def hc(hc_environment: str, state_dir: Path) -> Iterator[Pyro]:
    """A Pyro on host_compat that deletes the tasks it left."""
    client = Pyro(state_dir=state_dir, backend="host_compat")
    yield client
    for info in client.list_tasks():
        client.delete_task(info.task_id)
