"""Turn engine guarantees: idempotency, serialization, upstream failures and Custody's retries."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.context import ServiceContext
from service.simulator import FaultSpec, RunningSimulator

from ..conftest import OwnService, Tenant, asgi_transport, make_upstream
from .helpers import assert_problem, open_conversation, row_counts, take_turn


async def test_idempotent_retry_returns_first_result_without_second_call(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """A repeated Idempotency-Key returns the first response and makes no second upstream call."""
    conversation = await open_conversation(api, tenant.headers())
    first = await take_turn(api, tenant.headers(), conversation, "charge me once", **{"Idempotency-Key": "k-1"})
    again = await take_turn(api, tenant.headers(), conversation, "charge me once", **{"Idempotency-Key": "k-1"})
    assert again == first
    assert len(gemini.app.creates()) == 1
    view = (await api.get(f"/v1/conversations/{conversation}", headers=tenant.headers())).json()
    assert view["turn_count"] == 1


async def test_idempotency_key_with_other_body_is_422(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine
) -> None:
    """The same Idempotency-Key with a different body is a 422 and changes nothing."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "first body", **{"Idempotency-Key": "k-2"})
    before = await row_counts(engine)
    response = await api.post(
        f"/v1/conversations/{conversation}/turns",
        json={"input": "second body"},
        headers=tenant.headers() | {"Idempotency-Key": "k-2"},
    )
    assert_problem(response, 422, "idempotency-key-reused")
    assert await row_counts(engine) == before


async def test_concurrent_turns_are_refused_not_interleaved(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """While one turn waits for the model, a second turn on the conversation gets 409 and the history stays linear."""
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(FaultSpec(latency_ms=400))
    slow = asyncio.create_task(
        api.post(f"/v1/conversations/{conversation}/turns", json={"input": "slow one"}, headers=tenant.headers())
    )
    for _ in range(200):  # until the slow turn is waiting on the model (it has claimed by then)
        if gemini.app.creates():
            break
        await asyncio.sleep(0.01)
    racing = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "racing"}, headers=tenant.headers()
    )
    assert_problem(racing, 409, "turn-in-progress")
    assert (await slow).status_code == 200
    after = await take_turn(api, tenant.headers(), conversation, "what did I say first?")
    assert after["output_text"] == 'You first said: "slow one".'
    assert len(gemini.app.creates()) == 2


async def test_transient_failures_are_retried_by_custody(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """Two 503s are retried by Custody itself (the SDK's retries are off): three creates, one stored turn."""
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(FaultSpec(status=503, retry_after=0, count=2))
    turn = await take_turn(api, tenant.headers(), conversation, "eventually")
    assert turn["status"] == "completed"
    assert len(gemini.app.creates()) == 3


async def test_permanent_failure_is_502_and_leaves_history_usable(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """When every attempt fails the turn is a 502 problem, recorded as failed, and the next turn works on the old history."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "before the outage")
    gemini.app.inject(FaultSpec(status=500, retry_after=0, count=3))
    response = await api.post(
        f"/v1/conversations/{conversation}/turns",
        json={"input": "during"},
        headers=tenant.headers() | {"Idempotency-Key": "outage-1"},
    )
    body = assert_problem(response, 502, "upstream-failed")
    assert body["code"] == "upstream_http_500"
    async with engine.connect() as connection:
        status = (
            await connection.execute(
                text("SELECT status, error_code FROM turns WHERE conversation_id = :c ORDER BY number"),
                {"c": conversation},
            )
        ).all()
    assert [tuple(row) for row in status] == [("completed", None), ("failed", "upstream_http_500")]
    retried = await take_turn(api, tenant.headers(), conversation, "during", **{"Idempotency-Key": "outage-1"})
    assert retried["status"] == "completed"
    first = await take_turn(api, tenant.headers(), conversation, "what did I say first?")
    assert first["output_text"] == 'You first said: "before the outage".'


async def test_client_errors_upstream_are_not_retried(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """A 400 from the model service is not retried."""
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(FaultSpec(status=400))
    assert_problem(
        await api.post(f"/v1/conversations/{conversation}/turns", json={"input": "x"}, headers=tenant.headers()),
        502,
        "upstream-failed",
    )
    assert len(gemini.app.creates()) == 1


async def test_upstream_timeout_is_504(ctx: ServiceContext, gemini: RunningSimulator, tenant: Tenant) -> None:
    """A model call that outlives the upstream timeout on every attempt is a 504 problem (with store=false each timed-out attempt is retried), and releases the conversation."""
    upstream = make_upstream(gemini, attempts=3, timeout_seconds=0.3)
    app = create_app(dataclasses.replace(ctx, upstream=upstream))
    gemini.app.reset()
    async with httpx.AsyncClient(transport=asgi_transport(app), base_url="http://t") as client:
        conversation = await open_conversation(client, tenant.headers())
        gemini.app.inject(FaultSpec(hang_seconds=3, count=3))
        response = await client.post(
            f"/v1/conversations/{conversation}/turns", json={"input": "slow"}, headers=tenant.headers()
        )
        assert assert_problem(response, 504, "upstream-failed")["code"] == "upstream_timeout"
        assert len(gemini.app.creates()) == 3
        assert (await take_turn(client, tenant.headers(), conversation, "again"))["status"] == "completed"
    await upstream.aclose()


async def test_failed_ledger_write_releases_the_conversation(own_service: OwnService) -> None:
    """If recording the provider's interaction id fails, the turn fails, is audited, and the conversation is free again."""
    # A database of its own: the failing constraint below must not reach other tests' writes.
    api, tenant, engine = own_service.api, own_service.tenant, own_service.engine
    conversation = await open_conversation(api, tenant.headers())
    async with engine.begin() as connection:
        await connection.execute(
            text("ALTER TABLE upstream_interactions ADD CONSTRAINT test_ledger CHECK (false) NOT VALID")
        )
    try:
        failed = await api.post(
            f"/v1/conversations/{conversation}/turns",
            json={"input": "x"},
            headers=tenant.headers() | {"Idempotency-Key": "ledger-1"},
        )
        assert failed.status_code == 500
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("ALTER TABLE upstream_interactions DROP CONSTRAINT test_ledger"))
    retried = await take_turn(api, tenant.headers(), conversation, "x", **{"Idempotency-Key": "ledger-1"})
    assert retried["status"] == "completed"
    assert retried["turn_number"] == 2
    events = (
        await api.get("/v1/audit/events", params={"action": "turn.create"}, headers=tenant.headers("auditor"))
    ).json()["events"]
    assert [(e["outcome"], e["reason"]) for e in events[-2:]] == [("error", "integrity"), ("success", None)]
