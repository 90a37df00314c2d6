"""The conversation endpoints end to end: real Postgres, real SDK, the simulator."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.context import ServiceContext
from service.simulator import RunningSimulator

from ..conftest import Tenant
from .helpers import PHI_ROUTE, assert_problem, open_conversation, take_turn


async def test_memory_comes_from_replayed_history(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """The second turn can quote the first only because Custody replayed the history."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "My name is Ada Lovelace")
    second = await take_turn(api, tenant.headers(), conversation, "What did I say first?")
    assert second["output_text"] == 'You first said: "My name is Ada Lovelace".'
    assert second["status"] == "completed"
    assert second["turn_number"] == 2


async def test_replay_sends_first_turn_steps_unchanged(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, ctx: ServiceContext
) -> None:
    """The second upstream call has store=false, the first turn's steps as the same JSON values, and the route's settings again."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "first message")
    await take_turn(api, tenant.headers(), conversation, "second message")
    first, second = gemini.app.create_requests()
    returned = first.response["steps"]
    kinds = [step["type"] for step in returned]
    assert "thought" in kinds
    assert "x_sim_trace" in kinds
    assert second.body["store"] is False
    assert first.body["store"] is False
    assert second.body["input"] == [
        {"type": "user_input", "content": [{"type": "text", "text": "first message"}]},
        *returned,
        {"type": "user_input", "content": [{"type": "text", "text": "second message"}]},
    ]
    route = ctx.policy.route("patient-intake")
    for body in (first.body, second.body):
        assert body["system_instruction"] == route.system_instruction
        assert body["tools"] == [dict(t) for t in route.upstream_settings()["tools"]]
        assert body["generation_config"] == route.upstream_settings()["generation_config"]
        assert body["model"] == route.model
    assert second.headers["api-revision"] == "2026-05-20"


async def test_history_pages_in_order(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """GET …/steps returns the decrypted history in order, page by page."""
    conversation = await open_conversation(api, tenant.headers())
    for text_ in ("one", "two"):
        await take_turn(api, tenant.headers(), conversation, text_)
    seen: list[dict[str, Any]] = []
    cursor: int | None = 0
    while cursor is not None:
        page = (
            await api.get(
                f"/v1/conversations/{conversation}/steps",
                params={"cursor": cursor, "limit": 3},
                headers=tenant.headers(),
            )
        ).json()
        seen.extend(page["steps"])
        cursor = page["next_cursor"]
    assert [s["position"] for s in seen] == list(range(8))
    assert seen[0]["step"]["content"][0]["text"] == "one"
    assert seen[4]["step"]["content"][0]["text"] == "two"


async def test_conversation_metadata_has_no_content(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """GET on a conversation gives metadata and counts, never steps or text."""
    body = PHI_ROUTE | {"subject": "MRN-0042", "metadata": {"ward": "4B"}}
    conversation = await open_conversation(api, tenant.headers(), body)
    await take_turn(api, tenant.headers(), conversation, "private words")
    view = (await api.get(f"/v1/conversations/{conversation}", headers=tenant.headers())).json()
    assert view["subject"] == "MRN-0042"
    assert view["metadata"] == {"ward": "4B"}
    assert view["turn_count"] == 1
    assert view["step_count"] == 4
    assert "private words" not in str(view)


async def test_function_calls_round_trip(api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator) -> None:
    """A function_call ends the turn requires_action; its function_result is replayed and answered."""
    conversation = await open_conversation(
        api, tenant.headers(), {"route": "billing-support", "data_classes": ["pan", "financial"]}
    )
    asked = await take_turn(api, tenant.headers(), conversation, "call get_recent_transactions")
    assert asked["status"] == "requires_action"
    call = next(s for s in asked["steps"] if s["type"] == "function_call")
    assert call["signature"]  # an extra field the SDK does not declare, kept
    result = {"type": "function_result", "call_id": call["id"], "name": call["name"], "result": {"count": 2}}
    answered = await take_turn(api, tenant.headers(), conversation, [result])
    assert answered["status"] == "completed"
    assert 'get_recent_transactions returned {"count": 2}' in answered["output_text"]
    assert gemini.app.creates()[-1]["input"][-1] == result


async def test_delete_shreds_then_removes(api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine) -> None:
    """DELETE answers 204 and leaves no data key, step, turn or conversation row behind."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "to be forgotten")
    response = await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())
    assert response.status_code == 200
    async with engine.connect() as connection:
        for table in ("data_keys", "steps", "turns", "conversations"):
            column = "id" if table == "conversations" else "conversation_id"
            count = (
                await connection.execute(text(f"SELECT count(*) FROM {table} WHERE {column} = :c"), {"c": conversation})
            ).scalar_one()
            assert count == 0, table
    assert_problem(
        await api.get(f"/v1/conversations/{conversation}", headers=tenant.headers()), 404, "conversation-not-found"
    )


async def test_model_failure_leaves_history_usable(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """A turn the model fails is answered `failed`, stores nothing, and the next turn works."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    failed = await take_turn(api, tenant.headers(), conversation, "sim:fail please")
    assert failed["status"] == "failed"
    after = await take_turn(api, tenant.headers(), conversation, "what did I say first?")
    assert after["output_text"] == 'You first said: "hello".'
    view = (await api.get(f"/v1/conversations/{conversation}", headers=tenant.headers())).json()
    assert view["step_count"] == 8
    assert view["turn_count"] == 3


async def test_health_and_readiness(api: httpx.AsyncClient) -> None:
    """/healthz and /readyz answer 200 when the database is reachable."""
    assert (await api.get("/healthz")).json() == {"status": "ok"}
    assert (await api.get("/readyz")).json() == {"status": "ready", "upstream": {"breaker": "closed"}}
