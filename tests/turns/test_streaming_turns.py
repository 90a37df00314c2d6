"""Streamed turns: `Accept: text/event-stream` relays the model's progress as Server-Sent Events
over real HTTP (the app under uvicorn, read with httpx's streaming API), and the turn is stored
exactly as a turn answered with JSON is."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.config import REPO_ROOT
from service.context import ServiceContext
from service.conversations import load_cipher, read_steps
from service.models import Conversation, Turn
from service.simulator import FaultSpec, RunningSimulator
from service.turn_events import TurnEventLogs

from ..api.helpers import open_conversation, take_turn
from ..conftest import CANARY, Tenant
from .sse import Event, collect, read_events, served, sse_headers
from .support import FAQ, IDEMPOTENCY_KEY, PHI, audit, wait_until

SCHEMA = json.loads((REPO_ROOT / "schemas" / "turn-events.schema.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


@pytest.fixture
async def service(
    ctx: ServiceContext, gemini: RunningSimulator
) -> AsyncIterator[tuple[ServiceContext, httpx.AsyncClient]]:
    """The app served over real HTTP, with an event log of its own (as a replica has)."""
    gemini.app.reset()
    own = dataclasses.replace(ctx, turn_events=TurnEventLogs())
    async with served(own) as url, httpx.AsyncClient(base_url=url, timeout=30) as client:
        yield own, client
    await own.tasks.drain(timeout=10)


async def stream_turn(
    client: httpx.AsyncClient, tenant: Tenant, conversation: str, text: Any, key: str | None = None
) -> list[Event]:
    headers = sse_headers(tenant.headers(), **({IDEMPOTENCY_KEY: key} if key else {}))
    async with client.stream(
        "POST", f"/v1/conversations/{conversation}/turns", json={"input": text}, headers=headers
    ) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        return await collect(response)


async def events_of(
    client: httpx.AsyncClient, tenant: Tenant, conversation: str, turn_id: str, last: str | None = None
) -> list[Event]:
    headers = tenant.headers() | ({"Last-Event-ID": last} if last else {})
    async with client.stream("GET", f"/v1/conversations/{conversation}/turns/{turn_id}/events", headers=headers) as r:
        assert r.status_code == 200, await r.aread()
        return await collect(r)


def assert_valid(events: list[Event]) -> None:
    for event in events:
        VALIDATOR.validate(event.data)
        assert event.event == event.type


async def stored_steps(ctx: ServiceContext, conversation: str) -> list[bytes]:
    async with ctx.sessions() as session:
        row = await session.get(Conversation, conversation)
        assert row is not None
        return [step for _, _, step in await read_steps(session, await load_cipher(session, ctx, row))]


async def turn_row(ctx: ServiceContext, turn_id: str) -> Turn:
    async with ctx.sessions() as session:
        turn = await session.get(Turn, turn_id)
        assert turn is not None
        return turn


async def test_a_streamed_turn_relays_the_model_and_is_stored(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant
) -> None:
    """turn.started (with the storage decision), the model's step events in order, turn.completed
    with the answer; every event valid against the schema, with ids 1, 2, ...; the turn is stored
    and reads back as the same answer."""
    ctx, client = service
    conversation = await open_conversation(client, tenant.headers(), PHI)
    events = await stream_turn(client, tenant, conversation, "stream me an answer")
    assert_valid(events)
    assert [e.id for e in events] == [str(n) for n in range(1, len(events) + 1)]
    started, *steps, completed = events
    assert started.type == "turn.started"
    assert started.data["store"] is False
    assert started.data["storage_reason"].startswith("route_denies")
    assert {e.type for e in steps} == {"step.start", "step.delta", "step.stop"}
    assert completed.type == "turn.completed"
    assert completed.data["status"] == "completed"
    text = "".join(
        e.data["delta"]["text"] for e in steps if e.type == "step.delta" and e.data["delta"]["type"] == "text"
    )
    assert text == completed.data["output_text"]
    assert 'you said "stream me an answer"' in text

    turn_id = started.data["turn_id"]
    read = await client.get(f"/v1/conversations/{conversation}/turns/{turn_id}", headers=tenant.headers())
    assert read.status_code == 200
    result = read.json()["result"]
    assert result["steps"] == completed.data["steps"]
    assert result["output_text"] == completed.data["output_text"]
    assert result["usage"] == completed.data["usage"]
    # The input and the model's steps, in the history; the lease is given back (the next turn runs).
    assert len(await stored_steps(ctx, conversation)) == 1 + len(completed.data["steps"])
    again = await take_turn(client, tenant.headers(), conversation, "how many messages")
    assert again["output_text"] == "You have sent 2 messages."


async def test_stored_bytes_are_the_non_streaming_answer_of_the_same_interaction(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """Where the provider keeps the turn, its non-streaming rendering of that very interaction
    (GET, the JSON `create` would have answered) has exactly the step bytes Custody stored from the
    stream: key order, unknown fields and step types and all; and the next turn replays them to a
    simulator that refuses any replayed step it did not produce."""
    ctx, client = service
    conversation = await open_conversation(client, tenant.headers(), FAQ)
    events = await stream_turn(client, tenant, conversation, "compare my bytes")
    assert events[0].data["store"] is True
    (create,) = gemini.app.create_requests()
    assert create.body["stream"] is True
    interaction_id = create.response[0]["interaction"]["id"]
    provider = await ctx.upstream.get(interaction_id)
    assert provider is not None
    _, provider_steps = provider
    stored = await stored_steps(ctx, conversation)
    assert stored[1:] == provider_steps
    # What the simulator would have answered without streaming, byte for byte (its JSON writer).
    assert provider_steps == [json.dumps(s, separators=(",", ":")).encode() for s in provider[0]["steps"]]
    assert any(b"x_sim_meta" in step for step in stored)
    # The next turn chains onto that copy; a replay elsewhere would be checked step by step.
    gemini.app.reset()
    second = await take_turn(client, tenant.headers(), conversation, "what did I say first?")
    assert second["output_text"] == 'You first said: "compare my bytes".'


async def test_a_streamed_and_a_json_turn_store_the_same_bytes(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """The same turn on two conversations with the same history, one streamed and one answered as
    JSON, stores the same bytes, but for the thought's signature (random per interaction); and the
    streamed history replays to the strict simulator (store=false: the whole history is sent)."""
    ctx, client = service
    streamed = await open_conversation(client, tenant.headers(), PHI)
    plain = await open_conversation(client, tenant.headers(), PHI)
    await stream_turn(client, tenant, streamed, "the same words")
    await take_turn(client, tenant.headers(), plain, "the same words")
    signature = re.compile(rb'"signature":"[^"]*"')
    mask = [signature.sub(b'"signature":"-"', step) for step in await stored_steps(ctx, streamed)]
    assert mask == [signature.sub(b'"signature":"-"', step) for step in await stored_steps(ctx, plain)]

    # The audit records of the two turns are the same but for the ids and the request.
    def shape(records: list[dict[str, Any]]) -> list[tuple[str, str, str | None, list[str]]]:
        return [(r["action"], r["outcome"], r["reason"], sorted(r["details"])) for r in records]

    assert shape(await audit(client, tenant, resource=streamed)) == shape(await audit(client, tenant, resource=plain))
    created = [
        {
            k: v
            for k, v in r["details"].items()
            if k not in ("conversation_id", "upstream_latency_ms", "upstream_interaction_id")
        }
        for conv in (streamed, plain)
        for r in await audit(client, tenant, action="turn.create")
        if r["details"].get("conversation_id") == conv
    ]
    assert len(created) == 2
    assert created[0] == created[1]
    gemini.app.reset()
    await take_turn(client, tenant.headers(), streamed, "and again")
    (replay,) = gemini.app.create_requests()
    stored = await stored_steps(ctx, streamed)
    assert b",".join(stored[:4]) in replay.raw


async def test_a_client_that_goes_away_loses_nothing(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """The client reads turn.started and a first step event, then disconnects while the model is
    still at work; the turn completes and is stored, the lease is given back, and its events read
    back afterwards end with the same answer."""
    ctx, client = service
    conversation = await open_conversation(client, tenant.headers(), PHI)
    gemini.app.inject(FaultSpec(pause_after_events=3))
    async with client.stream(
        "POST",
        f"/v1/conversations/{conversation}/turns",
        json={"input": "I will not wait"},
        headers=sse_headers(tenant.headers()),
    ) as response:
        seen: list[Event] = []
        async for event in read_events(response):
            seen.append(event)
            if event.type == "step.delta":
                break
    turn_id = seen[0].data["turn_id"]
    assert (await turn_row(ctx, turn_id)).status == "in_progress"
    gemini.app.advance(3600)
    await wait_until(lambda: _status(ctx, turn_id, "completed"), what="the abandoned stream's turn is stored")
    events = await events_of(client, tenant, conversation, turn_id, last=seen[-1].id)
    assert_valid(events)
    assert events[-1].type == "turn.completed"
    assert events[-1].data["output_text"].startswith('Turn 1: you said "I will not wait"')
    assert await take_turn(client, tenant.headers(), conversation, "how many messages")


async def _status(ctx: ServiceContext, turn_id: str, status: str) -> bool:
    return (await turn_row(ctx, turn_id)).status == status


async def test_an_upstream_failure_mid_stream_is_an_error_event_and_stores_nothing(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant, gemini: RunningSimulator, ctx: ServiceContext
) -> None:
    """The connection to the model drops after a few events: the client gets an `error` event,
    the turn is recorded failed (with its turn.create audit record), nothing of it is stored, and
    the conversation takes its next turn."""
    own, client = service
    conversation = await open_conversation(client, tenant.headers(), PHI)
    gemini.app.inject(FaultSpec(drop=True, drop_after_events=4))
    events = await stream_turn(client, tenant, conversation, "drop me half way")
    assert_valid(events)
    assert [e.type for e in events][:2] == ["turn.started", "step.start"]
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "upstream_unreachable"
    turn_id = events[0].data["turn_id"]
    turn = await turn_row(own, turn_id)
    assert (turn.status, turn.error_code) == ("failed", "upstream_unreachable")
    assert await stored_steps(own, conversation) == []
    records = await audit(client, tenant, resource=turn_id)
    assert [(r["action"], r["outcome"], r["reason"]) for r in records] == [
        ("turn.create", "error", "upstream_unreachable")
    ]
    # Read again: from this replica's log, as relayed; from storage, only that it failed.
    assert await events_of(client, tenant, conversation, turn_id) == events
    async with (
        served(dataclasses.replace(own, turn_events=TurnEventLogs())) as url,
        httpx.AsyncClient(base_url=url) as other,
    ):
        stored = await events_of(other, tenant, conversation, turn_id)
    assert_valid(stored)
    assert [(e.type, e.id) for e in stored] == [("turn.started", "s1"), ("error", "s2")]
    assert stored[-1].data["code"] == "upstream_unreachable"
    after = await take_turn(client, tenant.headers(), conversation, "how many messages")
    assert after["output_text"] == "You have sent 1 messages."


async def test_a_repeated_idempotency_key_replays_the_stored_turn_as_a_completed_stream(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """The same key again: the first turn's events regenerated from storage (ids s1, s2, ...),
    the same answer, and no second model call."""
    _, client = service
    conversation = await open_conversation(client, tenant.headers(), PHI)
    first = await stream_turn(client, tenant, conversation, "only once", key="stream-key-1")
    second = await stream_turn(client, tenant, conversation, "only once", key="stream-key-1")
    assert_valid(second)
    assert len(gemini.app.create_requests()) == 1
    assert second[0].data["turn_id"] == first[0].data["turn_id"]
    assert [e.id for e in second] == [f"s{n}" for n in range(1, len(second) + 1)]
    assert second[-1].data == first[-1].data
    # The regenerated steps are the stored steps, whole.
    assert [e.data["step"] for e in second if e.type == "step.start"] == first[-1].data["steps"]


async def test_reconnecting_gets_what_was_missed(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """While the replica keeps the turn's log, Last-Event-ID gives exactly the events after it;
    once it has forgotten it (and on any other replica), the events are regenerated from storage:
    all of them, those after an `sN` id, or for a live id only turn.completed."""
    ctx, client = service
    conversation = await open_conversation(client, tenant.headers(), PHI)
    events = await stream_turn(client, tenant, conversation, "resume me")
    turn_id = events[0].data["turn_id"]
    assert await events_of(client, tenant, conversation, turn_id, last="4") == events[4:]

    forgetful = dataclasses.replace(ctx, turn_events=TurnEventLogs())
    async with served(forgetful) as url, httpx.AsyncClient(base_url=url) as other:
        regenerated = await events_of(other, tenant, conversation, turn_id)
        assert_valid(regenerated)
        assert [e.type for e in regenerated] == ["turn.started"] + ["step.start", "step.stop"] * 3 + ["turn.completed"]
        assert regenerated[-1].data == events[-1].data
        assert await events_of(other, tenant, conversation, turn_id, last="s2") == regenerated[2:]
        assert await events_of(other, tenant, conversation, turn_id, last="5") == regenerated[-1:]
        # An id that is not one of this turn's is taken as none.
        assert await events_of(other, tenant, conversation, turn_id, last="nope") == regenerated
        # Another tenant's turn is not found.
        stranger = await other.get(
            f"/v1/conversations/{conversation}/turns/{turn_id}/events", headers={"Authorization": "Bearer nope"}
        )
        assert stranger.status_code == 401


async def test_a_turn_running_on_another_replica_asks_the_client_to_reconnect(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """A replica without the running turn's log answers one `turn.running_elsewhere` event (no id,
    a retry hint); once the turn has ended, the same request gets its events from storage."""
    ctx, client = service
    conversation = await open_conversation(client, tenant.headers(), PHI)
    gemini.app.inject(FaultSpec(pause_after_events=2))
    async with client.stream(
        "POST",
        f"/v1/conversations/{conversation}/turns",
        json={"input": "elsewhere"},
        headers=sse_headers(tenant.headers()),
    ) as response:
        stream = read_events(response)
        started = await anext(stream)
        turn_id = started.data["turn_id"]
        other_ctx = dataclasses.replace(ctx, turn_events=TurnEventLogs())
        async with served(other_ctx) as url, httpx.AsyncClient(base_url=url) as other:
            (elsewhere,) = await events_of(other, tenant, conversation, turn_id, last="1")
            assert_valid([elsewhere])
            assert (elsewhere.type, elsewhere.id, elsewhere.retry) == ("turn.running_elsewhere", None, 1000)
            gemini.app.advance(3600)
            rest = [event async for event in stream]
            assert rest[-1].type == "turn.completed"
            later = await events_of(other, tenant, conversation, turn_id, last="1")
            assert [e.type for e in later] == ["turn.completed"]


async def test_content_never_reaches_logs_or_spans(
    service: tuple[ServiceContext, httpx.AsyncClient],
    tenant: Tenant,
    gemini: RunningSimulator,
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A streamed turn (and one that fails mid-stream) writes nothing of the input or the answer
    into the log or a span."""
    _, client = service
    spans.clear()
    caplog.set_level(logging.DEBUG)
    conversation = await open_conversation(client, tenant.headers(), PHI)
    events = await stream_turn(client, tenant, conversation, f"secret {CANARY}")
    assert CANARY in events[-1].data["output_text"]
    gemini.app.inject(FaultSpec(drop=True, drop_after_events=5))
    failed = await stream_turn(client, tenant, conversation, f"again {CANARY}")
    assert failed[-1].type == "error"
    await asyncio.sleep(0)
    assert CANARY not in caplog.text
    for span in spans.get_finished_spans():
        assert CANARY not in json.dumps(dict(span.attributes or {}), default=str)
        assert all(CANARY not in json.dumps(dict(e.attributes or {}), default=str) for e in span.events)


