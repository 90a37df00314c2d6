"""Idempotency-Keys under concurrency and failure: in flight, abandoned, raced across conversations, freed by a failure."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.simulator import FaultSpec, RunningSimulator

from ..api.helpers import assert_problem, open_conversation, take_turn
from ..conftest import Tenant
from .support import (
    IDEMPOTENCY_KEY,
    PHI,
    audit,
    conversation_row,
    expire_lease,
    history,
    idempotency_rows,
    model_called,
    outcomes,
    post_turn,
    turns,
    user_texts,
    wait_until,
)


async def test_a_key_whose_first_request_still_runs_is_409_in_flight(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """Repeating an Idempotency-Key while its first request still waits for the model is 409 idempotency-key-in-flight and runs nothing; afterwards the key replays the first answer."""
    conversation = await open_conversation(api, tenant.headers(), PHI)
    gemini.app.inject(FaultSpec(latency_ms=1500))
    first = asyncio.create_task(take_turn(api, tenant.headers(), conversation, "once", **{IDEMPOTENCY_KEY: "fly-1"}))
    await model_called(gemini, 1)
    assert_problem(await post_turn(api, tenant, conversation, "once", key="fly-1"), 409, "idempotency-key-in-flight")
    answered = await first
    assert await take_turn(api, tenant.headers(), conversation, "once", **{IDEMPOTENCY_KEY: "fly-1"}) == answered
    assert len(gemini.app.creates()) == 1


async def test_an_abandoned_key_is_taken_over_once_and_the_late_holder_leaves_it_alone(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A retry of an Idempotency-Key whose holder's lease ran out takes the turn over and runs it once; the old holder, answered late, neither stores its reply nor frees the key the retry now holds."""
    conversation = await open_conversation(api, tenant.headers(), PHI)
    gemini.app.inject(FaultSpec(latency_ms=1000))  # the first holder's model call
    first = asyncio.create_task(post_turn(api, tenant, conversation, "pay once", key="pay-1"))
    await model_called(gemini, 1)
    await expire_lease(engine, conversation)  # the first holder is presumed dead
    gemini.app.inject(FaultSpec(latency_ms=3000))  # the retry's model call outlasts the first one's
    retry = asyncio.create_task(
        take_turn(api, tenant.headers(), conversation, "pay once", **{IDEMPOTENCY_KEY: "pay-1"})
    )
    await model_called(gemini, 2)

    assert_problem(await first, 409, "turn-in-progress")  # its lease was lost: its reply is dropped
    assert not retry.done()
    # The late holder released its own turn only: the key is still the running retry's.
    assert_problem(
        await post_turn(api, tenant, conversation, "pay once", key="pay-1"), 409, "idempotency-key-in-flight"
    )
    answered = await retry
    assert answered["status"] == "completed"
    assert answered["turn_number"] == 2
    assert await take_turn(api, tenant.headers(), conversation, "pay once", **{IDEMPOTENCY_KEY: "pay-1"}) == answered
    assert len(gemini.app.creates()) == 2
    assert await turns(engine, conversation) == [(1, "failed", "abandoned"), (2, "completed", None)]
    assert user_texts(await history(api, tenant, conversation)) == ["pay once"]


async def _tenant_id(engine: AsyncEngine, conversation: str) -> str:
    async with engine.connect() as connection:
        return str(
            (
                await connection.execute(text("SELECT tenant_id FROM conversations WHERE id = :c"), {"c": conversation})
            ).scalar_one()
        )


async def _claims_blocked(engine: AsyncEngine, holder: int) -> bool:
    """One claim waits for the chain head `holder` (a backend pid) holds, and the other for the key
    the first one inserted."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT count(*) FILTER (WHERE :holder = ANY(pg_blocking_pids(pid))) AS on_head, "
                    "count(*) FILTER (WHERE wait_event_type = 'Lock' AND query LIKE '%INSERT INTO idempotency_records%') "
                    "AS on_key FROM pg_stat_activity WHERE datname = current_database()"
                ),
                {"holder": holder},
            )
        ).one()
    return bool(row.on_head >= 1 and row.on_key >= 1)


async def _race_one_key(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, conversations: tuple[str, str], key: str
) -> list[httpx.Response]:
    """Send the same turn with the same Idempotency-Key on both conversations so that both claims
    pass the key check before either commits, and meet on the key's primary key."""
    # Every claim locks its tenant's audit chain head just before it commits: holding that row
    # keeps the first claim from committing until the second has reached the key too.
    async with engine.connect() as hold:
        transaction = await hold.begin()
        holder = int((await hold.execute(text("SELECT pg_backend_pid()"))).scalar_one())
        await hold.execute(
            text("SELECT seq FROM audit_chain_heads WHERE chain = :t FOR UPDATE"),
            {"t": await _tenant_id(engine, conversations[0])},
        )
        racing = [
            asyncio.create_task(post_turn(api, tenant, conversation, "same words", key=key))
            for conversation in conversations
        ]

        await wait_until(
            lambda: _claims_blocked(engine, holder), what="both claims wait, one on the chain head and one on the key"
        )
        await transaction.commit()
    return list(await asyncio.gather(*racing))


