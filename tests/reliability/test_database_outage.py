"""A database outage while the model works: the reply is kept and stored once the database is back, and nothing stays wedged."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator

import httpx
import pytest

from service.api import create_app
from service.context import ServiceContext
from service.database import make_engine, make_sessions
from service.simulator import FaultSpec, RunningSimulator

from ..api.helpers import assert_problem, open_conversation, take_turn
from ..conftest import Tenant, asgi_transport, make_tenant
from .cluster import ThrowawayCluster


@pytest.fixture
async def outage_ctx(ctx: ServiceContext, cluster_database: str) -> AsyncIterator[ServiceContext]:
    """The service wired to the throwaway cluster, with a short lease and a short wait for storage."""
    engine = make_engine(cluster_database)
    yield dataclasses.replace(
        ctx,
        sessions=make_sessions(engine),
        turn_lease_seconds=3,
        turn_store_wait_seconds=1,
        turn_store_retry_seconds=60,
    )
    await engine.dispose()


@pytest.fixture
async def client(outage_ctx: ServiceContext, gemini: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    gemini.app.reset()
    transport = asgi_transport(create_app(outage_ctx))
    async with httpx.AsyncClient(transport=transport, base_url="http://custody.test", timeout=30) as http:
        yield http


async def _background_settled(ctx: ServiceContext) -> None:
    """Waits, a minute at most, for the work the service left running (a reply's store, the lease
    renewal it ends)."""
    for _ in range(1200):
        if not len(ctx.tasks):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{len(ctx.tasks)} background task(s) still running after a minute")


async def _wait_for_create(gemini: RunningSimulator, count: int) -> None:
    for _ in range(500):
        if len(gemini.app.creates()) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the model was never called")


async def test_reply_is_stored_when_the_database_returns(
    outage_ctx: ServiceContext,
    client: httpx.AsyncClient,
    gemini: RunningSimulator,
    cluster: ThrowawayCluster,
) -> None:
    """The database dies while the model works: the caller gets 503 with Retry-After, the reply is stored once the database is back, and the retry with the same key returns it."""
    tenant: Tenant = await make_tenant(outage_ctx)
    conversation = await open_conversation(client, tenant.headers())
    gemini.app.inject(FaultSpec(latency_ms=800))
    first = asyncio.create_task(
        client.post(
            f"/v1/conversations/{conversation}/turns",
            json={"input": "remember this"},
            headers=tenant.headers() | {"Idempotency-Key": "outage-turn"},
        )
    )
    await _wait_for_create(gemini, 1)
    cluster.kill()
    response = await first
    body = assert_problem(response, 503, "database-unavailable")
    assert int(response.headers["retry-after"]) > 0
    assert "Idempotency-Key" in body["detail"]
    # Everything else answers 503 too while the database is gone, never 500.
    for method, path, role in (
        ("GET", f"/v1/conversations/{conversation}", "backend"),
        ("GET", f"/v1/conversations/{conversation}/steps", "backend"),
        ("GET", "/v1/audit/events", "auditor"),
    ):
        down = await client.request(method, path, headers=tenant.headers(role))
        assert_problem(down, 503, "database-unavailable")
        assert down.headers["retry-after"]
    assert (await client.get("/readyz")).status_code == 503

    cluster.start()
    back = time.monotonic()
    await _background_settled(outage_ctx)
    stored_after = time.monotonic() - back
    retried = await take_turn(
        client, tenant.headers(), conversation, "remember this", **{"Idempotency-Key": "outage-turn"}
    )
    assert retried["status"] == "completed"
    assert retried["turn_number"] == 1
    assert len(gemini.app.creates()) == 1  # the reply kept in memory was stored; no second model call
    nxt = await take_turn(client, tenant.headers(), conversation, "what did I say first?")
    assert nxt["output_text"] == 'You first said: "remember this".'
    assert stored_after < 30


async def test_a_turn_claimed_before_the_outage_does_not_wedge_the_conversation(
    outage_ctx: ServiceContext,
    client: httpx.AsyncClient,
    gemini: RunningSimulator,
    cluster: ThrowawayCluster,
) -> None:
    """A turn whose model fails while the database is down still frees the conversation once the database is back."""
    tenant: Tenant = await make_tenant(outage_ctx)
    conversation = await open_conversation(client, tenant.headers())
    gemini.app.inject(FaultSpec(latency_ms=500, status=400))
    first = asyncio.create_task(
        client.post(f"/v1/conversations/{conversation}/turns", json={"input": "x"}, headers=tenant.headers())
    )
    await _wait_for_create(gemini, 1)
    cluster.kill()
    assert_problem(await first, 502, "upstream-failed")  # the model's failure, not the database's
    cluster.start()
    await _background_settled(outage_ctx)
    turn = await take_turn(client, tenant.headers(), conversation, "after")
    assert turn["turn_number"] == 2
