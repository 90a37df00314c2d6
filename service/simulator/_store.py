"""Interactions kept server-side (`store=true`): expiry, background progress and cancellation."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ._errors import not_found

__all__ = ["Clock", "InteractionStore", "StoredInteraction"]


class Clock:
    """Monotonic time that tests may move forward, so expiry and background jobs need no sleeps."""

    def __init__(self) -> None:
        self._offset = 0.0
        self._wall_origin = datetime.now(UTC) - timedelta(seconds=time.monotonic())

    def now(self) -> float:
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        self._offset += seconds

    def iso(self, at: float) -> str:
        return (self._wall_origin + timedelta(seconds=at)).isoformat().replace("+00:00", "Z")


@dataclass
class StoredInteraction:
    """One interaction as the server keeps it."""

    id: str
    body: dict[str, Any]
    history: list[dict[str, Any]]  # everything before this interaction's input (the chain)
    input_steps: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    final_status: str
    usage: dict[str, int]
    created: float
    expires: float
    background: bool = False
    queued_until: float = 0.0
    done_at: float = 0.0
    cancelled_at: float | None = None
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def transcript(self) -> list[dict[str, Any]]:
        return self.history + self.input_steps + self.steps

    def status(self, now: float) -> str:
        if self.cancelled_at is not None:
            return "cancelled"
        if not self.background or now >= self.done_at:
            return self.final_status
        return "queued" if now < self.queued_until else "in_progress"


class InteractionStore:
    """Thread-safe map of stored interactions; expired ones are invisible and then forgotten."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._items: dict[str, StoredInteraction] = {}

    def put(self, item: StoredInteraction) -> None:
        with self._lock:
            self._items[item.id] = item

    def get(self, interaction_id: str) -> StoredInteraction:
        now = self._clock.now()
        with self._lock:
            item = self._items.get(interaction_id)
            if item is not None and now >= item.expires:
                del self._items[interaction_id]
                item = None
        if item is None:
            raise not_found(f"interaction {interaction_id!r} was not found")
        return item

    def delete(self, interaction_id: str) -> None:
        self.get(interaction_id)
        with self._lock:
            self._items.pop(interaction_id, None)

    def adopt(self, interaction_id: str, new_id: str, steps: list[dict[str, Any]]) -> None:
        """Keep a stored interaction under another id with other steps (a test's verbatim answer)."""
        with self._lock:
            item = self._items.pop(interaction_id, None)
            if item is not None:
                item.id, item.steps = new_id, steps
                self._items[new_id] = item

    def ids(self) -> list[str]:
        now = self._clock.now()
        with self._lock:
            return [key for key, item in self._items.items() if now < item.expires]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
