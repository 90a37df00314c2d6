"""Provider storage where the policy permits it: a turn chains onto the provider's copy of the
history instead of replaying it, falls back to the whole history when that copy is gone, and a
classification that rises to a class forbidding provider storage deletes every copy at once."""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.auth_failures import AuthFailures
from service.config import REPO_ROOT
from service.context import ServiceContext
from service.policy import parse_policy
from service.retention import run_retention
from service.simulator import RunningSimulator

from ..conftest import CANARY, Tenant, asgi_transport
from .helpers import assert_problem, open_conversation, take_turn

CARD = "4111 1111 1111 1111"
# A route that permits provider storage and also allows `pan`, which forbids it: a conversation
# starts public (stored with the provider) and may pick up a card number on the way.
SHOP = {"route": "shop-help", "data_classes": ["public"]}
# The same, but a card number in the model's answer refuses the turn.
SHOP_STRICT = {"route": "shop-strict", "data_classes": ["public"]}
FAQ = {"route": "public-faq", "data_classes": ["public"]}


def _policy_document(**route_changes: Any) -> dict[str, Any]:
    document = yaml.safe_load((REPO_ROOT / "ops" / "policy.example.yaml").read_text(encoding="utf-8"))
    shop = {
        "description": "Questions about orders; a card number may come up.",
        "model": "gemini-3-flash-preview",
        "system_instruction": "Help with orders.",
        "generation_config": {"temperature": 0.2},
        "data_classes": ["public", "pan"],
        "provider_storage": True,
    }
    document["routes"]["shop-help"] = shop | route_changes
    document["routes"]["shop-strict"] = copy.deepcopy(shop) | {"on_detect": {"pan": "block"}}
    return dict(document)


def _client(ctx: ServiceContext, document: dict[str, Any], **changes: Any) -> httpx.AsyncClient:
    own = dataclasses.replace(
        ctx, policy=parse_policy(document, source="test"), auth_failures=AuthFailures(), **changes
    )
    return httpx.AsyncClient(
        transport=asgi_transport(create_app(own, max_body_bytes=64_000)), base_url="http://custody.test"
    )


@pytest.fixture
async def shop(ctx: ServiceContext, gemini: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    """The app under the example policy plus the shop routes."""
    gemini.app.reset()
    async with _client(ctx, _policy_document()) as client:
        yield client


async def _audit(api: httpx.AsyncClient, tenant: Tenant, **params: str) -> list[dict[str, Any]]:
    response = await api.get("/v1/audit/events", params=params | {"limit": "1000"}, headers=tenant.headers("auditor"))
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


async def _turns(engine: AsyncEngine, conversation: str) -> list[tuple[str, bool, str, int]]:
    """(history_sent, provider_storage, status, upstream_attempts) of each turn, in order."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT history_sent, provider_storage, status, upstream_attempts FROM turns "
                "WHERE conversation_id = :c ORDER BY number"
            ),
            {"c": conversation},
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]


async def _chain(engine: AsyncEngine, conversation: str) -> str | None:
    async with engine.connect() as connection:
        value = await connection.scalar(
            text("SELECT provider_chain_id FROM conversations WHERE id = :c"), {"c": conversation}
        )
    return None if value is None else str(value)


async def _ledger(engine: AsyncEngine, conversation: str) -> dict[str, bool]:
    """Each stored copy of the conversation: whether its deletion went through."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT id, deleted_at IS NOT NULL FROM upstream_interactions WHERE conversation_id = :c AND stored"),
            {"c": conversation},
        )
        return {r[0]: r[1] for r in rows}


def _held(gemini: RunningSimulator, ids: Any) -> set[str]:
    """Which of `ids` the simulated provider still holds."""
    return set(ids) & set(gemini.app.store.ids())


async def _history(api: httpx.AsyncClient, tenant: Tenant, conversation: str) -> list[dict[str, Any]]:
    response = await api.get(f"/v1/conversations/{conversation}/steps?limit=500", headers=tenant.headers())
    assert response.status_code == 200, response.text
    return [item["step"] for item in response.json()["steps"]]


