"""Turns the model answers over several interactions (requires_continuation) are continued, merged and fully recorded."""

from __future__ import annotations

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.simulator import FaultSpec, RunningSimulator

from ..conftest import Tenant
from .helpers import assert_problem, open_conversation, take_turn

PUBLIC = {"route": "public-faq", "data_classes": ["public"]}


async def _ledger(engine: AsyncEngine, conversation: str) -> list[tuple[str, bool]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT id, stored FROM upstream_interactions WHERE conversation_id = :c ORDER BY created_at, id"),
            {"c": conversation},
        )
        return [(row.id, row.stored) for row in rows]


async def test_a_continued_turn_is_merged_replayed_and_every_hop_ledgered(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A turn answered in three hops is one completed turn with every hop's steps, all three interaction ids in the ledger, and a history the model accepts on replay."""
    conversation = await open_conversation(api, tenant.headers())
    turn = await take_turn(api, tenant.headers(), conversation, "tell me everything sim:continue 2")
    assert turn["status"] == "completed"
    texts = [b["text"] for s in turn["steps"] if s["type"] == "model_output" for b in s["content"]]
    assert texts[:2] == ["(part 1 of 3)", "(part 2 of 3)"]
    assert [s["type"] for s in turn["steps"]].count("user_input") == 0  # the hops' echoes are dropped
    creates = gemini.app.creates()
    assert len(creates) == 3
    assert all(body["store"] is False for body in creates)
    assert all(body["input"] == creates[0]["input"] for body in creates[1:])
    ids = [r.response["id"] for r in gemini.app.create_requests()]
    assert {i for i, _ in await _ledger(engine, conversation)} == set(ids)
    # The merged history replays: the strict simulator accepts every stored step.
    after = await take_turn(api, tenant.headers(), conversation, "what did I say first?")
    assert after["output_text"] == 'You first said: "tell me everything sim:continue 2".'


async def test_stored_hops_chain_by_id_and_each_is_a_recorded_provider_copy(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """With provider storage, each continuation names the previous hop, and every hop is a stored copy with its upstream.store record."""
    conversation = await open_conversation(api, tenant.headers(), PUBLIC)
    await take_turn(api, tenant.headers(), conversation, "more sim:continue 1")
    creates = gemini.app.creates()
    first_id = gemini.app.create_requests()[0].response["id"]
    assert creates[1]["previous_interaction_id"] == first_id
    assert "input" not in creates[1]
    ledger = await _ledger(engine, conversation)
    assert len(ledger) == 2
    assert all(stored for _, stored in ledger)
    events = (
        await api.get("/v1/audit/events", params={"action": "upstream.store"}, headers=tenant.headers("auditor"))
    ).json()["events"]
    assert {e["resource"]["id"] for e in events} >= {i for i, _ in ledger}


async def test_a_hop_that_fails_still_leaves_the_earlier_copies_in_the_ledger(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """When the second hop fails, the turn fails and stores nothing, but the first hop's stored copy is in the ledger, to be deleted with the conversation."""
    conversation = await open_conversation(api, tenant.headers(), PUBLIC)
    gemini.app.inject(FaultSpec(count=1))  # the first hop passes
    gemini.app.inject(FaultSpec(status=400, count=1))  # the continuation fails
    failed = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "doomed sim:continue 1"}, headers=tenant.headers()
    )
    assert_problem(failed, 502, "upstream-failed")
    ledger = await _ledger(engine, conversation)
    assert len(ledger) == 1
    assert ledger[0][1] is True
    history = (await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())).json()["steps"]
    assert history == []
    deleted = await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())
    assert deleted.status_code == 200
    assert (await _ledger(engine, conversation))[0][0] not in gemini.app.store.ids()