async def test_one_key_racing_on_two_conversations_runs_one_turn(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """The same Idempotency-Key claimed at the same moment on two conversations of one tenant runs one turn: the other request is 409 idempotency-key-in-flight with nothing of it stored, and the key never names two stored turns."""
    one = await open_conversation(api, tenant.headers(), PHI)
    two = await open_conversation(api, tenant.headers(), PHI)
    responses = await _race_one_key(api, tenant, engine, (one, two), "race-1")

    assert sorted(r.status_code for r in responses) == [200, 409]
    (won,) = [c for c, r in zip((one, two), responses, strict=True) if r.status_code == 200]
    (lost,) = [(c, r) for c, r in zip((one, two), responses, strict=True) if r.status_code == 409]
    assert_problem(lost[1], 409, "idempotency-key-in-flight")
    assert len(gemini.app.creates()) == 1
    assert await turns(engine, won) == [(1, "completed", None)]
    assert await turns(engine, lost[0]) == []
    row = await conversation_row(engine, lost[0])
    assert row is not None
    assert row["turn_count"] == 0
    assert row["lease_token"] is None
    assert [(r["conversation_id"], r["answered"]) for r in await idempotency_rows(engine, one, two)] == [(won, True)]
    # Afterwards the key belongs to the winner: it replays there and is a reuse anywhere else.
    replayed = await take_turn(api, tenant.headers(), won, "same words", **{IDEMPOTENCY_KEY: "race-1"})
    assert replayed == next(r.json() for r in responses if r.status_code == 200)
    assert_problem(await post_turn(api, tenant, lost[0], "same words", key="race-1"), 422, "idempotency-key-reused")
    assert len(gemini.app.creates()) == 1


async def test_the_request_that_lost_a_key_race_is_audited_as_the_refusal_it_got(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine
) -> None:
    """The request refused 409 idempotency-key-in-flight after losing a race for its key has the same turn.start record as any in-flight refusal (denied, idempotency_key_in_flight), not a database error."""
    one = await open_conversation(api, tenant.headers(), PHI)
    two = await open_conversation(api, tenant.headers(), PHI)
    responses = await _race_one_key(api, tenant, engine, (one, two), "race-2")
    (lost,) = [c for c, r in zip((one, two), responses, strict=True) if r.status_code == 409]
    assert outcomes(await audit(api, tenant, resource=lost, action="turn.start")) == [
        ("turn.start", "denied", "idempotency_key_in_flight")
    ]


async def test_a_turn_the_model_failed_frees_its_key(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A turn the model ended as failed (200, status failed) stores nothing and frees its Idempotency-Key at once: the same key runs the turn again instead of replaying the failure."""
    conversation = await open_conversation(api, tenant.headers(), PHI)
    first = await take_turn(api, tenant.headers(), conversation, "please sim:fail", **{IDEMPOTENCY_KEY: "fail-1"})
    assert (first["status"], first["error_code"], first["steps"]) == ("failed", "model_failed", [])
    assert await idempotency_rows(engine, conversation) == []
    again = await take_turn(api, tenant.headers(), conversation, "please sim:fail", **{IDEMPOTENCY_KEY: "fail-1"})
    assert again["status"] == "failed"
    assert again["turn_number"] == 2
    assert len(gemini.app.creates()) == 2
    assert await turns(engine, conversation) == [(1, "failed", "model_failed"), (2, "failed", "model_failed")]
    assert await history(api, tenant, conversation) == []


async def test_a_failed_model_call_frees_its_key_and_the_retry_is_what_the_key_replays(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A model call that still fails after Custody's retries (503, the model's own status) frees its Idempotency-Key: the retry with the key runs the turn again and succeeds, and from then on the key replays that success."""
    conversation = await open_conversation(api, tenant.headers(), PHI)
    gemini.app.inject(FaultSpec(status=503, retry_after=0, count=3))
    failed = await post_turn(api, tenant, conversation, "try me", key="retry-1")
    assert assert_problem(failed, 503, "upstream-failed")["code"] == "upstream_http_503"
    assert await idempotency_rows(engine, conversation) == []  # released before the 503 was sent
    retried = await take_turn(api, tenant.headers(), conversation, "try me", **{IDEMPOTENCY_KEY: "retry-1"})
    assert retried["status"] == "completed"
    assert retried["turn_number"] == 2
    assert await take_turn(api, tenant.headers(), conversation, "try me", **{IDEMPOTENCY_KEY: "retry-1"}) == retried
    assert len(gemini.app.creates()) == 4  # three failed attempts, one success, no call for the replay
    assert await turns(engine, conversation) == [(1, "failed", "upstream_http_503"), (2, "completed", None)]
    assert user_texts(await history(api, tenant, conversation)) == ["try me"]
