"""Draining a replica that is told to stop: refuse new work, let the requests in flight finish.

On SIGTERM (an orchestrator replacing the pod, a rolling update) `custody serve` begins to drain:
`/readyz` answers 503 at once, so the load balancer stops sending traffic here; every new `/v1`
request is refused with 503 `shutting-down` (and `Connection: close`, so the client reconnects
to another replica); the requests already running, turns waiting on the model above all, get up
to `CUSTODY_DRAIN_SECONDS` to finish. Whatever still runs then is cancelled: a cancelled turn
gives its conversation back at once (its lease released, its Idempotency-Key freed, nothing
appended; see service/turns/_engine.py), and its caller is answered 503 `shutting-down`, so a
retry with the same Idempotency-Key runs the turn on another replica right away rather than after
the lease would have run out.

A `Drain` is per process and shared by the HTTP layer (which registers each request with it) and
`custody serve` (which starts it on the signal and waits on it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["Drain"]


class Drain:
    """This replica's requests in flight, and whether it has begun to stop."""

    def __init__(self) -> None:
        self._draining = False
        self._requests: set[asyncio.Task[object]] = set()
        self._cancelled: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        """True once the replica has begun to stop: it is not ready and takes no new request."""
        return self._draining

    @property
    def in_flight(self) -> int:
        return len(self._requests)

    def begin(self) -> None:
        """Stop taking new requests (the ones in flight go on)."""
        self._draining = True

    @contextmanager
    def request(self) -> Iterator[None]:
        """Count the current task as a request in flight while the block runs."""
        task = asyncio.current_task()
        if task is None:  # not inside a task: nothing that could be waited for or cancelled
            yield
            return
        self._requests.add(task)
        self._idle.clear()
        try:
            yield
        finally:
            self._requests.discard(task)
            self._cancelled.discard(task)
            if not self._requests:
                self._idle.set()

    def was_cancelled(self, task: asyncio.Task[object] | None) -> bool:
        """Whether `task`'s cancellation came from the drain (not from its client going away)."""
        return task is not None and task in self._cancelled

    async def finish(self, seconds: float, *, cancel_wait: float) -> int:
        """Wait up to `seconds` for the requests in flight, then cancel the rest and wait up to
        `cancel_wait` for them to give back what they hold; returns how many were cancelled."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout=seconds)
            return 0
        except TimeoutError:
            pass
        late = set(self._requests)
        for task in late:
            self._cancelled.add(task)
            task.cancel()
        if late:
            await asyncio.wait(late, timeout=cancel_wait)
        return len(late)
