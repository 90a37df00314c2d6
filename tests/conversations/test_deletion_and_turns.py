"""Deleting a conversation around its turns: refused while one runs; allowed once the turn's lease ran out, and
then neither the late reply nor a provider copy of that turn survives, and the abandoned turn keeps its outcome on
record; a provider copy whose deletion failed stays pending on the ledger."""

from __future__ import annotations

import asyncio

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.ids import new_id
from service.simulator import FaultSpec, RunningSimulator

from ..api.helpers import assert_problem, open_conversation, row_counts, take_turn
from ..conftest import Tenant
from ..turns.support import (
    FAQ,
    audit,
    conversation_row,
    expire_lease,
    ledger,
    model_called,
    outcomes,
    post_turn,
    turns,
)


def _provider_deletes(gemini: RunningSimulator) -> list[str]:
    return [r.path.rsplit("/", 1)[-1] for r in gemini.app.requests if r.method == "DELETE"]


async def _rows_of(engine: AsyncEngine, conversation: str) -> dict[str, int]:
    """How many rows of each table still belong to the conversation."""
    async with engine.connect() as connection:
        counts = {}
        for table, column in (
            ("conversations", "id"),
            ("data_keys", "conversation_id"),
            ("turns", "conversation_id"),
            ("steps", "conversation_id"),
            ("idempotency_records", "conversation_id"),
        ):
            query = text(f"SELECT count(*) FROM {table} WHERE {column} = :c")
            counts[table] = int((await connection.execute(query, {"c": conversation})).scalar_one())
        return counts


async def test_delete_while_a_turn_runs_is_409_and_deletes_nothing(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """Deleting a conversation while its turn waits for the model is 409 turn-in-progress: no row and no provider copy is deleted, the refusal is audited, the turn is stored as usual, and a later delete erases it all."""
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    await take_turn(api, tenant.headers(), conversation, "What are your opening hours?")
    gemini.app.inject(FaultSpec(latency_ms=1500))
    running = asyncio.create_task(take_turn(api, tenant.headers(), conversation, "And on Sundays?"))
    await model_called(gemini, 2)
    before = await row_counts(engine)

    refused = await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())
    assert_problem(refused, 409, "turn-in-progress")
    assert await row_counts(engine) == before
    assert _provider_deletes(gemini) == []
    assert outcomes(await audit(api, tenant, action="conversation.delete")) == [
        ("conversation.delete", "denied", "turn_in_progress")
    ]
    turn = await running
    assert turn["status"] == "completed"
    assert turn["turn_number"] == 2
    assert await turns(engine, conversation) == [(1, "completed", None), (2, "completed", None)]

    copies = [r.response["id"] for r in gemini.app.create_requests()]
    assert (await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())).status_code == 200
    assert sorted(_provider_deletes(gemini)) == sorted(copies)
    assert not set(copies) & set(gemini.app.store.ids())


async def test_a_conversation_deleted_while_the_model_works_keeps_no_reply_and_no_provider_copy(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """When a conversation is deleted while its model works (the turn's lease had run out), the reply is not stored, the caller gets 404, and the provider copy the turn created is deleted at the provider, ledgered and audited."""
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    gemini.app.inject(FaultSpec(latency_ms=1500))
    late = asyncio.create_task(post_turn(api, tenant, conversation, "What are your opening hours?"))
    await model_called(gemini, 1)
    await expire_lease(engine, conversation)  # its holder stopped renewing: the delete may go ahead
    assert (await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())).status_code == 200
    assert _provider_deletes(gemini) == []  # the copy did not exist yet when the conversation went

    assert_problem(await late, 404, "conversation-not-found")
    (create,) = gemini.app.create_requests()
    assert create.body["store"] is True
    copy = create.response["id"]
    assert copy not in gemini.app.store.ids()
    assert _provider_deletes(gemini) == [copy]
    assert await _rows_of(engine, conversation) == dict.fromkeys(
        ("conversations", "data_keys", "turns", "steps", "idempotency_records"), 0
    )
    (row,) = await ledger(engine, conversation)
    assert (row["id"], row["stored"], row["delete_attempts"], row["last_error"]) == (copy, True, 1, None)
    assert row["deleted_at"] is not None
    assert outcomes(await audit(api, tenant, resource=copy)) == [
        ("upstream.store", "success", None),
        ("upstream.delete", "success", None),
    ]
    (deleted,) = await audit(api, tenant, action="upstream.delete")
    assert deleted["details"]["conversation_id"] == conversation


