"""Two rules of this test suite, enforced (imported into conftest.py as hooks):

1. **``-m "not vm"`` starts no VM or sandbox.** A test whose fixtures boot one
   (:data:`VM_FIXTURES`) must be marked ``vm``: collection stops otherwise. And at
   run time a test not marked ``vm`` gets QEMU, runsc and bwrap behind trap
   scripts (``PYRO_QEMU``, ``PYRO_RUNSC``, ``PATH``) that refuse a boot, a restore,
   a sandbox or a confined command, record it, and make the test fail; probes
   (``-version``, runsc's probe sandbox, bwrap's namespace check) pass through.
2. **Where the backends are installed, a VM test must not skip for lack of one.**
   With ``PYRO_REQUIRE_VMS=1`` (``make test`` sets it: bootstrap installed QEMU,
   runsc and bubblewrap) a skip whose reason says a backend, QEMU, a tool or the
   environment is missing (:data:`MISSING_BACKEND_REASONS`) is reported as a
   failure. Other skips (root-only checks, rootless gVisor's missing cgroup
   limits) stay skips.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_ENV = "PYRO_REQUIRE_VMS"
TRAP_ENV = "PYRO_TEST_VM_TRAP"

#: Fixtures that boot a VM or start a sandbox (directly or through their own fixtures).
VM_FIXTURES = frozenset({"vm_environment", "hc_environment", "real_base", "backend"})

#: Skip reasons (substrings) that mean "a backend or a tool the suite needs is missing".
MISSING_BACKEND_REASONS = (
    "qemu-system-x86_64 is not installed",
    "none of the backends",
    "host_compat cannot run here",
    "cannot be built here",
    "no C compiler installed",
    "needs mmdebstrap or debootstrap",
    "needs apt-get, dpkg-deb and mkfs.ext4",
    "needs dpkg-deb",
    "needs e2fsprogs",
)

# name -> (real binary, how it is found, the shell test that refuses a start)
_TRAPS = {
    "qemu-system-x86_64": (
        "PYRO_QEMU",
        'for a; do case "$a" in -kernel|-incoming) refuse;; esac; done',
    ),
    "runsc": (
        "PYRO_RUNSC",
        'for last; do :; done; case " $* " in *" run "*|*" do "*) '
        'case "$last" in pyro-probe-*) ;; *) refuse;; esac;; esac',
    ),
    "bwrap": ("PATH", 'case " $* " in *" /workspace "*) refuse;; esac'),
}

_SCRIPT = """#!/bin/sh
# pyro-mcp tests (tests/suite_rules.py): {name} for tests not marked `vm`.
args="$*"
refuse() {{
  echo "{name} $args" >> "$PYRO_TEST_VM_TRAP"
  echo "pyro tests: a test not marked vm started {name}; mark it @pytest.mark.vm" >&2
  exit 97
}}
if [ -n "$PYRO_TEST_VM_TRAP" ]; then
  {check}
fi
exec {real} "$@"
"""


def write_traps(folder: Path) -> dict[str, Path]:
    """The trap scripts for the binaries installed here, written only when changed
    (runsc's probe cache is keyed by its binary's path, size and mtime)."""
    folder.mkdir(parents=True, exist_ok=True)
    traps = {}
    for name, (_, check) in _TRAPS.items():
        real = shutil.which(name)
        if real is None:
            continue
        path = folder / name
        text = _SCRIPT.format(name=name, check=check, real=real)
        if not path.exists() or path.read_text() != text:
            tmp = path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.chmod(0o755)
            tmp.replace(path)
        traps[name] = path
    return traps


_traps_key = pytest.StashKey[dict[str, Path]]()


def configure(config: pytest.Config) -> None:
    """Write the trap scripts (called from conftest's ``pytest_configure``)."""
    cache = getattr(config, "cache", None)
    folder = cache.mkdir("pyro-vm-traps") if cache is not None else None
    config.stash[_traps_key] = write_traps(Path(folder)) if folder is not None else {}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    unmarked = [
        item.nodeid
        for item in items
        if item.get_closest_marker("vm") is None
        and VM_FIXTURES & set(getattr(item, "fixturenames", ()))
    ]
    if unmarked:
        raise pytest.UsageError(
            "these tests use a fixture that boots a VM or sandbox "
            f"({', '.join(sorted(VM_FIXTURES))}) but are not marked `vm`:\n  "
            + "\n  ".join(unmarked)
        )


@pytest.fixture(autouse=True)
def _no_vm_outside_vm_tests(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    traps = request.config.stash.get(_traps_key, {})
    if request.node.get_closest_marker("vm") is not None or not traps:
        yield
        return
    record = Path(tempfile.mkdtemp(prefix="pyro-trap-")) / "started"
    monkeypatch.setenv(TRAP_ENV, str(record))
    for name, path in traps.items():
        how = _TRAPS[name][0]
        if how == "PATH":
            monkeypatch.setenv("PATH", f"{path.parent}{os.pathsep}{os.environ.get('PATH', '')}")
        else:
            monkeypatch.setenv(how, str(path))
    try:
        yield
        started = record.read_text() if record.exists() else ""
    finally:
        shutil.rmtree(record.parent, ignore_errors=True)
    if started:
        pytest.fail(
            "this test is not marked `vm` but started a VM or sandbox "
            f"(add @pytest.mark.vm):\n{started}",
            pytrace=False,
        )


def skip_reason(report: pytest.TestReport) -> str | None:
    if not report.skipped or hasattr(report, "wasxfail"):
        return None
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def require_backends(report: pytest.TestReport) -> None:
    """Turn a missing-backend skip into a failure when ``PYRO_REQUIRE_VMS=1``."""
    if os.environ.get(REQUIRE_ENV, "") not in ("1", "true", "yes"):
        return
    reason = skip_reason(report)
    if reason is None or not any(text in reason for text in MISSING_BACKEND_REASONS):
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped for a missing backend or tool, and {REQUIRE_ENV}=1 (make test) says "
        f"they are installed here: {reason}\n(run scripts/bootstrap.sh as root, "
        f"or set {REQUIRE_ENV}=0 on a machine without them)"
    )