def _said(text_: str, interaction_id: str) -> bytes:
    """A model answer saying `text_`, for the simulator to send verbatim (and store under this id)."""
    step = {"type": "model_output", "content": [{"type": "text", "text": text_}]}
    return json.dumps(
        {"id": interaction_id, "status": "completed", "steps": [step], "usage": {"total_tokens": 5}}
    ).encode()


async def test_a_permitted_conversation_chains_onto_the_providers_copy(
    shop: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """After its first turn, a conversation whose route and classes permit provider storage sends only the new input with previous_interaction_id, the route's settings every time; the full history is still stored locally, and the turn records say how the history went."""
    conversation = await open_conversation(shop, tenant.headers(), SHOP)
    for text_ in ("my order is late", "it was order 12", "what did I say first?"):
        await take_turn(shop, tenant.headers(), conversation, text_)
    first, second, third = gemini.app.create_requests()
    assert "previous_interaction_id" not in first.body
    assert second.body["previous_interaction_id"] == first.response["id"]
    assert third.body["previous_interaction_id"] == second.response["id"]
    for request in (second, third):
        assert len(request.body["input"]) == 1  # only the new input
        assert request.body["store"] is True
    for name in ("model", "system_instruction", "generation_config"):
        assert first.body[name] == second.body[name] == third.body[name]
    # The provider's copy carries the history: the model still knows the first message.
    assert "my order is late" in json.dumps(third.response["steps"])
    # Custody's own history is complete, and what a full replay would send.
    history = await _history(shop, tenant, conversation)
    assert [s["type"] for s in history].count("user_input") == 3
    assert len(history) == len(first.body["input"]) + len(first.response["steps"]) + 2 * (
        1 + len(second.response["steps"])
    )
    assert await _turns(engine, conversation) == [
        ("replayed", True, "completed", 1),
        ("chained", True, "completed", 1),
        ("chained", True, "completed", 1),
    ]
    assert await _chain(engine, conversation) == third.response["id"]
    created = await _audit(shop, tenant, action="turn.create")
    assert [e["details"]["history_sent"] for e in created] == ["replayed", "chained", "chained"]
    started = await _audit(shop, tenant, action="turn.start")
    assert [e["details"]["history_chained"] for e in started] == [False, True, True]


async def test_a_copy_gone_at_the_provider_falls_back_to_full_replay(
    shop: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """When the provider has expired the copy to chain onto, the turn is sent again with the whole history on a fresh chain, transparently; the turn and its audit record say so, and the next turn chains onto the new copy."""
    conversation = await open_conversation(shop, tenant.headers(), SHOP)
    await take_turn(shop, tenant.headers(), conversation, "first")
    await take_turn(shop, tenant.headers(), conversation, "second")
    gemini.app.advance(3_700)  # past the simulator's retention in the tests (an hour)
    gemini.app.reset()
    turn = await take_turn(shop, tenant.headers(), conversation, "what did I say first?")
    assert 'You first said: "first"' in turn["output_text"]
    chained, replayed = gemini.app.create_requests()
    assert chained.status == 404
    assert "previous_interaction_id" not in replayed.body
    assert len(replayed.body["input"]) == len(await _history(shop, tenant, conversation)) - len(turn["steps"])
    assert (await _turns(engine, conversation))[-1] == ("replayed_after_chain_lost", True, "completed", 2)
    assert (await _audit(shop, tenant, action="turn.create"))[-1]["details"]["history_sent"] == (
        "replayed_after_chain_lost"
    )
    gemini.app.reset()
    await take_turn(shop, tenant.headers(), conversation, "and now?")
    (create,) = gemini.app.create_requests()
    assert create.body["previous_interaction_id"] == replayed.response["id"]


async def test_copies_older_than_the_chain_age_limit_are_not_chained_onto(
    ctx: ServiceContext, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """The provider may not refuse an expired id (it could answer as if the history were empty), so a copy older than the age limit is never chained onto: the whole history goes, on a fresh chain."""
    gemini.app.reset()
    async with _client(ctx, _policy_document(), provider_chain_max_age_seconds=0) as api:
        conversation = await open_conversation(api, tenant.headers(), SHOP)
        await take_turn(api, tenant.headers(), conversation, "first")
        await take_turn(api, tenant.headers(), conversation, "second")
    assert all("previous_interaction_id" not in body for body in gemini.app.creates())
    assert [t[0] for t in await _turns(engine, conversation)] == ["replayed", "replayed"]
    # The route's provider_ttl limits it the same way.
    gemini.app.reset()
    async with _client(ctx, _policy_document(retention={"provider_ttl": "PT0S"})) as api:
        conversation = await open_conversation(api, tenant.headers(), SHOP)
        await take_turn(api, tenant.headers(), conversation, "first")
        await take_turn(api, tenant.headers(), conversation, "second")
    assert all("previous_interaction_id" not in body for body in gemini.app.creates())


async def test_deleted_copies_are_not_chained_onto(
    shop: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A copy Custody deleted (the ledger says so) stops being the chain: the next turn replays in full without asking the provider first."""
    conversation = await open_conversation(shop, tenant.headers(), SHOP)
    await take_turn(shop, tenant.headers(), conversation, "first")
    chain = await _chain(engine, conversation)
    assert chain is not None
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE upstream_interactions SET deleted_at = now() WHERE id = :i"), {"i": chain}
        )
    gemini.app.reset()
    await take_turn(shop, tenant.headers(), conversation, "second")
    (create,) = gemini.app.create_requests()
    assert "previous_interaction_id" not in create.body
    assert [t[0] for t in await _turns(engine, conversation)] == ["replayed", "replayed"]


async def test_a_card_number_deletes_every_provider_copy_at_once(
    shop: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A public conversation with stored interactions receives a card number: that turn goes with store=false and the whole history, and afterwards the provider holds none of the conversation's interactions, each deletion audited; later turns stay unstored."""
    conversation = await open_conversation(shop, tenant.headers(), SHOP)
    await take_turn(shop, tenant.headers(), conversation, "my order is late")
    await take_turn(shop, tenant.headers(), conversation, "it was order 12")
    stored = await _ledger(engine, conversation)
    assert len(stored) == 2
    assert _held(gemini, stored) == set(stored)
    gemini.app.reset()

    turn = await take_turn(shop, tenant.headers(), conversation, f"{CANARY} charge it to {CARD}")
    assert turn["storage"]["store"] is False
    (create,) = gemini.app.create_requests()
    assert create.body["store"] is False
    assert "previous_interaction_id" not in create.body
    assert len(create.body["input"]) == len(await _history(shop, tenant, conversation)) - len(turn["steps"])
    assert _held(gemini, stored) == set()
    assert await _ledger(engine, conversation) == dict.fromkeys(stored, True)
    assert await _chain(engine, conversation) is None
    deletes = await _audit(shop, tenant, action="upstream.delete")
    assert sorted(e["resource"]["id"] for e in deletes) == sorted(stored)
    assert {(e["outcome"], e["details"]["cause"]) for e in deletes} == {("success", "classification_raised")}

    gemini.app.reset()
    await take_turn(shop, tenant.headers(), conversation, "thanks")
    (after,) = gemini.app.create_requests()
    assert after.body["store"] is False
    assert "previous_interaction_id" not in after.body
    records = json.dumps(await _audit(shop, tenant))
    assert CANARY not in records
    assert CARD.replace(" ", "") not in records


async def test_a_card_number_in_the_answer_deletes_the_copies_too(
    shop: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A card number the model puts in its answer raises the classification when the turn is stored; the provider's copies, this turn's included, are deleted before the caller hears back."""
    conversation = await open_conversation(shop, tenant.headers(), SHOP)
    await take_turn(shop, tenant.headers(), conversation, "which card do you have on file?")
    gemini.app.answer_next_create(_said(f"the card on file is {CARD}", f"int_echo_{conversation}"))
    turn = await take_turn(shop, tenant.headers(), conversation, "read it to me")
    assert turn["storage"]["store"] is True  # decided before the answer came
    stored = await _ledger(engine, conversation)
    assert f"int_echo_{conversation}" in stored
    assert len(stored) == 2
    assert stored == dict.fromkeys(stored, True)
    assert _held(gemini, stored) == set()
    assert await _chain(engine, conversation) is None
    view = (await shop.get(f"/v1/conversations/{conversation}", headers=tenant.headers())).json()
    assert view["data_classes"] == ["pan", "public"]
    gemini.app.reset()
    await take_turn(shop, tenant.headers(), conversation, "thanks")
    (after,) = gemini.app.create_requests()
    assert (after.body["store"], "previous_interaction_id" in after.body) == (False, False)


async def test_a_refused_answer_leaves_no_copy_with_the_provider(
    shop: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """On a route that blocks card data, an answer carrying a card number is refused and the provider's copy of that turn deleted; the earlier copy stays the chain, and the next turn chains onto it."""
    conversation = await open_conversation(shop, tenant.headers(), SHOP_STRICT)
    await take_turn(shop, tenant.headers(), conversation, "hello")
    chain = await _chain(engine, conversation)
    refused_id = f"int_refused_{conversation}"
    gemini.app.answer_next_create(_said(f"the card on file is {CARD}", refused_id))
    response = await shop.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "read it to me"}, headers=tenant.headers()
    )
    assert_problem(response, 422, "data-class-blocked")
    assert await _ledger(engine, conversation) == {chain: False, refused_id: True}
    assert _held(gemini, [chain, refused_id]) == {chain}
    assert await _chain(engine, conversation) == chain
    gemini.app.reset()
    await take_turn(shop, tenant.headers(), conversation, "never mind")
    (create,) = gemini.app.create_requests()
    assert create.body["previous_interaction_id"] == chain


async def test_the_retention_sweep_deletes_copies_the_policy_no_longer_permits(
    ctx: ServiceContext, shop: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """Copies left with the provider after storage stopped being permitted (here the policy changed; a process that stopped before deleting them leaves the same state) are deleted by the next retention run."""
    conversation = await open_conversation(shop, tenant.headers(), SHOP)
    await take_turn(shop, tenant.headers(), conversation, "first")
    await take_turn(shop, tenant.headers(), conversation, "second")
    stored = await _ledger(engine, conversation)
    assert _held(gemini, stored) == set(stored)
    # Another conversation on a route whose copies stay permitted keeps them.
    kept = await open_conversation(shop, tenant.headers(), FAQ)
    await take_turn(shop, tenant.headers(), kept, "opening hours?")
    kept_copies = await _ledger(engine, kept)

    changed = dataclasses.replace(
        ctx, policy=parse_policy(_policy_document(provider_storage=False), source="test"), auth_failures=AuthFailures()
    )
    async with engine.connect() as connection:
        tenant_id = await connection.scalar(text("SELECT tenant_id FROM conversations WHERE id = :c"), {"c": kept})
    summary = await run_retention(changed, started_by="test", tenant_id=tenant_id)
    assert summary.provider_deleted == len(stored)
    assert _held(gemini, stored) == set()
    assert await _ledger(engine, conversation) == dict.fromkeys(stored, True)
    assert await _chain(engine, conversation) is None
    assert _held(gemini, kept_copies) == set(kept_copies)


async def test_a_turn_under_a_policy_that_stopped_permitting_storage_deletes_the_copies(
    ctx: ServiceContext, shop: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """The route stops permitting provider storage: the next turn goes with store=false and the whole history, and the copies of the conversation are deleted with it, each record naming the cause."""
    conversation = await open_conversation(shop, tenant.headers(), SHOP)
    await take_turn(shop, tenant.headers(), conversation, "first")
    await take_turn(shop, tenant.headers(), conversation, "second")
    stored = await _ledger(engine, conversation)
    gemini.app.reset()
    async with _client(ctx, _policy_document(provider_storage=False)) as changed:
        turn = await take_turn(changed, tenant.headers(), conversation, "third")
        deletes = await _audit(changed, tenant, action="upstream.delete")
    assert turn["storage"]["store"] is False
    (create,) = gemini.app.create_requests()
    assert "previous_interaction_id" not in create.body
    assert _held(gemini, stored) == set()
    assert await _chain(engine, conversation) is None
    assert {(e["resource"]["id"], e["details"]["cause"]) for e in deletes} == {
        (i, "storage_not_permitted") for i in stored
    }
