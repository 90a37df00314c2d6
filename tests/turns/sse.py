"""Helpers for the streamed-turn tests: the app served over real HTTP (uvicorn in the test's event
loop: httpx's in-process transport buffers a whole response, so it cannot show streaming), and an
SSE reader over httpx's streaming API."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from service.api.app import create_app
from service.context import ServiceContext

from ..service_process import free_port


@dataclass(frozen=True)
class Event:
    """One Server-Sent Event as read off the wire."""

    id: str | None
    event: str | None
    data: dict[str, Any]
    retry: int | None = None

    @property
    def type(self) -> str:
        return str(self.data["type"])


@asynccontextmanager
async def served(ctx: ServiceContext) -> AsyncIterator[str]:
    """The app on a free port of 127.0.0.1, in this event loop; its base URL."""
    port = free_port()
    config = uvicorn.Config(
        create_app(ctx, max_body_bytes=64_000),
        host="127.0.0.1",
        port=port,
        log_config=None,
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            if task.done():
                task.result()
            await asyncio.sleep(0.01)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def read_events(response: httpx.Response) -> AsyncIterator[Event]:
    """The events of an SSE response as they arrive (httpx's line iterator over the open stream)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                retry = fields.get("retry")
                yield Event(
                    fields.get("id"), fields.get("event"), json.loads("\n".join(data)), int(retry) if retry else None
                )
            fields, data = {}, []
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value


async def collect(response: httpx.Response) -> list[Event]:
    return [event async for event in read_events(response)]


def sse_headers(headers: dict[str, str], **extra: str) -> dict[str, str]:
    return headers | {"Accept": "text/event-stream"} | extra
