"""Content is scanned only for the caller's own conversation, and never on the event loop when it is large."""

from __future__ import annotations

import asyncio
import time

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.context import ServiceContext
from service.simulator import RunningSimulator

from ..conftest import NewTenant, Tenant, asgi_transport
from .helpers import assert_problem, open_conversation, row_counts

CARD = "4556735267909704"


async def test_no_scan_and_no_detector_record_for_a_conversation_the_caller_cannot_reach(
    api: httpx.AsyncClient, new_tenant: NewTenant, engine: AsyncEngine
) -> None:
    """A card number sent to another tenant's (or a missing) conversation is a 404 with no detector.hit record: ownership is checked before content is scanned."""
    owner: Tenant = await new_tenant()
    stranger: Tenant = await new_tenant()
    theirs = await open_conversation(api, owner.headers())
    before = await row_counts(engine)
    for target in (theirs, "conv_" + "0" * 30):
        response = await api.post(
            f"/v1/conversations/{target}/turns", json={"input": f"card {CARD}"}, headers=stranger.headers()
        )
        assert_problem(response, 404, "conversation-not-found")
    assert await row_counts(engine) == before
    for tenant in (owner, stranger):
        events = (
            await api.get("/v1/audit/events", params={"action": "detector.hit"}, headers=tenant.headers("auditor"))
        ).json()["events"]
        assert events == []


async def test_a_large_input_is_scanned_off_the_event_loop(
    ctx: ServiceContext, gemini: RunningSimulator, tenant: Tenant
) -> None:
    """While a 1 MB input is canonicalised and scanned, the event loop never stalls for more than a small part of the turn (the work runs in a worker thread)."""
    gemini.app.reset()
    app = create_app(ctx, max_body_bytes=1_200_000)
    async with httpx.AsyncClient(transport=asgi_transport(app), base_url="http://t", timeout=120) as client:
        conversation = await open_conversation(client, tenant.headers())
        gaps: list[float] = []
        done = asyncio.Event()

        async def spin() -> None:
            last = time.perf_counter()
            while not done.is_set():
                await asyncio.sleep(0)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        spinner = asyncio.create_task(spin())
        started = time.perf_counter()
        blocks = [{"type": "text", "text": ("a." * 2_000) + " 1-2-3-4 x@y " * 100} for _ in range(180)]
        response = await client.post(
            f"/v1/conversations/{conversation}/turns", json={"input": blocks}, headers=tenant.headers()
        )
        total = time.perf_counter() - started
        done.set()
        await spinner
    assert response.status_code == 200, response.text
    # On the loop, the scan would be one stall covering most of the turn; off it, the loop gets
    # the interpreter back every few milliseconds. A ratio, not a time: it holds on any machine.
    assert max(gaps) < total / 4, (max(gaps), total)
