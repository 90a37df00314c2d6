"""Work that must outlive the request that started it, held until it ends.

A turn whose model has answered must be stored even if its caller goes away or the database is
briefly down; its lease must be renewed while the model works and released when it fails. Those
coroutines run as tasks kept here (the event loop keeps only weak references to tasks), and the
service waits for them, for a bounded time, when it shuts down.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["BackgroundTasks"]

T = TypeVar("T")
logger = logging.getLogger("custody.background")


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, work: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def running(self, name: str) -> bool:
        """Whether a task spawned under this name is still running."""
        return any(task.get_name() == name for task in self._tasks)

    def _finished(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            # Whoever awaited the task has seen the error already; this is for the ones nobody
            # awaits any more (the caller left). The type only: messages may carry anything.
            logger.debug("background task %s ended with %s", task.get_name(), type(error).__name__)

    # A caller's asyncio.timeout would cancel the waiting, not the tasks: the bound is ours to keep.
    async def drain(self, timeout: float) -> None:  # noqa: ASYNC109
        """Wait up to `timeout` seconds for every task, then cancel what is left."""
        if not self._tasks:
            return
        _, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            logger.warning("%d background task(s) cancelled at shutdown", len(pending))
            await asyncio.wait(pending, timeout=1)
