"""The streamed create (`Upstream.create_stream`) against the simulator, read alongside the SDK's
own streaming parser; the assembly of steps from events; the SSE framing Custody reads."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from google import genai
from google.genai import interactions, types

from service.errors import UpstreamFailed
from service.simulator import FaultSpec, RunningSimulator
from service.upstream import Chain, Upstream
from service.upstream_stream import AssemblyError, StepAssembler, sse_events

from .conftest import make_upstream

SETTINGS = {"model": "gemini-3-flash-preview"}
TOOLS = {"tools": [{"type": "function", "name": "open_dispute", "parameters": {"type": "object"}}]}


def user(text: str) -> bytes:
    return json.dumps({"type": "user_input", "content": [{"type": "text", "text": text}]}).encode()


@pytest.fixture
async def upstream(gemini: RunningSimulator) -> AsyncIterator[Upstream]:
    gemini.app.reset()
    upstream = make_upstream(gemini, attempts=3)
    yield upstream
    await upstream.aclose()


class Seen:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    async def __call__(self, event: dict[str, Any], step: dict[str, Any] | None) -> None:
        self.events.append(event)


@pytest.mark.parametrize(("text", "settings"), [("stream me", SETTINGS), ("call open_dispute", SETTINGS | TOOLS)])
async def test_the_assembled_steps_are_the_interactions_own_bytes(
    upstream: Upstream, gemini: RunningSimulator, text: str, settings: dict[str, Any]
) -> None:
    """A streamed create stores (store=true) an interaction whose non-streaming rendering (GET) has
    exactly the step bytes assembled from its events; and the SDK's own parser, reading the same
    interaction's stream again, sees the same events (ids, text, signatures) Custody saw."""
    seen = Seen()
    reply = await upstream.create_stream(settings=settings, steps=[user(text)], store=True, on_event=seen)
    (interaction_id,) = reply.interaction_ids
    provider = await upstream.get(interaction_id)
    assert provider is not None
    assert reply.steps == provider[1]
    assert reply.body["steps"] == provider[0]["steps"]
    assert reply.body["status"] == provider[0]["status"]
    assert reply.body["usage"] == provider[0]["usage"]

    client = genai.Client(api_key="test-key", http_options=types.HttpOptions(base_url=gemini.base_url))
    stream = await client.aio.interactions.get(interaction_id, stream=True)
    typed = [event async for event in stream]
    assert [e.event_id for e in typed] == [e["event_id"] for e in seen.events]
    assert [e.event_type for e in typed] == [e["event_type"] for e in seen.events]
    sdk_text = "".join(
        e.delta.text
        for e in typed
        if isinstance(e, interactions.StepDelta) and isinstance(e.delta, interactions.TextDelta)
    )
    outputs = [s for s in reply.body["steps"] if s["type"] == "model_output"]
    assert sdk_text == "".join(b["text"] for s in outputs for b in s["content"])
    signatures = [
        e.delta.signature for e in typed if e.event_type == "step.delta" and e.delta.type == "thought_signature"
    ]
    assert signatures == [s["signature"] for s in reply.body["steps"] if s["type"] == "thought"]


async def test_a_transient_failure_before_the_stream_opens_is_retried(
    upstream: Upstream, gemini: RunningSimulator
) -> None:
    """store=false: a 503 before any event is retried, as `create` retries it."""
    gemini.app.inject(FaultSpec(status=503, count=1))
    reply = await upstream.create_stream(settings=SETTINGS, steps=[user("retry me")], store=False, on_event=Seen())
    assert reply.attempts == 2
    assert reply.body["status"] == "completed"


async def test_a_drop_mid_stream_is_not_retried(upstream: Upstream, gemini: RunningSimulator) -> None:
    """Once events have been handed on, a dropped connection fails the turn: a retry would be a
    second answer."""
    gemini.app.inject(FaultSpec(drop=True, drop_after_events=3))
    seen = Seen()
    with pytest.raises(UpstreamFailed) as failed:
        await upstream.create_stream(settings=SETTINGS, steps=[user("drop")], store=False, on_event=seen)
    assert failed.value.code == "upstream_unreachable"
    assert len(seen.events) == 3
    assert len(gemini.app.create_requests()) == 1


async def test_a_lost_chain_falls_back_to_the_whole_history(upstream: Upstream, gemini: RunningSimulator) -> None:
    """Chained onto a copy the provider no longer has: sent again with the whole history."""
    reply = await upstream.create_stream(
        settings=SETTINGS,
        steps=[user("first"), user("second")],
        store=True,
        chain=Chain("int_gone_for_good", 1),
        on_event=Seen(),
    )
    assert reply.history_sent == "replayed_after_chain_lost"
    first, second = gemini.app.create_requests()
    assert first.body["previous_interaction_id"] == "int_gone_for_good"
    assert len(second.body["input"]) == 2


