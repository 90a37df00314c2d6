"""The events of the streamed turns this replica runs, kept in memory for their relays and for
clients that reconnect (`GET .../turns/{turn_id}/events` with `Last-Event-ID`).

One log per turn, written by the turn (never waiting for a reader) and read by any number of
relays, each at its own pace from its own position: a slow reader holds a position, not a copy,
so the service buffers a turn's events once however many read them, and never more than
`max_bytes` of them (the oldest deltas go first; a reader left behind them is told so and can
reconnect once the turn has ended, when its `turn.completed` carries the whole answer). A log
stays `keep_seconds` after its turn ended, for a client that reconnects at once; after that, and
on any other replica, the events are regenerated from the stored turn (service/turns/_stream.py).

Content: a log holds what the model said, in memory only, as the turn itself does; nothing of it
is logged.
"""

from __future__ import annotations

import asyncio
import json
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["EventsDropped", "TurnEventLog", "TurnEventLogs", "encode_event"]


def encode_event(kind: str, data: dict[str, Any], event_id: str | None, *, retry_ms: int | None = None) -> bytes:
    """One Server-Sent Event: its id, its type, and its data as one line of compact JSON."""
    lines = [] if event_id is None else [f"id: {event_id}"]
    if retry_ms is not None:
        lines.append(f"retry: {retry_ms}")
    lines.append(f"event: {kind}")
    payload = json.dumps({"type": kind, **data}, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    lines.append(f"data: {payload}")
    return ("\n".join(lines) + "\n\n").encode()


class EventsDropped(Exception):
    """The reader's position is older than the events the log still holds."""


class TurnEventLog:
    """One streamed turn's events, numbered from 1 (the number is the SSE `id`)."""

    def __init__(self, tenant_id: str, conversation_id: str, turn_id: str, *, max_bytes: int) -> None:
        self.tenant_id = tenant_id
        self.conversation_id = conversation_id
        self.turn_id = turn_id
        self._max_bytes = max_bytes
        # Event 1 (turn.started) is kept apart and never dropped: a reader can always be told
        # what the turn is. The others are contiguous, numbered from `_base`.
        self._first: bytes | None = None
        self._events: list[bytes] = []
        self._base = 2
        self._size = 0
        self.closed = False
        self._wake = asyncio.Event()

    @property
    def size(self) -> int:
        return self._size

    @property
    def last_id(self) -> int:
        return self._base + len(self._events) - 1

    def append(self, kind: str, data: dict[str, Any]) -> None:
        if self.closed:
            return
        encoded = encode_event(kind, data, str(self.last_id + 1 if self._first is not None else 1))
        self._size += len(encoded)
        if self._first is None:
            self._first = encoded
        else:
            self._events.append(encoded)
            dropped = 0
            while self._size > self._max_bytes and dropped < len(self._events) - 1:
                self._size -= len(self._events[dropped])
                dropped += 1
            if dropped:
                del self._events[:dropped]
                self._base += dropped
        self._notify()

    def close(self) -> None:
        self.closed = True
        self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def knows(self, event_id: str) -> bool:
        """Whether `event_id` is one of this log's ids (held or dropped)."""
        return event_id.isdigit() and 0 < int(event_id) <= self.last_id

    async def follow(self, after: int = 0) -> AsyncIterator[bytes]:
        """The encoded events after number `after`, as they come, until the turn's last; raises
        EventsDropped when the log no longer holds the next one the reader needs."""
        position = after
        while True:
            wake = self._wake
            if position == 0 and self._first is not None:
                yield self._first
                position = 1
                continue
            index = position + 1 - self._base
            if index < 0:
                raise EventsDropped
            if index < len(self._events):
                # One at a time, re-reading the log each time: a reader parked here holds one
                # event, never a snapshot of the rest.
                yield self._events[index]
                position += 1
                continue
            if self.closed:
                return
            await wake.wait()


class TurnEventLogs:
    """This replica's logs: running turns', and ended ones' for `keep_seconds` (at most
    `keep_ended` of them)."""

    def __init__(self, *, max_bytes: int = 1_048_576, keep_seconds: float = 30.0, keep_ended: int = 1000) -> None:
        self.max_bytes = max_bytes
        self._keep_seconds = keep_seconds
        self._keep_ended = keep_ended
        self._running: dict[str, TurnEventLog] = {}
        self._ended: OrderedDict[str, TurnEventLog] = OrderedDict()

    def open(self, tenant_id: str, conversation_id: str, turn_id: str) -> TurnEventLog:
        log = TurnEventLog(tenant_id, conversation_id, turn_id, max_bytes=self.max_bytes)
        self._running[turn_id] = log
        return log

    def get(self, turn_id: str) -> TurnEventLog | None:
        return self._running.get(turn_id) or self._ended.get(turn_id)

    def running(self) -> int:
        return len(self._running)

    def buffered_bytes(self) -> int:
        return sum(log.size for log in self._running.values()) + sum(log.size for log in self._ended.values())

    def ended(self, log: TurnEventLog) -> None:
        """The turn has written its last event: its log is kept a while for reconnecting clients."""
        log.close()
        self._running.pop(log.turn_id, None)
        self._ended[log.turn_id] = log
        while len(self._ended) > self._keep_ended:
            self._ended.popitem(last=False)
        asyncio.get_running_loop().call_later(self._keep_seconds, self._forget, log)

    def _forget(self, log: TurnEventLog) -> None:
        if self._ended.get(log.turn_id) is log:
            del self._ended[log.turn_id]
