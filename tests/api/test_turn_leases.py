"""A turn's lease: renewed while the model works, taken over (with an outcome on record) when its holder is gone."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.context import ServiceContext
from service.ids import new_id
from service.leases import reap_expired_leases
from service.simulator import FaultSpec, RunningSimulator

from ..conftest import Tenant, asgi_transport
from .helpers import assert_problem, open_conversation, take_turn

LEASE = 0.9  # seconds: short, so that expiry happens within a test


@pytest.fixture
async def short_lease(ctx: ServiceContext) -> ServiceContext:
    return dataclasses.replace(ctx, turn_lease_seconds=LEASE)


@pytest.fixture
async def client(short_lease: ServiceContext, gemini: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    gemini.app.reset()
    transport = asgi_transport(create_app(short_lease))
    async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as http:
        yield http


async def _abandon(engine: AsyncEngine, conversation: str, key_id: str, *, key_digest: str | None = None) -> str:
    """Leave the state a replica killed mid-turn leaves: an expired lease and an in-progress turn."""
    turn_id = new_id("turn")
    async with engine.begin() as connection:
        number = (
            await connection.execute(
                text(
                    "UPDATE conversations SET lease_token = 'lease_dead', lease_expires_at = now() - interval '5 s', "
                    "turn_count = turn_count + 1 WHERE id = :c RETURNING turn_count"
                ),
                {"c": conversation},
            )
        ).scalar_one()
        await connection.execute(
            text(
                "INSERT INTO turns (id, conversation_id, number, status, provider_storage, storage_reason, "
                "policy_version, upstream_attempts, step_count, key_id) VALUES "
                "(:t, :c, :n, 'in_progress', false, 'test', 'v', 0, 0, :k)"
            ),
            {"t": turn_id, "c": conversation, "n": number, "k": key_id},
        )
        if key_digest is not None:
            await connection.execute(
                text(
                    "INSERT INTO idempotency_records (tenant_id, key, conversation_id, fingerprint, turn_id) "
                    "SELECT tenant_id, :d, id, 'x', :t FROM conversations WHERE id = :c"
                ),
                {"d": key_digest, "c": conversation, "t": turn_id},
            )
    return turn_id


async def _turns(engine: AsyncEngine, conversation: str) -> list[tuple[Any, ...]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT number, status, error_code FROM turns WHERE conversation_id = :c ORDER BY number"),
            {"c": conversation},
        )
        return [tuple(row) for row in rows]


async def _key_id(client: httpx.AsyncClient, tenant: Tenant) -> str:
    events = (await client.get("/v1/audit/events", headers=tenant.headers("auditor"))).json()["events"]
    return str(next(e["actor"]["key_id"] for e in events if e["actor"]["role"] == "backend"))


async def test_the_lease_is_renewed_while_the_model_works(
    client: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A model call lasting several lease lengths keeps its lease: a second turn is refused throughout and the first one is stored."""
    conversation = await open_conversation(client, tenant.headers())
    gemini.app.inject(FaultSpec(latency_ms=LEASE * 4 * 1000))
    slow = asyncio.create_task(take_turn(client, tenant.headers(), conversation, "slow one"))
    for _ in range(6):
        await asyncio.sleep(LEASE / 2)
        racing = await client.post(
            f"/v1/conversations/{conversation}/turns", json={"input": "racing"}, headers=tenant.headers()
        )
        assert_problem(racing, 409, "turn-in-progress")
    assert (await slow)["status"] == "completed"
    assert await _turns(engine, conversation) == [(1, "completed", None)]


