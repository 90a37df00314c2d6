"""The generateContent fallback (`fallback: generate_content` on a route): turns the Interactions
surface cannot take go through generateContent with the history rebuilt from the stored steps,
their answers are stored as Interactions steps, and both surfaces take the one history after."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.auth_failures import AuthFailures
from service.circuit_breaker import CircuitBreaker
from service.context import ServiceContext
from service.simulator import FaultSpec, RunningSimulator
from service.upstream import Upstream

from ..api.helpers import assert_problem, open_conversation, take_turn
from ..api.test_audit_trail import chain_records, tenant_id
from ..conftest import CANARY, Tenant, asgi_transport, make_upstream

FAQ = {"route": "public-faq", "data_classes": ["public"]}
# Takes the Interactions surface down (every request to it answers 503) while generateContent answers.
INTERACTIONS_DOWN = FaultSpec(status=503, surface="interactions", count=1_000)


@pytest.fixture
async def fallback_api(
    ctx: ServiceContext, gemini: RunningSimulator
) -> AsyncIterator[tuple[httpx.AsyncClient, Upstream]]:
    """The app under a policy whose patient-intake and public-faq routes fall back to
    generateContent, with an upstream (and breaker) of its own."""
    gemini.app.reset()
    routes = dict(ctx.policy.routes)
    for name in ("patient-intake", "public-faq"):
        routes[name] = dataclasses.replace(routes[name], fallback="generate_content")
    policy = dataclasses.replace(ctx.policy, routes=routes)
    upstream = make_upstream(gemini, attempts=1, timeout_seconds=30)
    own = dataclasses.replace(ctx, policy=policy, upstream=upstream, auth_failures=AuthFailures())
    async with httpx.AsyncClient(
        transport=asgi_transport(create_app(own, max_body_bytes=64_000)), base_url="http://custody.test"
    ) as client:
        yield client, upstream
    await upstream.aclose()
    gemini.app.reset()


async def _turns(engine: AsyncEngine, conversation: str) -> list[tuple[str, str, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT status, surface, history_sent FROM turns WHERE conversation_id = :c ORDER BY number"),
            {"c": conversation},
        )
        return [(r.status, r.surface, r.history_sent) for r in rows]


async def _turn_records(engine: AsyncEngine, api: httpx.AsyncClient, tenant: Tenant) -> list[dict[str, Any]]:
    records = await chain_records(engine, await tenant_id(api, tenant, engine))
    return [r for r in records if r["action"] == "turn.create"]


def _parts(request_body: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """A generateContent request's contents as (role, the kinds of its parts)."""
    kinds = []
    for content in request_body["contents"]:
        names = []
        for part in content["parts"]:
            name = next(k for k in part if k not in {"thought", "thoughtSignature"})
            names.append(
                ("thought:" if part.get("thought") else "") + name + ("+sig" if "thoughtSignature" in part else "")
            )
        kinds.append((content["role"], names))
    return kinds


