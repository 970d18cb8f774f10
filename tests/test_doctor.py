"""``pyro doctor`` never crashes and names each problem with advice (in-process checks;
the CLI face is covered in test_cli.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pyro_mcp import doctor


def checks_by_name(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in data["checks"]}


def test_report_shape_is_json_ready(state_dir: Path) -> None:
    data = doctor.report()
    json.dumps(data)  # serialisable as is
    assert set(data) >= {"ok", "backend", "checks"}
    assert len(data["checks"]) == len(doctor.CHECKS)
    for check in data["checks"]:
        assert check["status"] in ("ok", "warn", "fail")
        assert check["detail"]
        if check["status"] == "fail":
            assert check["advice"], check
    assert data["ok"] == all(c["status"] != "fail" for c in data["checks"])


def test_qemu_missing_from_path(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(state_dir))  # an empty folder: no qemu, no compiler
    monkeypatch.delenv("PYRO_QEMU", raising=False)
    data = doctor.report()
    qemu = checks_by_name(data)["qemu"]
    assert qemu["status"] == "fail"
    assert "not found" in qemu["detail"]
    assert "apt-get install qemu-system-x86" in qemu["advice"]
    assert data["ok"] is False


def test_qemu_override_that_is_not_executable(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = state_dir / "qemu"
    fake.write_text("not a program")
    monkeypatch.setenv("PYRO_QEMU", str(fake))
    qemu = checks_by_name(doctor.report())["qemu"]
    assert qemu["status"] == "fail"
    assert qemu["advice"]


def test_state_and_cache_that_are_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("")
    monkeypatch.setenv("PYRO_STATE_DIR", str(a_file / "state"))
    monkeypatch.setenv("PYRO_CACHE_DIR", str(a_file / "cache"))
    data = doctor.report()
    dirs = checks_by_name(data)["directories"]
    assert dirs["status"] == "fail"
    assert "is not a folder" in dirs["detail"]
    assert "PYRO_STATE_DIR" in dirs["advice"]
    crashed = [c for c in data["checks"] if c["detail"].startswith("check failed")]
    assert crashed == []


def test_unwritable_state_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:
        pytest.skip("root can write to any folder, so this cannot be observed as root")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    monkeypatch.setenv("PYRO_STATE_DIR", str(ro / "state"))
    dirs = checks_by_name(doctor.report())["directories"]
    assert dirs["status"] == "fail"


def test_unknown_backend_is_reported(state_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_BACKEND", "bogus")
    data = doctor.report()
    assert data["backend"]["name"] is None
    assert "bogus" in data["backend"]["error"]


def test_a_crashing_check_does_not_stop_the_others(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def _explodes() -> doctor.Check:
        raise RuntimeError("boom")

    monkeypatch.setattr(doctor, "CHECKS", (_explodes, *doctor.CHECKS))
    data = doctor.report()
    first = data["checks"][0]
    assert first["name"] == "explodes"
    assert first["status"] == "fail"
    assert "boom" in first["detail"]
    assert first["advice"]
    assert len(data["checks"]) == len(doctor.CHECKS)


def test_forced_tcg_is_a_warning_not_a_failure(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYRO_ACCEL", "tcg")
    accel = checks_by_name(doctor.report())["acceleration"]
    assert accel["status"] == "warn"
    assert "PYRO_ACCEL" in accel["detail"]
    assert accel["advice"]
