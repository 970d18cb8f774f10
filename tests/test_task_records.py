"""Task records in the one record store: typed, strict, reaped by the store's loop
(no VM is started here: the records name no VM)."""

from __future__ import annotations

import json
import os
import time
from dataclasses import replace
from pathlib import Path

import pytest

from pyro_mcp.errors import NotFoundError, StateError
from pyro_mcp.manager import VMManager
from pyro_mcp.models import BootKind
from pyro_mcp.records import TaskConfig, TaskRecord, TaskRuntime
from pyro_mcp.state import ProcessId, write_json_atomic
from pyro_mcp.tasks import TaskManager
from pyro_mcp.workspace.seed import SeedResult


def make_record(
    task_id: str, *, creator: ProcessId | None = None, boot: BootKind | None = None
) -> TaskRecord:
    now = time.time()
    config = TaskConfig(
        task_id=task_id,
        environment="debian:12-base",
        vcpu_count=1,
        mem_mib=512,
        network=False,
        ttl_seconds=600,
        created_at=now,
        expires_at=now + 600,
        backend="qemu",
        execution_mode="microvm",
        workspace_seed=SeedResult(
            "directory", "/src", "/workspace", 3, 12, "ab" * 32, (".git",), 5
        ),
    )
    state = TaskRuntime(status="running", environment_version="1.0", creator=creator, boot=boot)
    return TaskRecord(config, state)


@pytest.fixture
def tasks(tmp_path: Path) -> TaskManager:
    return TaskManager(VMManager(state_root=tmp_path, backend="qemu"))


def test_a_task_record_round_trips_in_the_config_runtime_shape(tasks: TaskManager) -> None:
    task_id, folder = tasks.records.create_folder()
    record = make_record(task_id, creator=ProcessId.of(os.getpid()), boot="restored")
    tasks.records.save(record)
    on_disk = json.loads((folder / "task.json").read_text())
    assert sorted(on_disk) == ["config", "runtime", "schema"]
    assert on_disk["config"]["workspace_seed"]["exclude"] == [".git"]
    assert on_disk["runtime"]["creator"]["pid"] == os.getpid()
    assert tasks.records.load(task_id) == record
    assert [r.record_id for r in tasks.records.records()] == [task_id]


@pytest.mark.parametrize(
    ("where", "field", "value"),
    [
        ("runtime", "status", "paused"),  # not a task status
        ("runtime", "boot", "warm"),
        ("config", "workspace_seed", {"mode": "zip"}),
        ("config", "vcpu_count", "two"),
        ("config", "expires_at", None),
    ],
)
def test_a_malformed_task_record_is_a_state_error(
    tasks: TaskManager, where: str, field: str, value: object
) -> None:
    task_id, folder = tasks.records.create_folder()
    data = make_record(task_id).to_dict()
    data[where][field] = value
    write_json_atomic(folder / "task.json", data)
    with pytest.raises(StateError, match="malformed") as err:
        tasks.status(task_id)
    assert err.value.hint and str(folder) in err.value.hint
    assert tasks.list() == []  # an unreadable record is left out of the list
    tasks.delete(task_id)  # and can still be deleted
    assert not folder.exists()


def test_the_store_reaps_expired_interrupted_and_incomplete_tasks(
    tasks: TaskManager, tmp_path: Path
) -> None:
    expired_id, _ = tasks.records.create_folder()
    record = make_record(expired_id)
    tasks.records.save(
        TaskRecord(replace(record.config, expires_at=time.time() - 1), record.runtime)
    )
    interrupted_id, _ = tasks.records.create_folder()
    # A create whose process is gone: "creating", no live creator.
    interrupted = make_record(interrupted_id)
    interrupted.runtime.status = "creating"
    tasks.records.save(interrupted)
    creating_id, _ = tasks.records.create_folder()  # a create still under way
    live = make_record(creating_id, creator=ProcessId.of(os.getpid()))
    live.runtime.status = "creating"
    tasks.records.save(live)
    kept_id, _ = tasks.records.create_folder()
    tasks.records.save(make_record(kept_id))
    incomplete_id, incomplete = tasks.records.create_folder()  # no record, long ago
    os.utime(incomplete, (time.time() - 3600, time.time() - 3600))
    young_id, _ = tasks.records.create_folder()  # no record yet: being created
    orphan_lock = tasks.records.root / ".task-0123456789ab.lock"
    orphan_lock.touch()

    assert tasks.reap_expired() == {
        expired_id: "ttl_expired",
        interrupted_id: "create_interrupted",
        incomplete_id: "incomplete",
    }
    left = sorted(p.name for p in tasks.records.root.iterdir() if not p.name.startswith("."))
    assert left == sorted([creating_id, kept_id, young_id])
    assert not orphan_lock.exists()
    with pytest.raises(NotFoundError, match=f"task {expired_id} does not exist"):
        tasks.status(expired_id)


def test_an_unusable_tasks_folder_is_one_state_error(tmp_path: Path) -> None:
    (tmp_path / "tasks").write_text("not a folder")
    tasks = TaskManager(VMManager(state_root=tmp_path, backend="qemu"))
    with pytest.raises(StateError, match=r"the state folder .*tasks is unusable") as err:
        tasks.records.create_folder()
    assert err.value.hint and "PYRO_STATE_DIR" in err.value.hint
    with pytest.raises(StateError, match="is unusable"):
        tasks.list()
