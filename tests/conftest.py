"""Shared test fixtures.

VM tests use the user's real cache (so an environment and its snapshot are
built once per machine and CI run) but a private state folder per test, and a
fixture that always cleans up and prints the guest console when a test fails.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyro_mcp.api import Pyro

TEST_ENV = os.environ.get("PYRO_TEST_ENV", "debian:12-base")


def _qemu_missing_reason() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (run scripts/bootstrap.sh as root)"
    return None


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
    and the guest consoles are printed if the test failed."""
    client = Pyro(state_dir=state_dir)
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
    setattr(item, f"rep_{report.when}", report)
