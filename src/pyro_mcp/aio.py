"""The SDK for asyncio: ``from pyro_mcp import AsyncPyro``.

    async with AsyncPyro() as pyro:
        async with pyro.task("debian:12", source_path="./repo") as task:
            a, b = await asyncio.gather(task.exec("make test"), task.exec("make lint"))

One core, a thin second face: every :class:`AsyncPyro` method is derived from the
:class:`~pyro_mcp.api.Pyro` method of the same name (same parameters, same result,
same errors) and runs it in a worker thread (:func:`asyncio.to_thread`), so the event
loop never blocks on VM work and calls made together run together. :class:`AsyncTask`
is :class:`~pyro_mcp.handle.Task` the same way.

Cancellation: cancelling the awaiting asyncio task raises :class:`asyncio.CancelledError`
there at once, but a Python thread cannot be stopped: the call goes on in its worker
thread until it ends by itself (a command runs to its end or its ``timeout_seconds``; a
create finishes and its task stays). Give commands a timeout, and delete what a
cancelled create left (``list_tasks``).

Every method raises what its ``Pyro`` (or ``Task``) method raises, listed in its
"Raises" section, and :class:`asyncio.CancelledError` when the awaiting task is
cancelled.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Generator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

from pyro_mcp.api import Pyro
from pyro_mcp.handle import TASK_METHODS, Task

if TYPE_CHECKING:
    from pyro_mcp.config import Settings
    from pyro_mcp.models import TaskInfo

P = ParamSpec("P")
R = TypeVar("R")
S = TypeVar("S")

_CANCELLED = (
    "asyncio.CancelledError: the awaiting task was cancelled (the call itself "
    "finishes in its thread)."
)


def _doc(name: str, sync: Callable[..., Any]) -> str:
    """``sync``'s docstring (whose Raises section is last: tests/test_sdk_docs.py),
    plus CancelledError and the async note."""
    body = inspect.cleandoc(sync.__doc__ or f"``{name}``")
    note = "Async: runs in a worker thread (see :mod:`pyro_mcp.aio`)."
    if "Raises:" not in body:
        body += "\n\nRaises:\n    PyroError: see the sync method."
    return f"{body}\n    {_CANCELLED}\n\n{note}"


def threaded(
    method: Callable[Concatenate[S, P], R],
) -> Callable[Concatenate[Any, P], Coroutine[Any, Any, R]]:
    """The async twin of ``method`` of the object in ``self.sync``: same parameters,
    same result, run by :func:`asyncio.to_thread`."""
    name = method.__name__

    async def call(self: Any, /, *args: P.args, **kwargs: P.kwargs) -> R:
        bound = getattr(self.sync, name)  # the instance's method (overrides included)
        return await asyncio.to_thread(functools.partial(bound, *args, **kwargs))

    call.__name__ = call.__qualname__ = name
    call.__doc__ = _doc(name, method)
    call.__signature__ = inspect.signature(method)  # type: ignore[attr-defined]  # for help()
    return call


class AsyncTask:
    """:class:`~pyro_mcp.handle.Task` for asyncio: the same methods, awaited.
    ``async with`` it deletes the task on exit (after an exception too) unless
    ``keep``."""

    def __init__(self, task: Task) -> None:
        self.sync = task

    @property
    def task_id(self) -> str:
        return self.sync.task_id

    @property
    def info(self) -> TaskInfo:
        return self.sync.info

    @property
    def keep(self) -> bool:
        return self.sync.keep

    def __repr__(self) -> str:
        return f"Async{self.sync!r}"

    async def __aenter__(self) -> AsyncTask:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Shielded: a cancelled block still deletes its task.
        await asyncio.shield(asyncio.to_thread(self.sync.__exit__, exc_type, exc, tb))

    exec = threaded(Task.exec)
    read_file = threaded(Task.read_file)
    read_bytes = threaded(Task.read_bytes)
    write_file = threaded(Task.write_file)
    edit_file = threaded(Task.edit_file)
    list_files = threaded(Task.list_files)
    diff = threaded(Task.diff)
    export = threaded(Task.export)
    reset = threaded(Task.reset)
    status = threaded(Task.status)
    delete = threaded(Task.delete)


class _PendingTask:
    """What :meth:`AsyncPyro.task` returns: await it for the :class:`AsyncTask`, or
    ``async with`` it to create the task on entry and delete it on exit."""

    def __init__(self, create: Callable[[], Task]) -> None:
        self._create = create
        self._task: AsyncTask | None = None

    async def _get(self) -> AsyncTask:
        if self._task is None:
            self._task = AsyncTask(await asyncio.to_thread(self._create))
        return self._task

    def __await__(self) -> Generator[Any, None, AsyncTask]:
        return self._get().__await__()

    async def __aenter__(self) -> AsyncTask:
        return await self._get()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._task is not None:
            await self._task.__aexit__(exc_type, exc, tb)


class AsyncPyro:
    """:class:`~pyro_mcp.api.Pyro` for asyncio. ``AsyncPyro(**options)`` takes
    ``Pyro``'s options (or ``AsyncPyro(pyro=existing)``); ``sync`` is the ``Pyro``
    underneath. Creating it does a little blocking I/O (the config file, the reap of
    dead processes' leftovers), as ``Pyro()`` does."""

    def __init__(self, pyro: Pyro | None = None, /, **options: Any) -> None:
        """Wrap ``pyro``, or make a ``Pyro(**options)``.

        Raises:
            InvalidInputError: a bad option, or a bad config file or variable
                (docs/config.md).
        """
        self.sync = pyro if pyro is not None else Pyro(**options)

    @property
    def settings(self) -> Settings:
        return self.sync.settings

    async def __aenter__(self) -> AsyncPyro:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def task(
        self, environment: str | None = None, *, keep: bool = False, **options: Any
    ) -> _PendingTask:
        """Create a task: ``async with pyro.task(...) as task`` (deleted on exit unless
        ``keep``) or ``task = await pyro.task(...)``. Options as :meth:`Pyro.task`.

        Raises:
            What :meth:`Pyro.task` raises (InvalidInputError, NotFoundError,
            UnsafeSeedError, EnvironmentBuildError, BackendUnavailableError, BootError,
            LimitError), when awaited or entered.
            asyncio.CancelledError: the awaiting task was cancelled (the task may
            still be created in its thread: delete it with ``list_tasks``).
        """
        return _PendingTask(functools.partial(self.sync.task, environment, keep=keep, **options))

    async def get_task(self, task_id: str, *, keep: bool = False) -> AsyncTask:
        """The :class:`AsyncTask` of an existing task (:meth:`Pyro.get_task`).

        Raises:
            InvalidInputError: ``task_id`` is not a task id.
            NotFoundError: no such task.
        """
        return AsyncTask(await asyncio.to_thread(self.sync.get_task, task_id, keep=keep))

    close = threaded(Pyro.close)
    list_environments = threaded(Pyro.list_environments)
    pull_environment = threaded(Pyro.pull_environment)
    inspect_environment = threaded(Pyro.inspect_environment)
    prune_environments = threaded(Pyro.prune_environments)
    run_in_vm = threaded(Pyro.run_in_vm)
    create_vm = threaded(Pyro.create_vm)
    start_vm = threaded(Pyro.start_vm)
    exec_vm = threaded(Pyro.exec_vm)
    stop_vm = threaded(Pyro.stop_vm)
    delete_vm = threaded(Pyro.delete_vm)
    status_vm = threaded(Pyro.status_vm)
    list_vms = threaded(Pyro.list_vms)
    network_info_vm = threaded(Pyro.network_info_vm)
    create_task = threaded(Pyro.create_task)
    exec_task = threaded(Pyro.exec_task)
    status_task = threaded(Pyro.status_task)
    list_tasks = threaded(Pyro.list_tasks)
    delete_task = threaded(Pyro.delete_task)
    read_task_file = threaded(Pyro.read_task_file)
    read_task_bytes = threaded(Pyro.read_task_bytes)
    write_task_file = threaded(Pyro.write_task_file)
    edit_task_file = threaded(Pyro.edit_task_file)
    list_task_files = threaded(Pyro.list_task_files)
    diff_task = threaded(Pyro.diff_task)
    export_task = threaded(Pyro.export_task)
    reset_task = threaded(Pyro.reset_task)
    reap_expired = threaded(Pyro.reap_expired)
    resolve_task = threaded(Pyro.resolve_task)
    prune_tasks = threaded(Pyro.prune_tasks)
    console_log = threaded(Pyro.console_log)

    async def follow_console_log(
        self, ref: str, *, lines: int = 10, poll_interval: float = 0.2
    ) -> AsyncIterator[str]:
        """:meth:`Pyro.follow_console_log` as an async iterator: each wait for the next
        line runs in a worker thread.

        Raises:
            NotFoundError: no task or VM is ``ref``.
            VMStateError: the task has no VM (host_compat) or its VM is gone.
            CancelledError: the iteration was cancelled (the log is simply not read on).
        """
        lines_iter = self.sync.follow_console_log(ref, lines=lines, poll_interval=poll_interval)
        done = object()
        while True:
            line = await asyncio.to_thread(next, lines_iter, done)
            if line is done:
                return
            assert isinstance(line, str)
            yield line


__all__ = ["TASK_METHODS", "AsyncPyro", "AsyncTask"]