async def test_a_dead_holders_turn_is_taken_over_and_its_outcome_recorded(
    client: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine
) -> None:
    """The next turn after a holder died closes the abandoned turn as failed/abandoned, records its turn.create against the original key, and turn numbers stay contiguous."""
    conversation = await open_conversation(client, tenant.headers())
    await take_turn(client, tenant.headers(), conversation, "first")
    key_id = await _key_id(client, tenant)
    dead = await _abandon(engine, conversation, key_id)
    turn = await take_turn(client, tenant.headers(), conversation, "after the crash")
    assert turn["turn_number"] == 3
    assert await _turns(engine, conversation) == [
        (1, "completed", None),
        (2, "failed", "abandoned"),
        (3, "completed", None),
    ]
    events = (
        await client.get("/v1/audit/events", params={"resource": dead}, headers=tenant.headers("auditor"))
    ).json()["events"]
    assert [(e["action"], e["outcome"], e["reason"], e["actor"]["key_id"]) for e in events] == [
        ("turn.create", "error", "abandoned", key_id)
    ]
    assert events[0]["details"]["closed_by"] == "takeover"


async def test_the_reaper_closes_turns_nobody_comes_back_to(
    short_lease: ServiceContext, client: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine
) -> None:
    """Without any further request, the reaper closes an abandoned turn once its lease is over, and frees the conversation."""
    conversation = await open_conversation(client, tenant.headers())
    dead = await _abandon(engine, conversation, await _key_id(client, tenant))
    assert await reap_expired_leases(short_lease, grace_seconds=60) == 0  # not expired long enough yet
    assert await reap_expired_leases(short_lease, grace_seconds=0) >= 1
    assert await _turns(engine, conversation) == [(1, "failed", "abandoned")]
    async with engine.connect() as connection:
        lease = (
            await connection.execute(text("SELECT lease_token FROM conversations WHERE id = :c"), {"c": conversation})
        ).scalar_one()
    assert lease is None
    events = (
        await client.get("/v1/audit/events", params={"resource": dead}, headers=tenant.headers("auditor"))
    ).json()["events"]
    assert [(e["reason"], e["details"]["closed_by"]) for e in events] == [("abandoned", "reaper")]


async def test_an_abandoned_idempotency_key_runs_the_turn_again(
    short_lease: ServiceContext, client: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine
) -> None:
    """A client retrying with the Idempotency-Key of a turn whose holder died gets the turn run once more and stored once."""
    from service.keyed_digests import idempotency_key_digest

    conversation = await open_conversation(client, tenant.headers())
    async with engine.connect() as connection:
        tenant_id = (
            await connection.execute(text("SELECT tenant_id FROM conversations WHERE id = :c"), {"c": conversation})
        ).scalar_one()
    digest = idempotency_key_digest(short_lease.pepper, tenant_id, "retry-me")
    await _abandon(engine, conversation, await _key_id(client, tenant), key_digest=digest)
    turn = await take_turn(client, tenant.headers(), conversation, "hello", **{"Idempotency-Key": "retry-me"})
    again = await take_turn(client, tenant.headers(), conversation, "hello", **{"Idempotency-Key": "retry-me"})
    assert turn == again
    assert turn["turn_number"] == 2
    history = (await client.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())).json()["steps"]
    assert sum(1 for s in history if s["step"]["type"] == "user_input") == 1


async def test_failed_turns_record_their_upstream_attempts(
    client: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A turn that failed after three upstream attempts says so on its row and in its turn.create record."""
    conversation = await open_conversation(client, tenant.headers())
    gemini.app.inject(FaultSpec(status=503, retry_after=0, count=3))
    response = await client.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "x"}, headers=tenant.headers()
    )
    assert assert_problem(response, 503, "upstream-failed")["upstream_status"] == 503
    async with engine.connect() as connection:
        attempts = (
            await connection.execute(
                text("SELECT upstream_attempts FROM turns WHERE conversation_id = :c"), {"c": conversation}
            )
        ).scalar_one()
    assert attempts == 3
    events = (
        await client.get("/v1/audit/events", params={"action": "turn.create"}, headers=tenant.headers("auditor"))
    ).json()["events"]
    assert events[-1]["outcome"] == "error"
    assert events[-1]["details"]["upstream_attempts"] == 3
