"""On-disk state: atomic versioned JSON records and pid+start-time process identities."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pyro_mcp.errors import StateError
from pyro_mcp.state import (
    SCHEMA_VERSION,
    ProcessId,
    process_start_time,
    read_json,
    write_json_atomic,
)


def test_round_trip(tmp_path: Path) -> None:
    record = {"vm_id": "vm-0123456789ab", "n": 3, "nested": {"a": [1, 2]}, "none": None}
    path = tmp_path / "vm.json"
    write_json_atomic(path, record)
    assert read_json(path) == record
    assert json.loads(path.read_text())["schema"] == SCHEMA_VERSION
    # Overwriting replaces the whole record and leaves no temporary files.
    write_json_atomic(path, {"n": 4})
    assert read_json(path) == {"n": 4}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.json"]


def test_replace_is_atomic_for_concurrent_readers(tmp_path: Path) -> None:
    """A reader never sees a half-written record while another process rewrites it."""
    path = tmp_path / "vm.json"
    write_json_atomic(path, {"i": 0, "pad": "x" * 200_000})
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from pyro_mcp.state import write_json_atomic\n"
            "for i in range(300):\n"
            "    write_json_atomic(Path(sys.argv[1]), {'i': i, 'pad': 'x' * 200_000})",
            str(path),
        ]
    )
    seen = set()
    try:
        while writer.poll() is None:
            data = read_json(path)  # raises StateError on a torn read
            assert len(data["pad"]) == 200_000
            seen.add(data["i"])
    finally:
        writer.wait()
    assert read_json(path)["i"] == 299
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.json"]
    assert seen


def test_schema_mismatch_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text(json.dumps({"schema": SCHEMA_VERSION + 1, "vm_id": "x"}))
    with pytest.raises(StateError) as err:
        read_json(path)
    assert err.value.hint and str(tmp_path) in err.value.hint
    path.write_text(json.dumps({"vm_id": "x"}))  # no schema at all
    with pytest.raises(StateError):
        read_json(path)
    path.write_text(json.dumps([1, 2]))
    with pytest.raises(StateError):
        read_json(path)


def test_unreadable_record_is_a_state_error(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    path.write_text('{"schema": 1, "vm_id": ')  # truncated
    with pytest.raises(StateError) as err:
        read_json(path)
    assert err.value.hint
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_failed_write_keeps_the_old_record(tmp_path: Path) -> None:
    path = tmp_path / "vm.json"
    write_json_atomic(path, {"n": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"n": object()})
    assert read_json(path) == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm.json"]


def test_process_identity_of_a_live_process() -> None:
    me = ProcessId.of(os.getpid())
    assert me is not None
    assert me.alive()
    assert ProcessId.from_dict(me.to_dict()) == me


def test_reused_pid_is_not_alive() -> None:
    """Same pid, different start time: another process got the pid, ours is gone."""
    start = process_start_time(os.getpid())
    assert start is not None
    assert not ProcessId(os.getpid(), start + 1).alive()
    assert not ProcessId(os.getpid(), start - 1).alive()


def test_exited_and_zombie_processes_are_not_alive() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    ident = ProcessId.of(child.pid)
    assert ident is not None and ident.alive()
    child.kill()
    # Not yet waited for: a zombie still has /proc/PID but is dead.
    deadline = time.monotonic() + 10
    while ident.alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not ident.alive()
    child.wait()
    assert not ident.alive()
    assert ProcessId.of(child.pid) is None


@pytest.mark.parametrize(
    "data", [None, {}, {"pid": "x", "start_time": 1}, {"pid": 1}, [1, 2], "pid"]
)
def test_malformed_process_ids_are_none(data: object) -> None:
    assert ProcessId.from_dict(data) is None


def test_process_name_with_parentheses_and_spaces(tmp_path: Path) -> None:
    """Field 2 of /proc/PID/stat is the command name, which may hold ') (' and spaces."""
    weird = tmp_path / "a) (b c"
    weird.symlink_to(sys.executable)
    child = subprocess.Popen([str(weird), "-c", "import time; time.sleep(30)"])
    try:
        ident = ProcessId.of(child.pid)
        assert ident is not None
        assert ident.start_time >= (process_start_time(os.getpid()) or 0)
        assert ident.alive()
    finally:
        child.kill()
        child.wait()
