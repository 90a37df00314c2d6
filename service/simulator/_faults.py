"""Fault injection: latency, error statuses, hangs and dropped connections.

A fault comes from the instance (`Simulator.inject(...)`, or `POST /_simulator/faults`) and
applies to the next `count` API requests, or from a request's `x-sim-fault` header, e.g.
`x-sim-fault: status=503; count=3`. The SDK re-sends headers on its own retries, so a header
fault with `count=3` fails the first three attempts of that request and lets the fourth through.
Fault rates (`Simulator.set_fault_rates(...)`, or `POST /_simulator/fault-rates`) give any
request without a queued or header fault a fault at random: e.g. 5 % 503s and 1 % hangs, drawn
from a seeded generator so that a benchmark's run can be repeated.

A fault's `surface` says which requests it may hit: `interactions` (the Interactions API),
`generate_content` (`models/{model}:generateContent`) or `any` (the default). A queued fault
waits for a request of its surface, and the others pass it by: `FaultSpec(status=503,
surface="interactions", count=1000)` takes the Interactions surface down while generateContent
answers, which is what a route's generateContent fallback is for.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["SURFACES", "FaultPlan", "FaultSpec"]

SURFACES = frozenset({"interactions", "generate_content", "any"})


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
    surface: str = "any"  # interactions | generate_content | any: the requests it may hit

    def __post_init__(self) -> None:
        if self.surface not in SURFACES:
            raise ValueError(f"surface must be one of {sorted(SURFACES)}")

    def hits(self, surface: str) -> bool:
        return self.surface in {"any", surface}

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
    if text == "str":
        return raw
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
        self._rates: list[tuple[float, FaultSpec]] = []
        self._random = random.Random(0)  # noqa: S311 - reproducible draws for tests, not a secret

    def set_rates(self, rates: list[tuple[float, FaultSpec]], seed: int = 0) -> None:
        """Each request without another fault gets one of these at random, with its probability
        (their sum at most 1); an empty list stops it."""
        if any(p < 0 for p, _ in rates) or sum(p for p, _ in rates) > 1:
            raise ValueError("fault probabilities must be non-negative and sum to at most 1")
        with self._lock:
            self._rates = list(rates)
            self._random = random.Random(seed)  # noqa: S311 - see __init__

    def inject(self, spec: FaultSpec) -> None:
        with self._lock:
            self._queue.append([spec, spec.count])

    def clear(self) -> None:
        with self._lock:
            self._queue.clear()
            self._header_seen.clear()
            self._rates = []

    def next_fault(self, header: str | None, surface: str = "interactions") -> FaultSpec | None:
        """The fault for this request (on `surface`), consuming one use of it."""
        if header:
            spec = FaultSpec.parse(header)
            if not spec.hits(surface):
                return None
            with self._lock:
                seen = self._header_seen.get(header, 0) + 1
                self._header_seen[header] = seen
            return spec if seen <= spec.count else None
        with self._lock:
            index = next((i for i, entry in enumerate(self._queue) if entry[0].hits(surface)), None)
            if index is None:
                drawn = self._drawn()
                return drawn if drawn is not None and drawn.hits(surface) else None
            entry = self._queue[index]
            entry[1] -= 1
            if entry[1] <= 0:
                self._queue.pop(index)
            queued: FaultSpec = entry[0]
            return queued

    def _drawn(self) -> FaultSpec | None:
        """A fault at random from the rates (the lock held)."""
        if not self._rates:
            return None
        draw = self._random.random()
        for probability, spec in self._rates:
            if draw < probability:
                return spec
            draw -= probability
        return None
