"""The config file: explicit argument > environment variable > config file > built-in;
a bad file is an error naming the file and the key; ``pyro doctor`` shows it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyro_mcp import InvalidInputError, Pyro
from pyro_mcp import config as cfg
from test_cli import pyro_argv


@pytest.fixture
def conf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty config home, every PYRO_* default variable unset."""
    for var in cfg.ENV_VARS.values():
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv(cfg.CONFIG_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    path = tmp_path / "pyro-mcp" / "config.toml"
    path.parent.mkdir()
    yield path


def test_path_follows_xdg_and_pyro_config(conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert cfg.config_path() == conf
    monkeypatch.setenv(cfg.CONFIG_ENV, "/elsewhere/c.toml")
    assert cfg.config_path() == Path("/elsewhere/c.toml")


def test_builtins_without_a_file(conf: Path) -> None:
    settings = cfg.load()
    assert (settings.backend, settings.environment, settings.pool_size) == ("auto", "debian:12", 0)
    assert set(settings.sources.values()) == {"built-in"}
    assert settings.to_dict()["exists"] is False


def test_precedence(conf: Path, monkeypatch: pytest.MonkeyPatch, state_dir: Path) -> None:
    conf.write_text('backend = "host_compat"\nmem_mib = 1024\ntimeout_seconds = 90\n')
    monkeypatch.setenv("PYRO_TIMEOUT_SECONDS", "45")
    settings = cfg.load()
    assert (settings.backend, settings.mem_mib, settings.timeout_seconds) == (
        "host_compat",
        1024,
        45,
    )
    assert settings.sources["mem_mib"] == f"config {conf}"
    assert settings.sources["timeout_seconds"] == "env PYRO_TIMEOUT_SECONDS"
    assert settings.sources["pool_size"] == "built-in"
    # the SDK: the file's backend unless the argument or the variable says otherwise
    assert Pyro(reap=False).manager._backend_name == "host_compat"
    monkeypatch.setenv("PYRO_BACKEND", "gvisor")
    assert Pyro(reap=False).manager._backend_name == "gvisor"
    assert Pyro(reap=False, backend="qemu").manager._backend_name == "qemu"
    assert Pyro(reap=False).settings.timeout_seconds == 45


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("mem_mib = 3\n", "mem_mib"),
        ('timeout_seconds = "x"\n', "timeout_seconds"),
        ('backend = "xen"\n', "backend"),
        ("pool_size = 99\n", "pool_size"),
        ("memory = 1\n", "memory"),
    ],
)
def test_bad_values_name_the_file_and_key(conf: Path, text: str, key: str) -> None:
    conf.write_text(text)
    with pytest.raises(InvalidInputError) as info:
        cfg.load()
    assert str(conf) in info.value.message and key in info.value.message
    assert info.value.details["key"] == key


def test_bad_toml_and_bad_variable(conf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    conf.write_text("mem_mib = [\n")
    with pytest.raises(InvalidInputError, match="not valid TOML") as info:
        Pyro(reap=False)
    assert str(conf) in info.value.message
    conf.write_text("")
    monkeypatch.setenv("PYRO_MEM_MIB", "lots")
    with pytest.raises(InvalidInputError, match="PYRO_MEM_MIB"):
        cfg.load()


def _pyro(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*pyro_argv(), *args],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_cli_uses_the_file_and_doctor_shows_it(conf: Path) -> None:
    conf.write_text("mem_mib = 1024\ntimeout_seconds = 77\n")
    assert "[default: 77" in _pyro("task", "exec", "--help").stdout
    assert "[default: 1024" in _pyro("run", "--help").stdout
    text = _pyro("doctor").stdout
    assert f"config: {conf}" in text
    assert f"timeout_seconds = 77  (config {conf})" in text
    assert "pool_size = 0  (built-in)" in text
    data = json.loads(_pyro("doctor", "--json").stdout)["config"]
    assert (data["path"], data["exists"], data["mem_mib"]) == (str(conf), True, 1024)


def test_bad_file_fails_commands_but_not_doctor(conf: Path) -> None:
    conf.write_text("mem_mib = 1\n")
    proc = _pyro("task", "list")
    assert proc.returncode == 125
    assert f"config file {conf}: mem_mib" in proc.stderr
    doctor = json.loads(_pyro("doctor", "--json").stdout)
    check = next(c for c in doctor["checks"] if c["name"] == "config")
    assert check["status"] == "fail" and "mem_mib" in check["detail"]
    assert doctor["ok"] is False
