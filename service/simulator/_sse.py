"""Server-sent events for a streamed interaction, framed the way the SDK parses them."""

from __future__ import annotations

import json
from typing import Any

__all__ = ["DONE", "encode_event", "stream_events"]

DONE = b"data: [DONE]\n\n"


def encode_event(event: dict[str, Any]) -> bytes:
    return f"event: {event['event_type']}\ndata: {json.dumps(event, separators=(',', ':'))}\n\n".encode()


def stream_events(
    summary: dict[str, Any], steps: list[dict[str, Any]], final: dict[str, Any], chunk_words: int
) -> list[dict[str, Any]]:
    """The events of one streamed turn: created, start/delta/stop per step, completed.

    `summary` is the interaction as first seen (no steps), `final` as it ends. Each event carries
    an `event_id` that `get(..., stream=True, last_event_id=...)` resumes after.
    """
    events: list[dict[str, Any]] = [{"event_type": "interaction.created", "interaction": summary}]
    for index, step in enumerate(steps):
        events.extend(_step_events(index, step, chunk_words))
    events.append({"event_type": "interaction.completed", "interaction": final})
    for number, event in enumerate(events, start=1):
        event["event_id"] = f"{summary['id']}:{number}"
    return events


def _step_events(index: int, step: dict[str, Any], chunk_words: int) -> list[dict[str, Any]]:
    kind = step["type"]
    if kind == "model_output" and not step.get("error"):
        start = {k: v for k, v in step.items() if k != "content"} | {"content": []}
        deltas = []
        for block in step.get("content", []):
            words = block.get("text", "").split(" ")
            for i in range(0, len(words), chunk_words):
                piece = " ".join(words[i : i + chunk_words])
                deltas.append({"type": "text", "text": piece if i == 0 else " " + piece})
    elif kind == "thought":
        start = {"type": "thought"}
        deltas = [{"type": "thought_summary", "content": block} for block in step.get("summary", [])]
        deltas.append({"type": "thought_signature", "signature": step["signature"]})
    else:
        # function_call and unknown steps arrive whole in step.start (there is no call delta).
        start, deltas = step, []
    events: list[dict[str, Any]] = [{"event_type": "step.start", "index": index, "step": start}]
    events.extend({"event_type": "step.delta", "index": index, "delta": d} for d in deltas)
    events.append({"event_type": "step.stop", "index": index})
    return events
