"""The Task handle and AsyncPyro: their surface follows Pyro's (checked here, so a
new Pyro method without a counterpart fails), and they work on real tasks
(host_compat: real sandboxes, no VM boot)."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
from pathlib import Path

import pytest

from pyro_mcp import AsyncPyro, AsyncTask, NotFoundError, Pyro, Task
from pyro_mcp.handle import TASK_METHODS
from test_cli import pyro_argv


def _public_methods(cls: type) -> set[str]:
    return {
        name
        for name, value in vars(cls).items()
        if not name.startswith("_") and inspect.isfunction(value)
    }


# ------------------------------------------------------------------ surface, no VM
def test_async_pyro_has_every_pyro_method_with_its_signature() -> None:
    missing = _public_methods(Pyro) - set(dir(AsyncPyro))
    assert missing == set(), f"AsyncPyro lacks {missing}: add `name = threaded(Pyro.name)`"
    assert inspect.isasyncgenfunction(AsyncPyro.follow_console_log)  # lines as they come
    for name in _public_methods(Pyro) - {"task", "follow_console_log"}:
        method = getattr(AsyncPyro, name)
        assert inspect.iscoroutinefunction(method), name
        if name != "get_task":
            assert inspect.signature(method) == inspect.signature(getattr(Pyro, name)), name
    assert not inspect.iscoroutinefunction(AsyncPyro.task)  # awaitable and `async with`


def test_task_handle_covers_every_task_method() -> None:
    task_methods = {
        name
        for name in _public_methods(Pyro)
        if list(inspect.signature(getattr(Pyro, name)).parameters)[1:2] == ["task_id"]
    } - {"get_task"}
    assert task_methods == set(TASK_METHODS.values()), "map the new method in TASK_METHODS"
    assert set(TASK_METHODS) <= _public_methods(Task)
    for name in TASK_METHODS:
        assert inspect.iscoroutinefunction(getattr(AsyncTask, name)), name


def test_every_new_public_method_documents_what_it_raises() -> None:
    for cls in (Task, AsyncPyro, AsyncTask):
        for name in _public_methods(cls) | {"task", "get_task"} & set(dir(cls)):
            doc = getattr(cls, name).__doc__ or ""
            assert "Raises:" in doc and "Error" in doc, f"{cls.__name__}.{name}"
    for name in _public_methods(AsyncPyro) | set(TASK_METHODS):
        owner = AsyncTask if name in TASK_METHODS else AsyncPyro
        doc = getattr(owner, name).__doc__ or ""
        if name not in ("task", "get_task"):
            assert "CancelledError" in doc, name


def test_missing_task_raises_the_sdk_hint(state_dir: Path) -> None:
    pyro = Pyro(state_dir=state_dir, reap=False)
    with pytest.raises(NotFoundError, match="does not exist") as info:
        pyro.get_task("task-0123456789ab")
    assert "list_tasks()" in (info.value.hint or "")

    async def main() -> None:
        with pytest.raises(NotFoundError):
            await AsyncPyro(pyro).status_task("task-0123456789ab")

    asyncio.run(main())


# ------------------------------------------------------------------ real tasks


@pytest.mark.vm
def test_task_handle_works_and_deletes_on_exit(
    hc: Pyro, hc_environment: str, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("one\n")
    with hc.task(hc_environment, source_path=src) as task:
        assert task.task_id.startswith("task-") and task.info.environment == hc_environment
        assert task.exec("cat a.txt").stdout == "one\n"
        task.write_file("b.txt", "two\n")
        assert task.read_file("b.txt").content == "two\n"
        assert task.read_bytes("b.txt") == b"two\n"
        assert task.edit_file("a.txt", "one", "uno").replacements == 1
        assert {e.path for e in task.list_files().entries} >= {"a.txt", "b.txt"}
        assert "uno" in task.diff().patch
        task.export(tmp_path / "out")
        assert (tmp_path / "out" / "b.txt").read_text() == "two\n"
        task.reset()
        assert task.exec("cat a.txt").stdout == "one\n"
        assert task.status().task_id == task.task_id
        again = hc.get_task(task.task_id, keep=True)
        assert again.exec("ls").exit_code == 0
    assert hc.list_tasks() == []
    with pytest.raises(NotFoundError):
        hc.status_task(task.task_id)


@pytest.mark.vm
def test_task_handle_deletes_after_an_exception_and_keeps_with_keep(
    hc: Pyro, hc_environment: str
) -> None:
    with pytest.raises(RuntimeError, match="boom"), hc.task(hc_environment) as task:
        task.exec("true")
        raise RuntimeError("boom")
    assert hc.list_tasks() == []

    with hc.task(hc_environment, keep=True) as kept:
        pass
    assert [t.task_id for t in hc.list_tasks()] == [kept.task_id]
    kept.delete()
    with hc.get_task(task_id := hc.create_task(hc_environment).task_id) as existing:
        assert existing.task_id == task_id
    assert hc.list_tasks() == []


@pytest.mark.vm
def test_async_pyro_runs_two_commands_at_once(hc: Pyro, hc_environment: str) -> None:
    async def main() -> None:
        async with AsyncPyro(hc) as pyro:
            async with pyro.task(hc_environment) as task:
                assert isinstance(task, AsyncTask)
                # The first waits for a file only the second creates: run one after the
                # other, it would time out.
                waiter = task.exec(
                    "while [ ! -e /workspace/go ]; do sleep 0.05; done; echo waited",
                    timeout_seconds=60,
                )
                starter = task.exec("touch /workspace/go; echo started")
                first, second = await asyncio.gather(waiter, starter)
                assert (first.exit_code, first.stdout) == (0, "waited\n")
                assert second.stdout == "started\n"
                await task.write_file("c.txt", "three")
                assert (await task.read_file("c.txt")).content == "three"
                ids = [t.task_id for t in await pyro.list_tasks()]
                assert ids == [task.task_id]
            assert await pyro.list_tasks() == []

            with pytest.raises(RuntimeError):
                async with pyro.task(hc_environment):
                    raise RuntimeError("boom")
            assert await pyro.list_tasks() == []
            awaited = await pyro.task(hc_environment)
            again = await pyro.get_task(awaited.task_id)
            await again.delete()
            assert await pyro.list_tasks() == []

    asyncio.run(main())


@pytest.mark.vm
def test_cancelling_an_await_leaves_the_call_to_its_thread_and_still_deletes(
    hc: Pyro, hc_environment: str
) -> None:
    async def main() -> None:
        pyro = AsyncPyro(hc)
        async with pyro.task(hc_environment) as task:
            running = asyncio.ensure_future(
                task.exec("touch started; sleep 30", timeout_seconds=60)
            )
            while not (await task.list_files()).entries:  # the command has begun
                await asyncio.sleep(0.05)
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
            assert (await task.status()).task_id == task.task_id  # the handle still works
        # the exit deleted the task (stopping the command still running in its thread)
        assert await pyro.list_tasks() == []

    asyncio.run(main())


@pytest.mark.vm
def test_cli_task_create_takes_the_configured_environment(
    hc_environment: str, state_dir: Path, tmp_path: Path
) -> None:
    conf = tmp_path / "config.toml"
    conf.write_text(f'environment = "{hc_environment}"\nbackend = "host_compat"\n')
    env = {**os.environ, "PYRO_CONFIG": str(conf), "PYRO_STATE_DIR": str(state_dir)}
    env.pop("PYRO_BACKEND", None)
    env.pop("PYRO_ENVIRONMENT", None)
    proc = subprocess.run(
        [*pyro_argv(), "task", "create", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert (info["environment"], info["execution_mode"]) == (hc_environment, "host_compat")
    Pyro(state_dir=state_dir, backend="host_compat").delete_task(info["task_id"])


@pytest.mark.vm
def test_task_handle_on_a_microvm(pyro: Pyro, vm_environment: str) -> None:
    with pyro.task(vm_environment) as task:
        result = task.exec("echo hi > f; cat f")
        assert (result.exit_code, result.stdout, result.execution_mode) == (0, "hi\n", "microvm")
    assert pyro.list_tasks() == []
