"""A circuit breaker per upstream: after repeated failures, fail fast instead of piling turns up
behind a model service that is down, and find out on its own when it is back.

Closed: requests go through; `failure_threshold` failures in a row (server errors, timeouts,
unreachable: the kinds that say the service is unwell, not that a request was wrong) open it.
Open: every request is refused at once for `open_seconds` (the caller gets 503 with how long is
left as Retry-After). Half-open: then one request at a time goes through as a probe; its success
closes the breaker, its failure opens it again for another `open_seconds`.

One event loop uses it, so no lock: every method runs between awaits.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["BREAKER_STATES", "BreakerOpen", "CircuitBreaker"]

# Gauge values for the metrics: higher is worse.
BREAKER_STATES = {"closed": 0, "half_open": 1, "open": 2}


@dataclass(frozen=True)
class BreakerOpen(Exception):
    """Refused without asking the upstream; `retry_after` seconds until a probe may go."""

    retry_after: float


class CircuitBreaker:
    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        open_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str], None] | None = None,
    ) -> None:
        self._threshold = max(1, failure_threshold)
        self._open_seconds = open_seconds
        self._clock = clock
        self._on_change = on_change
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._opened_at is None:
            return "closed"
        return "open" if self._clock() < self._opened_at + self._open_seconds else "half_open"

    def retry_after(self) -> float:
        """Seconds until the breaker lets a probe through (0 when it would now)."""
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._open_seconds - self._clock())

    def before_request(self) -> None:
        """Raise BreakerOpen unless a request may go now; a half-open breaker lets one through."""
        state = self.state
        if state == "closed":
            return
        if state == "open" or self._probing:
            # While a probe is out, the others wait for its verdict (a short, honest Retry-After).
            raise BreakerOpen(max(1.0, math.ceil(self.retry_after())))
        self._probing = True

    def record_success(self) -> None:
        was = self.state
        self._failures, self._opened_at, self._probing = 0, None, False
        if was != "closed":
            self._changed()

    def record_failure(self) -> None:
        was = self.state
        self._probing = False
        self._failures += 1
        if was == "half_open" or (was == "closed" and self._failures >= self._threshold):
            self._opened_at = self._clock()
            self._changed()

    def record_abandoned(self) -> None:
        """A request that ended without a verdict (cancelled): a probe's turn passes to the next."""
        self._probing = False

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.state)
