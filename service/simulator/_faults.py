"""Fault injection: latency, error statuses, hangs and dropped connections.

A fault comes from the instance (`Simulator.inject(...)`, or `POST /_simulator/faults`) and
applies to the next `count` API requests, or from a request's `x-sim-fault` header, e.g.
`x-sim-fault: status=503; count=3`. The SDK re-sends headers on its own retries, so a header
fault with `count=3` fails the first three attempts of that request and lets the fourth through.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["FaultPlan", "FaultSpec"]


@dataclass(frozen=True)
class FaultSpec:
    """What to do to a request instead of (or before) answering it."""

    latency_ms: float = 0.0
    status: int | None = None  # answer with this HTTP error status
    retry_after: float | None = None  # seconds, sent as Retry-After with `status`
    hang_seconds: float | None = None  # hold the request this long, then drop the connection
    drop: bool = False  # drop the connection part-way through the response body
    drop_after_events: int = 1  # for streams: SSE events sent before the drop
    event_gap_ms: float = 0.0  # for streams: a pause before each event after the first (token pacing)
    # For streams: after this many events, hold the rest until the simulator's clock has moved
    # `pause_seconds` on (tests move it with advance()), as a model still at work would.
    pause_after_events: int | None = None
    pause_seconds: float = 3600.0
    count: int = 1  # requests this fault applies to

    @classmethod
    def parse(cls, header: str) -> FaultSpec:
        """`status=429; retry-after=1; count=2` -> FaultSpec; unknown keys are an error."""
        values: dict[str, Any] = {}
        names = {f.name: f for f in fields(cls)}
        for part in filter(None, (p.strip() for p in header.split(";"))):
            key, _, raw = part.partition("=")
            name = key.strip().replace("-", "_")
            if name not in names:
                raise ValueError(f"unknown fault field {key.strip()!r}")
            values[name] = _coerce(names[name].type, raw.strip() or "true")
        return cls(**values)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FaultSpec:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fault field(s) {sorted(unknown)}")
        return cls(**data)


def _coerce(annotation: Any, raw: str) -> Any:
    text = str(annotation)
    if "bool" in text:
        return raw.lower() in {"1", "true", "yes"}
    if "int" in text and "float" not in text:
        return int(raw)
    return float(raw)


class FaultPlan:
    """Pending instance faults and per-header burst counters."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: list[list[Any]] = []  # [spec, remaining]
        self._header_seen: dict[str, int] = {}

    def inject(self, spec: FaultSpec) -> None:
        with self._lock:
            self._queue.append([spec, spec.count])

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._header_seen.clear()

    def next_fault(self, header: str | None) -> FaultSpec | None:
        """The fault for this request, consuming one use of it."""
        if header:
            spec = FaultSpec.parse(header)
            with self._lock:
                seen = self._header_seen.get(header, 0) + 1
                self._header_seen[header] = seen
            return spec if seen <= spec.count else None
        with self._lock:
            if not self._queue:
                return None
            entry = self._queue[0]
            entry[1] -= 1
            if entry[1] <= 0:
                self._queue.pop(0)
            queued: FaultSpec = entry[0]
            return queued
