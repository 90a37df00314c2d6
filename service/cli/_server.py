"""The HTTP server of `custody serve`: uvicorn's, except that the first stop signal drains."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

from ..drain import Drain
from ._common import say

__all__ = ["DrainingServer"]


class DrainingServer(uvicorn.Server):
    """On the first SIGTERM or SIGINT the replica drains (service/drain.py): not ready at once, no
    new `/v1` request, up to `drain_seconds` for the requests in flight, then the rest cancelled
    (their turns given back) and uvicorn's own shutdown. A second signal stops at once, as plain
    uvicorn does."""

    def __init__(
        self,
        config: uvicorn.Config,
        *,
        drain: Drain,
        drain_seconds: float,
        cancel_wait_seconds: float,
        on_drain: Callable[[], None],
    ) -> None:
        super().__init__(config)
        self._drain = drain
        self._drain_seconds = drain_seconds
        self._cancel_wait_seconds = cancel_wait_seconds
        self._on_drain = on_drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs as a signal handler, between two bytecodes of whatever the loop was doing: flip the
        # flag (readiness and new requests see it at once) and hand the rest to the loop.
        if self._drain.draining or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._drain.begin()
        self._loop.call_soon_threadsafe(self._start_draining)

    def _start_draining(self) -> None:
        say(
            f"custody: stopping: not ready, refusing new requests, up to {self._drain_seconds:g} s for the "
            f"{self._drain.in_flight} in flight (a second signal stops at once)"
        )
        self._on_drain()
        assert self._loop is not None  # noqa: S101 - set by serve() before any signal is handled
        self._draining = self._loop.create_task(self._drain_then_stop())

    async def _drain_then_stop(self) -> None:
        cancelled = await self._drain.finish(self._drain_seconds, cancel_wait=self._cancel_wait_seconds)
        if cancelled:
            say(f"custody: drain time over: {cancelled} request(s) cancelled, their turns given back")
        self.should_exit = True