def events_of(*chunks: bytes) -> AsyncIterator[bytes]:
    async def iterate() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    return iterate()


async def test_sse_framing_as_the_sdk_reads_it() -> None:
    """CRLF, CR and LF line ends (split across chunks), a byte-order mark, comments, other fields,
    multi-line data and the [DONE] sentinel."""
    raw = (
        b'\xef\xbb\xbf: comment\r\nid: 1\r\nevent: a\r\ndata: {"n":\r\ndata: 1}\r\n\r\n'
        b'data: {"n": 2}\r\rdata: {"n": 3}\n\ndata: [DONE]\n\n'
    )
    for size in (1, 2, 3, 7, len(raw)):
        chunks = [raw[i : i + size] for i in range(0, len(raw), size)]
        assert [e async for e in sse_events(events_of(*chunks))] == [{"n": 1}, {"n": 2}, {"n": 3}]
    with pytest.raises(AssemblyError):
        [e async for e in sse_events(events_of(b'data: {"n": 1}'))]


def step_events(*events: dict[str, Any]) -> StepAssembler:
    assembler = StepAssembler()
    for event in events:
        assembler.add(event)
    return assembler


CREATED = {"event_type": "interaction.created", "interaction": {"id": "int_1", "status": "in_progress"}}
COMPLETED = {"event_type": "interaction.completed", "interaction": {"id": "int_1", "status": "completed"}}


def test_assembly_folds_deltas_in_the_answers_field_order() -> None:
    """Fields the deltas fill go where the non-streaming answer writes them; others keep the
    order step.start gave them; function call arguments streamed as JSON text are parsed."""
    assembler = step_events(
        CREATED,
        {"event_type": "step.start", "index": 0, "step": {"type": "thought"}},
        {
            "event_type": "step.delta",
            "index": 0,
            "delta": {"type": "thought_summary", "content": {"type": "text", "text": "t"}},
        },
        {"event_type": "step.delta", "index": 0, "delta": {"type": "thought_signature", "signature": "c2ln"}},
        {"event_type": "step.stop", "index": 0},
        {"event_type": "step.start", "index": 1, "step": {"type": "model_output", "x_extra": 1, "content": []}},
        {"event_type": "step.delta", "index": 1, "delta": {"type": "text", "text": "h\u00e9"}},
        {"event_type": "step.delta", "index": 1, "delta": {"type": "text", "text": "llo"}},
        {"event_type": "step.stop", "index": 1},
        {"event_type": "step.start", "index": 2, "step": {"type": "function_call", "name": "f", "id": "c1"}},
        {"event_type": "step.delta", "index": 2, "delta": {"type": "arguments_delta", "arguments": '{"a": '}},
        {"event_type": "step.delta", "index": 2, "delta": {"type": "arguments_delta", "arguments": "1.5}"}},
        {"event_type": "step.stop", "index": 2},
        COMPLETED,
    )
    body, steps = assembler.result()
    assert steps == [
        b'{"type":"thought","signature":"c2ln","summary":[{"type":"text","text":"t"}]}',
        b'{"type":"model_output","content":[{"type":"text","text":"h\\u00e9llo"}],"x_extra":1}',
        b'{"type":"function_call","id":"c1","name":"f","arguments":{"a":1.5}}',
    ]
    assert body["status"] == "completed"
    assert body["steps"] == [json.loads(step) for step in steps]


@pytest.mark.parametrize(
    "events",
    [
        # a delta Custody does not know how to fold
        [
            CREATED,
            {"event_type": "step.start", "index": 0, "step": {"type": "x"}},
            {"event_type": "step.delta", "index": 0, "delta": {"type": "x_new"}},
        ],
        # a step that never stopped
        [CREATED, {"event_type": "step.start", "index": 0, "step": {"type": "x"}}, COMPLETED],
        # steps out of order
        [CREATED, {"event_type": "step.start", "index": 1, "step": {"type": "x"}}],
        # no interaction.completed
        [CREATED],
        # an error event
        [CREATED, {"event_type": "error", "error": {"code": 500}}],
    ],
)
def test_assembly_refuses_what_it_cannot_store_whole(events: list[dict[str, Any]]) -> None:
    with pytest.raises(AssemblyError):
        step_events(*events).result()


async def test_an_endless_event_is_refused() -> None:
    """An event whose data lines never end is refused once past 8 MiB, not buffered on."""
    line = b"data: " + b"x" * 65536 + b"\n"
    with pytest.raises(AssemblyError):
        [e async for e in sse_events(events_of(*([line] * 200)))]
