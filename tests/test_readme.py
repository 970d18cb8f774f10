"""The README's and docs' Python snippets and CLI examples run as written
(with the environment name swapped for the test environment, to build only one)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vm

ROOT = Path(__file__).resolve().parent.parent
DOCS_WITH_SNIPPETS = ["README.md", "docs/warm-start.md"]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def snippets() -> list[tuple[str, int, str]]:
    out = []
    for name in DOCS_WITH_SNIPPETS:
        for i, block in enumerate(python_blocks(ROOT / name)):
            out.append((name, i, block))
    return out


@pytest.mark.parametrize(("doc", "index", "code"), snippets(), ids=lambda v: str(v)[:20])
def test_python_snippet_runs(
    doc: str, index: int, code: str, vm_environment: str, state_dir: Path
) -> None:
    source = code.replace('"debian:12"', repr(vm_environment))
    env = {**os.environ, "PYRO_STATE_DIR": str(state_dir), "PYRO_BACKEND": "qemu"}
    proc = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"{doc} snippet {index} failed:\n{proc.stderr}"
    assert not list((state_dir / "vms").glob("vm-*")), "the snippet left a VM behind"


def readme_cli_lines() -> list[str]:
    text = (ROOT / "README.md").read_text()
    usage = text.split("## Using it", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in usage.splitlines() if "pyro run" in line]


def test_readme_run_examples(vm_environment: str, state_dir: Path, tmp_path: Path) -> None:
    """Each `pyro run` line as a shell runs it (pipes included), with this venv's `pyro`
    first on PATH, in a folder holding the `data.csv` a line pipes in."""
    lines = readme_cli_lines()
    assert len(lines) >= 3
    (tmp_path / "data.csv").write_text("a,1\nb,2\nc,3\n")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PYRO_STATE_DIR": str(state_dir),
        "PYRO_BACKEND": "qemu",
        "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}",
    }
    outputs = {}
    for line in lines:
        # The minimal test environment has no Python: that line runs on debian:12 itself.
        command = line
        if "python3" not in line:
            command = line.replace("debian:12 ", f"{shlex.quote(vm_environment)} ")
        proc = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {command}"],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, f"{line}: {proc.stderr}"
        outputs[line] = proc.stdout
    assert "42\n" in outputs.values()
    assert "a\nb\n" in outputs.values()
    assert "3\n" in outputs.values()  # the piped data.csv
    assert any('"exit_code": 0' in out and '"boot"' in out for out in outputs.values())