async def test_a_provider_copy_whose_deletion_failed_stays_pending_on_the_ledger(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """When the provider refuses to delete a copy, the conversation is still deleted (200, with its receipt) and its other copies too, but the failed copy stays on the ledger as pending (no deleted_at, one attempt, its error) with an upstream.delete error record."""
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    await take_turn(api, tenant.headers(), conversation, "Where are you? sim:continue 1")  # two stored copies
    copies = sorted(r.response["id"] for r in gemini.app.create_requests())
    assert len(copies) == 2
    gemini.app.inject(FaultSpec(status=500, count=1))  # the first provider DELETE fails

    assert (await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())).status_code == 200
    assert await conversation_row(engine, conversation) is None
    (failed, succeeded) = _provider_deletes(gemini)
    assert sorted((failed, succeeded)) == copies
    assert failed in gemini.app.store.ids()
    assert succeeded not in gemini.app.store.ids()
    rows = {row["id"]: row for row in await ledger(engine, conversation)}
    assert rows[failed]["deleted_at"] is None
    assert rows[failed]["delete_attempts"] == 1
    assert rows[failed]["last_error"] == "InternalServerError"  # the error's type only, never a body
    assert rows[succeeded]["deleted_at"] is not None
    assert rows[succeeded]["last_error"] is None
    (refused,) = await audit(api, tenant, resource=failed, action="upstream.delete")
    assert (refused["outcome"], refused["reason"]) == ("error", "provider_delete_failed")
    assert refused["details"]["conversation_id"] == conversation
    assert outcomes(await audit(api, tenant, resource=succeeded, action="upstream.delete")) == [
        ("upstream.delete", "success", None)
    ]
    (erased,) = await audit(api, tenant, action="conversation.delete")
    assert erased["outcome"] == "success"
    assert erased["details"]["provider_copies"] == 2


async def test_a_conversation_deleted_while_a_continued_turn_fails_keeps_no_provider_copy(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """When a conversation is deleted while a continued turn works (its lease had run out) and the turn's continuation then fails, the copy its first hop left at the provider is deleted too, as it is when the turn succeeds."""
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    gemini.app.inject(FaultSpec(count=1))  # the first hop answers requires_continuation, stored
    gemini.app.inject(FaultSpec(latency_ms=1500, status=400, count=1))  # the continuation works, then fails
    late = asyncio.create_task(post_turn(api, tenant, conversation, "Where are you? sim:continue 1"))
    await model_called(gemini, 2)  # the first hop's copy is at the provider now
    await expire_lease(engine, conversation)  # its holder stopped renewing: the delete may go ahead
    assert (await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())).status_code == 200

    assert_problem(await late, 502, "upstream-failed")
    first_hop = gemini.app.create_requests()[0].response["id"]
    (row,) = await ledger(engine, conversation)
    assert row["id"] == first_hop
    assert row["stored"] is True
    assert first_hop not in gemini.app.store.ids()
    assert row["deleted_at"] is not None
    assert outcomes(await audit(api, tenant, resource=first_hop, action="upstream.delete")) == [
        ("upstream.delete", "success", None)
    ]


async def _abandon_turn(engine: AsyncEngine, conversation: str, key_id: str) -> str:
    """Leave the state a replica killed mid-turn leaves: an in-progress turn and its expired lease."""
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
    return turn_id


async def test_deleting_a_conversation_whose_turn_was_abandoned_records_the_turns_outcome(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine
) -> None:
    """Deleting a conversation whose turn's holder died (lease expired, turn still in progress) records that turn's outcome (turn.create, error, abandoned) as a takeover or the reaper would, instead of erasing it without one."""
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    (opened,) = await audit(api, tenant, resource=conversation, action="conversation.create")
    dead = await _abandon_turn(engine, conversation, opened["actor"]["key_id"])
    assert (await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())).status_code == 200
    assert outcomes(await audit(api, tenant, resource=dead)) == [("turn.create", "error", "abandoned")]
