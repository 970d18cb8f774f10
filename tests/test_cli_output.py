"""One output contract for ``pyro``: headed tables for lists ("no ..." on stderr when
empty), ``-q`` for ids only, ``--json`` on every command (usage errors too) with lists
shaped like the MCP tools' answers and ISO 8601 UTC times; help that shows defaults and
bounds; shell completion.

Real subprocesses on a private state folder. Only the host_compat test starts anything
(a bubblewrap sandbox, marked ``vm``); a VM created with ``create_vm`` is never booted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import pytest

from mcp_helpers import PYRO, mcp_session, serve_params, structured
from pyro_mcp.api import Pyro
from pyro_mcp.errors import InvalidInputError

EXIT_PYRO_ERROR = 125


@pytest.fixture(autouse=True)
def _qemu_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYRO_BACKEND", "qemu")


def pyro(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PYRO), *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def ok(*args: str) -> subprocess.CompletedProcess[str]:
    proc = pyro(*args)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc


def assert_iso_utc(value: Any) -> datetime:
    assert isinstance(value, str), value
    parsed = datetime.fromisoformat(value)
    offset = parsed.utcoffset()
    assert offset is not None and offset.total_seconds() == 0, value
    return parsed


def complete(words: str, env: dict[str, str] | None = None) -> list[str]:
    """What click's completion protocol answers for the last of ``words``."""
    cword = len(words.split()) - (0 if words.endswith(" ") else 1)
    proc = pyro(
        env={"_PYRO_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        | (env or {})
    )
    assert proc.returncode == 0, proc.stderr
    return [line.split(",", 1)[1] for line in proc.stdout.splitlines() if line]


# ------------------------------------------------------------------------- lists


def test_empty_lists(state_dir: Path) -> None:
    for args, key, what in (
        (["task", "list"], "tasks", "no tasks"),
        (["vm", "list"], "vms", "no VMs"),
    ):
        table = ok(*args)
        assert (table.stdout, table.stderr) == ("", f"{what}\n")
        assert ok(*args, "-q").stdout == ""
        assert ok(*args, "--quiet").stderr == ""
        assert json.loads(ok(*args, "--json").stdout) == {key: []}


def test_env_list_table_quiet_and_json(state_dir: Path) -> None:
    lines = ok("env", "list").stdout.splitlines()
    assert lines[0].split() == ["NAME", "VERSION", "INSTALLED", "DESCRIPTION"]
    names = ok("env", "list", "-q").stdout.split()
    assert "debian:12" in names and names == [line.split()[0] for line in lines[1:]]
    data = json.loads(ok("env", "list", "--json").stdout)
    assert list(data) == ["environments"]
    assert [e["name"] for e in data["environments"]] == names
    assert set(data["environments"][0]) == {"name", "version", "description", "installed"}


@pytest.fixture
def created_vm(state_dir: Path) -> Iterator[str]:
    """A VM record that is never booted (create_vm only defines it)."""
    client = Pyro(state_dir=state_dir, backend="qemu")
    try:
        vm_id = client.create_vm("debian:12-base", ttl_seconds=3600).vm_id
    except InvalidInputError as exc:  # pragma: no cover - catalog always has it
        pytest.skip(exc.message)
    yield vm_id
    for info in client.list_vms():
        client.delete_vm(info.vm_id)


def test_vm_list_status_and_timestamps(created_vm: str, state_dir: Path) -> None:
    lines = ok("vm", "list").stdout.splitlines()
    assert lines[0].split() == ["ID", "ENV", "STATUS", "BOOT", "AGE", "EXPIRES", "BACKEND"]
    assert len(lines) == 2 and lines[1].split()[:3] == [created_vm, "debian:12-base", "created"]
    assert "in 59m" in lines[1] or "in 1h" in lines[1]
    assert ok("vm", "list", "-q").stdout == f"{created_vm}\n"

    listed = json.loads(ok("vm", "list", "--json").stdout)
    assert list(listed) == ["vms"] and [v["vm_id"] for v in listed["vms"]] == [created_vm]
    created = assert_iso_utc(listed["vms"][0]["created_at"])
    expires = assert_iso_utc(listed["vms"][0]["expires_at"])
    assert (expires - created).total_seconds() == pytest.approx(3600, abs=1)

    # vm status: a human view (no JSON, no epoch floats) unless --json.
    status = ok("vm", "status", created_vm).stdout
    assert "{" not in status and f"vm_id:        {created_vm}" in status
    assert "created:" in status and "expires:" in status and "1 vCPU, 512 MiB" in status
    assert not re.search(r"\d{10}\.\d", status)
    assert_iso_utc(json.loads(ok("vm", "status", created_vm, "--json").stdout)["created_at"])

    # The SDK: aware datetimes in Python, ISO strings in model_dump() and JSON.
    info = Pyro(state_dir=state_dir, reap=False).status_vm(created_vm)
    assert info.created_at.tzinfo is not None
    dumped = info.model_dump()
    assert assert_iso_utc(dumped["created_at"]) == info.created_at.replace(microsecond=0)
    assert json.loads(info.model_dump_json())["expires_at"] == dumped["expires_at"]
    assert type(info).model_validate(dumped).expires_at == info.expires_at.replace(microsecond=0)

    # Completion of VM ids reads the state folder.
    assert complete("pyro vm status vm-") == [created_vm]


def test_mcp_lists_and_not_found_errors(created_vm: str, state_dir: Path) -> None:
    async def main() -> None:
        async with mcp_session(serve_params(state_dir, "--profile", "full")) as s:
            listed = structured(await s.call_tool("vm_list", {}))
            assert [v["vm_id"] for v in listed["vms"]] == [created_vm]
            assert_iso_utc(listed["vms"][0]["created_at"])
            assert_iso_utc(listed["vms"][0]["expires_at"])
            for tool, args, details in (
                ("vm_status", {"vm_id": "vm-0123456789ab"}, {"vm_id": "vm-0123456789ab"}),
                (
                    "task_status",
                    {"task_id": "task-0123456789ab"},
                    {"task_id": "task-0123456789ab"},
                ),
            ):
                res = await s.call_tool(tool, args)
                assert res.is_error
                error = structured(res)["error"]
                assert error["code"] == "not_found" and error["hint"]
                assert error["details"] == details
            unknown = await s.call_tool("no_such_tool", {})
            error = structured(unknown)["error"]
            assert error["details"]["name"] == "no_such_tool"
            assert "vm_list" in error["details"]["available"]

    anyio.run(main)


# ------------------------------------------------------------- errors and --json


def test_usage_errors_exit_125_and_speak_json(state_dir: Path) -> None:
    bad_env = ["task", "exec", "task-0123456789ab", "--env", "FOO", "--", "true"]
    plain = pyro(*bad_env)
    assert plain.returncode == EXIT_PYRO_ERROR and "FOO=value" in plain.stderr  # FOO unset here
    assert plain.stdout == ""
    as_json = pyro(*bad_env[:-2], "--json", "--", "true")
    assert as_json.returncode == EXIT_PYRO_ERROR
    error = json.loads(as_json.stdout)["error"]
    assert error["code"] == "invalid_input" and "FOO=value" in error["message"]
    assert "pyro task exec --help" in error["hint"]
    for args in (
        ["task", "list", "--bogus", "--json"],
        ["vm", "status", "--json"],
        ["run", "debian:12", "--vcpu-count", "99", "--json", "--", "true"],
        ["--backend", "bogus", "vm", "list", "--json"],
    ):
        proc = pyro(*args)
        assert proc.returncode == EXIT_PYRO_ERROR, args
        assert json.loads(proc.stdout)["error"]["code"] == "invalid_input", args
    # After `--` the words are the guest command's: --json there is not pyro's.
    guest_json = pyro("run", "debian:12", "--vcpu-count", "99", "--", "echo", "--json")
    assert guest_json.returncode == EXIT_PYRO_ERROR and guest_json.stdout == ""


def test_unknown_backend_names_every_choice(state_dir: Path) -> None:
    choices = ("auto", "qemu", "gvisor", "host_compat")
    flag = pyro("--backend", "bogus", "vm", "list")
    assert flag.returncode == EXIT_PYRO_ERROR
    assert all(c in flag.stderr for c in choices)
    from_env = pyro("vm", "list", env={"PYRO_BACKEND": "bogus"})
    assert from_env.returncode == EXIT_PYRO_ERROR
    assert all(c in from_env.stderr for c in choices)
    with pytest.raises(InvalidInputError) as sdk:
        Pyro(backend="bogus", state_dir=state_dir)
    hint = sdk.value.hint or ""
    assert [hint.count(c) for c in ("qemu", "gvisor", "host_compat")] == [1, 1, 1]
    assert "auto" in hint


# ------------------------------------------------------------------- env inspect


def _fake_snapshot(cache: Path, name: str, rootfs: Path, *, old_format: bool = False) -> None:
    folder = cache / "snapshots" / name
    folder.mkdir(parents=True)
    meta: dict[str, Any] = {
        "format": 2,
        "created_at": 1796688053.5,
        "mem_mib": 512,
        "vcpu_count": 1,
        "inputs": {"/k/vmlinuz": [1, 2, 3], str(rootfs): [1, 2, 3]},
    }
    if not old_format:
        meta["rootfs"] = str(rootfs)
    (folder / "meta.json").write_text(json.dumps(meta))


def test_env_inspect_shows_only_its_own_snapshots(state_dir: Path, tmp_path: Path) -> None:
    from pyro_mcp.environments.catalog import get_spec

    cache = tmp_path / "cache"
    installs = {}
    for name in ("debian:12", "debian:12-base"):
        installs[name] = cache / "environments" / get_spec(name).install_dirname
        installs[name].mkdir(parents=True)
    _fake_snapshot(cache, "aaa", installs["debian:12"] / "rootfs.ext4")
    _fake_snapshot(cache, "bbb", installs["debian:12-base"] / "rootfs.ext4")
    _fake_snapshot(cache, "ccc", installs["debian:12-base"] / "rootfs.ext4", old_format=True)
    env = {"PYRO_CACHE_DIR": str(cache)}

    def inspect(name: str) -> dict[str, Any]:
        proc = pyro("env", "inspect", name, "--json", env=env)
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    mine = inspect("debian:12")["snapshots"]
    assert [s["id"] for s in mine] == ["aaa"]
    assert mine[0]["created_at"] == "2026-12-08T00:00:53+00:00"
    assert [s["id"] for s in inspect("debian:12-base")["snapshots"]] == ["bbb", "ccc"]
    assert inspect("debian:12-build")["snapshots"] == []  # not installed

    text = pyro("env", "inspect", "debian:12", env=env).stdout
    assert "snapshot:     aaa" in text and "bbb" not in text
    assert "packages:     bash, coreutils" in text
    assert "('" not in text and "None" not in text and "1796688053" not in text


# ---------------------------------------------------------------- help, completion


def test_help_shows_defaults_and_bounds(state_dir: Path) -> None:
    run_help = " ".join(ok("run", "--help").stdout.split())
    for needle in (
        "[default: 1; 1<=x<=8]",
        "[default: 512; 128<=x<=16384]",
        "[default: 30; 1<=x<=3600]",
        "[default: 600; 10<=x<=604800]",
    ):
        assert needle in run_help
    create_help = " ".join(ok("task", "create", "--help").stdout.split())
    assert "[default: 86400; 10<=x<=604800]" in create_help
    assert "[default: 30; 1<=x<=3600]" in " ".join(ok("task", "exec", "--help").stdout.split())
    assert "[auto|qemu|gvisor|host_compat]" in ok("--help").stdout
    for group in ("vm", "task", "env"):
        commands = ok(group, "--help").stdout.split("Commands:", 1)[1].splitlines()
        for line in commands:
            if line.strip():
                assert len(line.split()) > 1, f"pyro {group}: no description in {line!r}"
    too_many = pyro("run", "debian:12", "--mem-mib", "64", "--", "true")
    assert too_many.returncode == EXIT_PYRO_ERROR and "128<=x<=16384" in too_many.stderr


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_scripts(shell: str, state_dir: Path) -> None:
    script = ok("completion", shell).stdout
    assert "_PYRO_COMPLETE" in script and "pyro" in script
    as_json = json.loads(ok("completion", shell, "--json").stdout)["script"]
    assert as_json.rstrip("\n") == script.rstrip("\n")
    if shell == "bash":
        sourced = subprocess.run(
            ["bash", "-c", f"source <({PYRO} completion bash) && complete -p pyro"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert sourced.returncode == 0, sourced.stderr
        assert "_pyro_completion" in sourced.stdout and sourced.stdout.rstrip().endswith("pyro")
        # bash itself splits `debian:12-b` at ':'; the answer must fit what bash has.
        line = "pyro run debian:12-b"
        script = (
            f"source <({PYRO} completion bash); COMP_LINE='{line}'; COMP_POINT={len(line)}; "
            "COMP_WORDS=(pyro run debian : 12-b); COMP_CWORD=4; _pyro_completion pyro; "
            'printf "%s\\n" "${COMPREPLY[@]}"'
        )
        called = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert called.stdout.split() == ["12-base", "12-build"], called.stderr
    elif shutil.which(shell):
        checked = subprocess.run(
            [shell, "-n"], input=script, capture_output=True, text=True, timeout=60, check=False
        )
        assert checked.returncode == 0, checked.stderr


def test_completion_of_commands_and_environments(state_dir: Path) -> None:
    assert complete("pyro ta") == ["task"]
    assert {"list", "exec", "files"} <= set(complete("pyro task "))
    assert complete("pyro run debian:12-b") == ["debian:12-base", "debian:12-build"]
    assert "debian:12" in complete("pyro env inspect ")
    assert complete("pyro task exec ") == []  # no tasks in this state folder
    assert pyro("completion", "powershell").returncode == EXIT_PYRO_ERROR


# ------------------------------------------------------------ tasks (host_compat)


@pytest.mark.vm
def test_task_list_and_files_with_a_task(state_dir: Path) -> None:
    from pyro_mcp.vmm import host_compat

    probe = host_compat.probe()
    if not probe.available:
        pytest.skip(f"host_compat cannot run here: {probe.reason}")
    hc = "--backend", "host_compat"
    task_id = ok(*hc, "task", "create", "debian:12-base").stdout.strip()
    try:
        lines = ok("task", "list").stdout.splitlines()
        assert lines[0].split() == ["ID", "NAME", "ENV", "STATUS", "AGE", "EXPIRES", "SOURCE"]
        row = lines[1].split()
        assert row[:4] == [task_id, "-", "debian:12-base", "ready"] and row[-3:] == [
            "in",
            "23h",
            "-",
        ]
        assert ok("task", "list", "-q").stdout == f"{task_id}\n"
        listed = json.loads(ok("task", "list", "--json").stdout)
        assert [t["task_id"] for t in listed["tasks"]] == [task_id]
        assert_iso_utc(listed["tasks"][0]["created_at"])
        assert_iso_utc(json.loads(ok("task", "status", task_id, "--json").stdout)["expires_at"])
        assert complete("pyro task exec t") == [task_id]
        assert complete("pyro task files ") == [task_id]

        assert (ok("task", "files", task_id).stdout, pyro("task", "files", task_id).stderr) == (
            "",
            "no files\n",
        )
        ok(*hc, "task", "exec", task_id, "--", "sh", "-c", "mkdir d && echo hi > d/a.txt")
        table = ok("task", "files", task_id, "-r").stdout.splitlines()
        assert table[0].split() == ["MODE", "TYPE", "SIZE", "MTIME", "PATH"]
        assert [row.split()[-1] for row in table[1:]] == ["d", "d/a.txt"]
        assert ok("task", "files", task_id, "-r", "-q").stdout.split() == ["d", "d/a.txt"]
    finally:
        # The documented idiom: delete every task of the state folder.
        subprocess.run(
            ["bash", "-c", f"{PYRO} task delete $({PYRO} task list -q) >/dev/null || true"],
            timeout=120,
            check=False,
        )
    assert ok("task", "list", "-q").stdout == ""


def test_every_command_has_json_and_every_option_help() -> None:
    import click

    from pyro_mcp.cli import cli

    def leaves(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Command]]:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                yield from leaves(sub, f"{path} {name}")
        else:
            yield path, cmd

    for path, cmd in leaves(cli, "pyro"):
        assert cmd.help, path
        names = {p.name for p in cmd.params}
        assert "as_json" in names, f"{path} has no --json"
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert param.help, f"{path} {param.opts}: no help"
