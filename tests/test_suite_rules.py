"""The suite's own rules (suite_rules.py), checked on small throwaway suites run by
pytester: missing-backend skips fail under PYRO_REQUIRE_VMS=1, a test that boots a
VM must be marked ``vm``, and an unmarked test that starts QEMU fails."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

import suite_rules

pytest_plugins = ["pytester"]

TESTS_DIR = Path(__file__).resolve().parent

CONFTEST = """
import suite_rules
from suite_rules import _no_vm_outside_vm_tests, pytest_collection_modifyitems

def pytest_configure(config):
    config.addinivalue_line("markers", "vm: boots VMs")
    suite_rules.configure(config)

import pytest

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    suite_rules.require_backends(outcome.get_result())
"""

SKIPS = """
import pytest

@pytest.mark.vm
def test_qemu_missing():
    pytest.skip("qemu-system-x86_64 is not installed (run scripts/bootstrap.sh as root)")

@pytest.mark.vm
@pytest.mark.parametrize("backend", [pytest.param(None, marks=pytest.mark.skip(
    "none of the backends ['gvisor'] is available on this machine"))])
def test_no_backend(backend):
    pass

@pytest.fixture
def needs_env():
    pytest.skip("environment debian:12-base cannot be built here: no network")

def test_env_missing(needs_env):
    pass

def test_root_only():
    pytest.skip("needs root")

@pytest.mark.vm
def test_rootless_gvisor():
    pytest.skip("runsc runs rootless here (not root): no cgroup limits to test")

@pytest.mark.xfail(reason="qemu-system-x86_64 is not installed")
def test_xfail():
    assert False
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    # This test itself is not marked vm: its own trap must not reach the inner suite.
    for name in (suite_rules.TRAP_ENV, "PYRO_QEMU", "PYRO_RUNSC"):
        monkeypatch.delenv(name, raising=False)
    pytester.makeconftest(CONFTEST)
    return pytester


@pytest.mark.parametrize("value", ["", "0"])
def test_missing_backends_are_skips_by_default(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv(suite_rules.REQUIRE_ENV, value)
    suite.makepyfile(test_skips=SKIPS)
    suite.runpytest().assert_outcomes(skipped=5, xfailed=1)


def test_required_backends_turn_their_skips_into_failures(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(suite_rules.REQUIRE_ENV, "1")
    suite.makepyfile(test_skips=SKIPS)
    result = suite.runpytest("-rA")
    # Skipped during setup (fixture, skip mark) reads as an error, in the test as a failure.
    result.assert_outcomes(failed=1, errors=2, skipped=2, xfailed=1)
    result.stdout.fnmatch_lines(["*PYRO_REQUIRE_VMS=1*qemu-system-x86_64 is not installed*"])
    assert "needs root" in result.stdout.str()


def test_a_vm_fixture_without_the_vm_mark_stops_collection(suite: pytest.Pytester) -> None:
    suite.makepyfile(
        test_unmarked="""
import pytest

@pytest.fixture
def vm_environment():
    return "debian:12-base"

@pytest.fixture
def pyro(vm_environment):
    return vm_environment

def test_boots(pyro):
    pass

@pytest.mark.vm
def test_marked(pyro):
    pass
"""
    )
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*not marked `vm`*", "*test_unmarked.py::test_boots"])
    assert "test_marked" not in result.stderr.str()


@pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="no QEMU to trap")
def test_an_unmarked_test_that_boots_qemu_fails(suite: pytest.Pytester) -> None:
    """Probes pass through the trap; a boot (``-kernel``) is refused, recorded and
    fails the test; a test marked ``vm`` gets the real QEMU."""
    suite.makepyfile(
        test_boot=f"""
import os, subprocess
import pytest

def run_qemu(*args):
    qemu = os.environ.get("PYRO_QEMU") or "qemu-system-x86_64"
    return subprocess.run([qemu, *args], capture_output=True, text=True, timeout=60)

def test_probe_is_fine():
    assert run_qemu("-version").returncode == 0

def test_boot_is_refused():
    assert run_qemu("-kernel", "/nonexistent", "-display", "none").returncode == 97

@pytest.mark.vm
def test_marked_gets_the_real_qemu():
    assert "PYRO_QEMU" not in os.environ and "{suite_rules.TRAP_ENV}" not in os.environ
"""
    )
    result = suite.runpytest("-rA")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*not marked `vm` but started*", "*-kernel /nonexistent*"])


def test_ci_runs_exactly_the_readmes_test_command() -> None:
    """.ci/run's command is the README quick start's test command, and that command
    (make check) runs the linters, the type checker and the suite with VMs required."""
    root = TESTS_DIR.parent
    quick_start = (root / "README.md").read_text().split("## Quick start", 1)[1]
    block = quick_start.split("```sh\n", 1)[1].split("```", 1)[0]
    readme_test = [line.split("#")[0].strip() for line in block.splitlines() if "test" in line]
    ci = [
        line.strip()
        for line in (root / ".ci/run").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith(("#", "set ", "cd ", "export "))
    ]
    assert readme_test == ci == ["make check"]
    makefile = (root / "Makefile").read_text()
    assert "check: lint typecheck test" in makefile
    assert f"{suite_rules.REQUIRE_ENV}=$({suite_rules.REQUIRE_ENV}) $(UV) run pytest" in makefile
