"""Server-Sent Events responses: a streamed turn's events as they come (service/turns/_stream.py).

The events' format is the JSON Schema schemas/turn-events.schema.json, and `EVENT_STREAM_DOC`
says it in the OpenAPI description.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import Any

from litestar.response import Stream
from litestar.response.base import ASGIResponse

__all__ = ["EVENT_STREAM", "EVENT_STREAM_DOC", "LAST_EVENT_ID", "event_stream", "wants_event_stream"]

EVENT_STREAM = "text/event-stream"
# A live event id (1, 2, ...) or a regenerated one (s1, s2, ...).
LAST_EVENT_ID = re.compile(r"^s?[0-9]{1,9}$")

EVENT_STREAM_DOC = (
    "Server-Sent Events, one JSON object per event in `data:` (schemas/turn-events.schema.json), its `type` "
    "also in `event:`, and an `id:` to resume from with `Last-Event-ID` on "
    "`GET /v1/conversations/{id}/turns/{turn_id}/events`. In order: `turn.started` (the turn's id and number, "
    "and the storage decision: `store`, `storage_reason`, `policy_version`); `step.start`, `step.delta` and "
    "`step.stop` as the model sends them (`index` is the step's position in the answer; `step` and `delta` are "
    "the model's own JSON); then exactly one of `turn.completed` (`status`, `error_code`, `usage`, "
    "`output_text` and the whole answer's `steps`, as the JSON answer would carry them) or `error` (`code`, "
    "e.g. `upstream_http_503`, `upstream_timeout`, `model_output_refused`: nothing of the turn was stored). "
    "Live ids are 1, 2, ...; events regenerated from the stored turn (after it ended, on any replica) have ids "
    "s1, s2, ..., and a client resuming with a live id from a turn no longer in memory gets only its last event, "
    "which carries the whole answer. `turn.running_elsewhere` (no id, `retry:` 1000 ms): the turn runs on another "
    "replica, reconnect. `error` with `events_dropped`: the client read too slowly and missed events the service "
    "no longer holds; reconnect once the turn has ended."
)


def wants_event_stream(accept: str | None) -> bool:
    """Whether an Accept header asks for Server-Sent Events."""
    return accept is not None and any(
        part.split(";", 1)[0].strip().lower() == EVENT_STREAM for part in accept.split(",")
    )


class EventStream(Stream):
    """A stream whose media type is its own: Litestar lets the route's (JSON, for the turn
    endpoint that answers either) override a response's."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        kwargs["media_type"] = EVENT_STREAM
        return super().to_asgi_response(*args, **kwargs)


def event_stream(events: AsyncIterator[bytes]) -> Stream:
    """The events as a response: never cached, never buffered by a proxy on the way."""
    return EventStream(
        events,
        media_type=EVENT_STREAM,
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