async def test_interleaved_turns_give_one_history_both_surfaces_accept(
    fallback_api: tuple[httpx.AsyncClient, Upstream],
    tenant: Tenant,
    gemini: RunningSimulator,
    engine: AsyncEngine,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Interactions, generateContent, Interactions, generateContent: every turn answers 200; each
    fallback request carries the whole history (thoughts with their signatures, the simulator's
    unknown step left out), the Interactions turn after a fallback replays its converted steps and
    the strict simulator accepts them, and the last turn sees the first. The turn rows and
    turn.create records name the surface; the canary reaches neither them nor the logs."""
    caplog.set_level(logging.DEBUG)
    api, _ = fallback_api
    headers = tenant.headers()
    conversation = await open_conversation(api, headers)

    first = await take_turn(api, headers, conversation, f"hello {CANARY}")
    assert first["status"] == "completed"

    gemini.app.inject(INTERACTIONS_DOWN)
    second = await take_turn(api, headers, conversation, "how many messages have I sent?")
    assert second["output_text"] == "You have sent 2 messages."
    assert [step["type"] for step in second["steps"]] == ["thought", "model_output"]
    (fallback,) = gemini.app.generate_requests()
    assert fallback.status == 200
    body = fallback.body
    # The history of the first turn, then the new input: the thought as a thought part with its
    # signature, the model's text; the unknown x_sim_trace step has no part.
    assert _parts(body) == [
        ("user", ["text"]),
        ("model", ["thought:text+sig", "text"]),
        ("user", ["text"]),
    ]
    assert body["contents"][0]["parts"][0]["text"] == f"hello {CANARY}"
    signature = first["steps"][0]["signature"]
    sent = body["contents"][1]["parts"][0]["thoughtSignature"]
    assert base64.urlsafe_b64decode(sent) == base64.b64decode(signature)
    # The route's settings, mapped: system instruction, function declarations, thinking level.
    assert body["systemInstruction"]["parts"][0]["text"].startswith("You are the intake assistant")
    assert body["tools"][0]["functionDeclarations"][0]["name"] == "lookup_appointment_slots"
    assert body["generationConfig"]["temperature"] == 0.2
    assert body["generationConfig"]["thinkingConfig"] == {"thinking_level": "LOW"}

    gemini.app.reset()
    third = await take_turn(api, headers, conversation, "and now?")
    assert third["status"] == "completed"
    (create,) = gemini.app.create_requests()
    assert create.status == 200
    replayed = create.body["input"]
    assert replayed[5:7] == second["steps"]  # the fallback's steps, as stored, to the Interactions API
    assert [step["type"] for step in replayed] == [
        "user_input",
        "thought",
        "x_sim_trace",
        "model_output",
        "user_input",
        "thought",
        "model_output",
        "user_input",
    ]

    gemini.app.inject(INTERACTIONS_DOWN)
    fourth = await take_turn(api, headers, conversation, "what did I say first?")
    assert fourth["output_text"] == f'You first said: "hello {CANARY}".'
    (fallback,) = gemini.app.generate_requests()
    assert _parts(fallback.body) == [
        ("user", ["text"]),
        ("model", ["thought:text+sig", "text"]),
        ("user", ["text"]),
        # The signature-only thought of the fallback turn rides on the text it came with.
        ("model", ["text+sig"]),
        ("user", ["text"]),
        ("model", ["thought:text+sig", "text"]),
        ("user", ["text"]),
    ]

    assert await _turns(engine, conversation) == [
        ("completed", "interactions", "replayed"),
        ("completed", "generate_content", "replayed"),
        ("completed", "interactions", "replayed"),
        ("completed", "generate_content", "replayed"),
    ]
    records = [r for r in await _turn_records(engine, api, tenant) if r["details"]["conversation_id"] == conversation]
    assert [(r["details"]["surface"], r["details"].get("fallback_reason")) for r in records] == [
        ("interactions", None),
        ("generate_content", "server_error"),
        ("interactions", None),
        ("generate_content", "server_error"),
    ]
    assert CANARY not in json.dumps(await chain_records(engine, await tenant_id(api, tenant, engine)))
    assert CANARY not in caplog.text


async def test_function_calls_cross_the_surfaces(
    fallback_api: tuple[httpx.AsyncClient, Upstream], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """A call the Interactions surface made is answered on generateContent (functionCall with its
    signature, functionResponse with its id); a call generateContent made is answered on the
    Interactions surface, which knows it."""
    api, _ = fallback_api
    headers = tenant.headers()
    conversation = await open_conversation(api, headers)
    asked = await take_turn(api, headers, conversation, "call lookup_appointment_slots")
    assert asked["status"] == "requires_action"
    call = asked["steps"][-1]
    assert call["type"] == "function_call"
    assert call["signature"]

    gemini.app.inject(INTERACTIONS_DOWN)
    result = {"type": "function_result", "call_id": call["id"], "name": call["name"], "result": {"slots": ["09:00"]}}
    answered = await take_turn(api, headers, conversation, [result])
    assert (
        answered["output_text"] == 'Function results received: lookup_appointment_slots returned {"slots": ["09:00"]}.'
    )
    (fallback,) = gemini.app.generate_requests()
    model_call, response = fallback.body["contents"][-2:]
    assert model_call["parts"][-1]["functionCall"]["id"] == call["id"]
    assert base64.urlsafe_b64decode(model_call["parts"][-1]["thoughtSignature"]) == base64.b64decode(call["signature"])
    assert response == {
        "role": "user",
        "parts": [{"functionResponse": {"id": call["id"], "name": call["name"], "response": {"slots": ["09:00"]}}}],
    }

    asked_again = await take_turn(api, headers, conversation, "call lookup_appointment_slots")
    assert len(gemini.app.generate_requests()) == 2  # the Interactions surface is still down
    gc_call = asked_again["steps"][-1]
    assert asked_again["status"] == "requires_action"
    assert gc_call["type"] == "function_call"
    assert gc_call["signature"]

    gemini.app.reset()
    result = {"type": "function_result", "call_id": gc_call["id"], "result": "none free"}
    done = await take_turn(api, headers, conversation, [result])
    assert done["output_text"] == 'Function results received: call_id returned "none free".'.replace(
        "call_id", gc_call["id"]
    )
    (create,) = gemini.app.create_requests()
    assert create.status == 200
    assert gemini.app.generate_requests() == []


async def test_a_route_without_fallback_fails_as_before(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """Without `fallback` (the example policy's routes) a 503 is a 503, and nothing reaches
    generateContent."""
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(INTERACTIONS_DOWN)
    response = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "hello"}, headers=tenant.headers()
    )
    assert assert_problem(response, 503, "upstream-failed")["code"] == "upstream_http_503"
    assert gemini.app.generate_requests() == []


async def test_a_refused_request_does_not_fall_back(
    fallback_api: tuple[httpx.AsyncClient, Upstream], tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A 400 would be refused on either surface: 502, with no generateContent request; a
    fallback that fails too answers with the Interactions failure."""
    api, _ = fallback_api
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(FaultSpec(status=400, surface="interactions"))
    response = await api.post(f"/v1/conversations/{conversation}/turns", json={"input": "hi"}, headers=tenant.headers())
    assert assert_problem(response, 502, "upstream-failed")["code"] == "upstream_http_400"
    assert gemini.app.generate_requests() == []

    gemini.app.inject(FaultSpec(status=503, retry_after=4))
    gemini.app.inject(FaultSpec(status=500, surface="generate_content"))
    response = await api.post(f"/v1/conversations/{conversation}/turns", json={"input": "hi"}, headers=tenant.headers())
    body = assert_problem(response, 503, "upstream-failed")
    assert (body["code"], response.headers["retry-after"]) == ("upstream_http_503", "4")
    assert [r.status for r in gemini.app.generate_requests()] == [500]
    # The failed turn's record says the fallback was tried, and how it failed.
    failed = (await _turn_records(engine, api, tenant))[-1]
    assert (failed["reason"], failed["details"]["fallback_failed"]) == ("upstream_http_503", "upstream_http_500")


async def test_a_missing_interactions_surface_falls_back(
    fallback_api: tuple[httpx.AsyncClient, Upstream], tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A 404 for the create itself (the endpoint is not there) takes the turn to generateContent."""
    api, _ = fallback_api
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(FaultSpec(status=404, surface="interactions"))
    answer = await take_turn(api, tenant.headers(), conversation, "hello")
    assert answer["status"] == "completed"
    records = await _turn_records(engine, api, tenant)
    assert records[-1]["details"]["fallback_reason"] == "interactions_unavailable"


async def test_an_open_breaker_falls_back_without_asking_the_interactions_surface(
    fallback_api: tuple[httpx.AsyncClient, Upstream], tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """Two server failures open the breaker (each turn answered by generateContent); the next
    turn sends nothing to the Interactions surface and is answered by generateContent, its record
    saying why."""
    api, upstream = fallback_api
    upstream.breaker = CircuitBreaker(failure_threshold=2, open_seconds=60)
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(FaultSpec(status=500, surface="interactions", count=2))
    for text_ in ("one", "two"):
        assert (await take_turn(api, tenant.headers(), conversation, text_))["status"] == "completed"
    assert upstream.breaker.state == "open"
    creates = len(gemini.app.create_requests())
    third = await take_turn(api, tenant.headers(), conversation, "how many messages?")
    assert third["output_text"] == "You have sent 3 messages."
    assert len(gemini.app.create_requests()) == creates
    records = await _turn_records(engine, api, tenant)
    assert [r["details"]["fallback_reason"] for r in records[-3:]] == ["server_error", "server_error", "circuit_open"]


async def test_a_fallback_turn_clears_the_chain(
    fallback_api: tuple[httpx.AsyncClient, Upstream], tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """On a route that permits provider storage, a fallback turn keeps nothing at the provider:
    the conversation's chain is cleared, so the next turn replays the whole history (with the
    fallback's steps) instead of chaining onto a copy that lacks them."""
    api, _ = fallback_api
    headers = tenant.headers()
    conversation = await open_conversation(api, headers, FAQ)

    async def chain() -> str | None:
        async with engine.connect() as connection:
            value = await connection.scalar(
                text("SELECT provider_chain_id FROM conversations WHERE id = :c"), {"c": conversation}
            )
        return None if value is None else str(value)

    await take_turn(api, headers, conversation, "opening hours?")
    assert gemini.app.creates()[0]["store"] is True
    assert await chain() is not None
    gemini.app.inject(INTERACTIONS_DOWN)
    answer = await take_turn(api, headers, conversation, "and on sunday?")
    assert set(json.loads(answer["output_text"])) == {"answer", "sources"}  # the response schema, mapped
    assert answer["storage"]["store"] is False  # generateContent keeps nothing
    (fallback,) = gemini.app.generate_requests()
    assert fallback.body["generationConfig"]["responseMimeType"] == "application/json"
    assert fallback.body["tools"] == [{"urlContext": {}}]
    assert await chain() is None
    gemini.app.reset()
    await take_turn(api, headers, conversation, "thanks")
    (create,) = gemini.app.create_requests()
    assert "previous_interaction_id" not in create.body
    assert len(create.body["input"]) == 8  # 4 + 3 steps of history, the new input
    assert await _turns(engine, conversation) == [
        ("completed", "interactions", "replayed"),
        ("completed", "generate_content", "replayed"),
        ("completed", "interactions", "replayed"),
    ]
