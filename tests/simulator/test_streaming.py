"""Streaming: SSE events the SDK parses, resumption, and drops."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from google import genai
from google.genai import _interactions as errors
from google.genai import interactions

from service.simulator import FaultSpec, RunningSimulator

from .conftest import MODEL, make_client, user_step


def collect_text(events: Sequence[interactions.InteractionSSEEvent]) -> str:
    return "".join(
        e.delta.text
        for e in events
        if isinstance(e, interactions.StepDelta) and isinstance(e.delta, interactions.TextDelta)
    )


def test_stream_events_parse_and_rebuild_the_reply(client: genai.Client) -> None:
    """A streamed turn parses into typed events whose text deltas rebuild the full reply."""
    events = list(client.interactions.create(model=MODEL, input="stream this reply", stream=True, store=False))
    kinds = [e.event_type for e in events]
    assert kinds[0] == "interaction.created"
    assert kinds[-1] == "interaction.completed"
    assert "step.start" in kinds
    assert "step.stop" in kinds
    assert all(getattr(e, "event_id", None) for e in events)
    assert collect_text(events).startswith('Turn 1: you said "stream this reply".')
    signatures = [
        e.delta.signature for e in events if e.event_type == "step.delta" and e.delta.type == "thought_signature"
    ]
    assert signatures
    assert signatures[0]
    assert events[-1].interaction.status == "completed"


async def test_async_stream(sim: RunningSimulator) -> None:
    """The async client streams the same events."""
    client = make_client(sim)
    stream = await client.aio.interactions.create(
        model=MODEL, input=[user_step("async stream")], stream=True, store=False
    )
    events = [e async for e in stream]
    assert 'you said "async stream"' in collect_text(events)


def test_function_call_arrives_whole_in_step_start(client: genai.Client) -> None:
    """A streamed function call arrives in step.start and the stream ends requires_action."""
    tools = [{"type": "function", "name": "open_dispute", "parameters": {"type": "object"}}]
    events = list(
        client.interactions.create(model=MODEL, input="call open_dispute", tools=tools, stream=True, store=False)
    )
    starts = [e.step for e in events if e.event_type == "step.start"]
    assert any(getattr(s, "type", "") == "function_call" and s.name == "open_dispute" for s in starts)
    assert events[-1].interaction.status == "requires_action"


def test_stored_stream_resumes_after_last_event_id(client: genai.Client) -> None:
    """get(stream=True, last_event_id=...) replays only the events after that id."""
    events = list(client.interactions.create(model=MODEL, input="resume me later", stream=True, store=True))
    interaction_id = events[0].interaction.id
    rest = list(client.interactions.get(interaction_id, stream=True, last_event_id=events[2].event_id))
    assert [e.event_id for e in rest] == [e.event_id for e in events[3:]]


def test_connection_dropped_mid_stream(client: genai.Client, sim: RunningSimulator) -> None:
    """A connection dropped mid-stream raises APIConnectionError while iterating."""
    sim.app.inject(FaultSpec(drop=True, drop_after_events=2))
    stream = client.interactions.create(model=MODEL, input="drop me", stream=True, store=False)
    seen: list[interactions.InteractionSSEEvent] = []
    with pytest.raises(errors.APIConnectionError):
        seen.extend(stream)  # keeps the events that arrived before the drop
    assert len(seen) == 2
