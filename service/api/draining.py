"""The HTTP side of draining (service/drain.py): count `/v1` requests in flight, refuse new ones
once the replica is stopping, and answer a request the drain had to cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from ..drain import Drain
from ..errors import ShuttingDown

__all__ = ["drain_gate"]

# The probes and the API document stay reachable while draining: /readyz says why it is not ready.
_GATED_PREFIX = "/v1/"


def drain_gate(drain: Drain) -> Callable[[ASGIApp], ASGIApp]:
    """Litestar middleware; ShuttingDown is raised into the one problem+json mapping."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def gated(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP or not scope["path"].startswith(_GATED_PREFIX):
                await app(scope, receive, send)
                return
            if drain.draining:
                raise ShuttingDown()
            started = False

            async def send_tracking(message: Message) -> None:
                nonlocal started
                started = started or message["type"] == "http.response.start"
                await send(message)

            task = asyncio.current_task()
            with drain.request():
                try:
                    await app(scope, receive, send_tracking)
                except asyncio.CancelledError:
                    # Only the drain's own cancellation is answered; a client that went away is not
                    # there to hear anything, and its cancellation goes on up.
                    if not drain.was_cancelled(task) or task is None or started:
                        raise
                    task.uncancel()
                    raise ShuttingDown(
                        "this replica shut down before the request finished: retry it (a turn retried with "
                        "the same Idempotency-Key returns its stored result, or runs again if it stored none)"
                    ) from None

        return gated

    return middleware