CARD = "4111 1111 1111 1111"


async def test_the_relay_holds_back_what_the_route_refuses(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """On a route that blocks `pan`, the model streams a card number: the relay stops before the
    delta that completes it, the detectors refuse the assembled answer before anything is stored
    (error `model_output_refused`, the turn.create record denied as for a JSON turn), and the
    conversation takes its next turn."""
    ctx, client = service
    conversation = await open_conversation(client, tenant.headers(), PHI)
    await take_turn(client, tenant.headers(), conversation, "first")
    stored_before = await stored_steps(ctx, conversation)
    answer = {
        "id": "int_stream_refused_1",
        "status": "completed",
        "steps": [{"type": "model_output", "content": [{"type": "text", "text": f"the card is {CARD}"}]}],
        "usage": {"total_tokens": 9},
    }
    gemini.app.answer_next_create(json.dumps(answer).encode())
    events = await stream_turn(client, tenant, conversation, "second")
    assert_valid(events)
    relayed = "".join(e.data["delta"]["text"] for e in events if e.type == "step.delta")
    assert relayed.startswith("the card is")  # what came before it was relayed
    assert CARD not in relayed
    assert CARD not in json.dumps([e.data for e in events])
    assert events[-1].type == "error"
    assert events[-1].data["code"] == "model_output_refused"
    assert await stored_steps(ctx, conversation) == stored_before
    created = await audit(client, tenant, action="turn.create")
    assert (created[-1]["outcome"], created[-1]["reason"]) == ("denied", "model_output_refused")
    third = await take_turn(client, tenant.headers(), conversation, "third")
    assert third["status"] == "completed"


async def test_a_streamed_function_call_and_its_result(
    service: tuple[ServiceContext, httpx.AsyncClient], tenant: Tenant
) -> None:
    """A function call arrives whole in step.start and the stream ends `requires_action` with the
    call in turn.completed's steps; the result is then sent in a streamed turn too."""
    _, client = service
    conversation = await open_conversation(client, tenant.headers(), PHI)
    events = await stream_turn(client, tenant, conversation, "call lookup_appointment_slots")
    assert_valid(events)
    completed = events[-1].data
    assert completed["status"] == "requires_action"
    (call,) = [s for s in completed["steps"] if s["type"] == "function_call"]
    assert any(e.type == "step.start" and e.data["step"] == call for e in events)
    result = [{"type": "function_result", "call_id": call["id"], "name": call["name"], "result": {"slots": []}}]
    answered = await stream_turn(client, tenant, conversation, result)
    assert answered[-1].data["status"] == "completed"
    assert answered[-1].data["output_text"].startswith("Function results received")
