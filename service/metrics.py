"""Every metric Custody records, and the one method each is recorded through.

The instruments are OpenTelemetry instruments on a meter the composition root hands in (see
service/metrics_export.py, which reads them over OTLP and as Prometheus text); the domain code
calls the methods here at the point where each fact is known, and never sees the SDK.

Labels hold only bounded, content-free values: route and data-class names from the policy, turn
statuses, reason codes, HTTP route templates, outcomes. Never content, never ids of
conversations, turns or keys, never a tenant: a label per tenant multiplies every series by the
number of tenants and tells whoever reads the metrics who the customers are, so the tenant's id
is added (to the counters marked below) only when the operator asks for it with
CUSTODY_METRICS_TENANT_LABELS=true. Histograms never carry it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Protocol

from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeterProvider, Observation
from sqlalchemy import Engine
from sqlalchemy.pool import QueuePool

__all__ = ["HTTP_METHODS", "Metrics", "RetentionCounts", "http_method"]

# Durations in seconds (the OpenTelemetry and Prometheus convention). A turn waits for the model,
# which may take a minute or more; an audit append is a row lock and an insert.
_TURN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_UPSTREAM_BUCKETS = _TURN_BUCKETS
_HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_AUDIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
# The method is client text: any other token is `_OTHER`, as the HTTP semantic conventions say,
# so a client cannot mint series (or log lines) with methods of its own.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "CONNECT"})


def http_method(method: str) -> str:
    """The request method as it may appear in a label, a span or a log line."""
    return method if method in HTTP_METHODS else "_OTHER"


class RetentionCounts(Protocol):
    """What a retention run reports (service.retention.RunSummary), as far as metrics go."""

    dry_run: bool
    purged: int
    skipped: int
    failed: int
    provider_deleted: int
    provider_failed: int
    provider_pending: int
    oldest_pending_seconds: float | None


class Metrics:
    """Custody's instruments on `meter`. `tenant_labels` adds the tenant's id to the per-tenant
    counters (turns, detector hits, lease conflicts, authentication failures on a real key)."""

    def __init__(self, meter: Meter, *, tenant_labels: bool = False) -> None:
        self.tenant_labels = tenant_labels
        self._meter = meter
        self._turns = meter.create_counter(
            "custody.turns", unit="{turn}", description="Turns that reached the model, by route and status"
        )
        self._turn_duration = meter.create_histogram(
            "custody.turn.duration",
            unit="s",
            description="A turn from its request to its stored reply (claim, model, settle), by route and status",
            explicit_bucket_boundaries_advisory=_TURN_BUCKETS,
        )
        self._upstream_attempts = meter.create_counter(
            "custody.upstream.attempts",
            unit="{request}",
            description="Requests sent to the model service, by operation and outcome (ok, http_<status>, timeout, "
            "unreachable, bad_response, not_found)",
        )
        self._upstream_duration = meter.create_histogram(
            "custody.upstream.duration",
            unit="s",
            description="One request to the model service, by operation and outcome (ok or error)",
            explicit_bucket_boundaries_advisory=_UPSTREAM_BUCKETS,
        )
        self._breaker_openings = meter.create_counter(
            "custody.upstream.breaker_openings",
            unit="{opening}",
            description="Times the circuit breaker before the model service opened (it then fails turns fast)",
        )
        self._upstream_failures = meter.create_counter(
            "custody.upstream.failures",
            unit="{call}",
            description="Model calls that failed for good (after Custody's retries), by reason code",
        )
        self._lease_conflicts = meter.create_counter(
            "custody.lease.conflicts",
            unit="{turn}",
            description="Turns refused because another turn holds the conversation (held), or whose lease was "
            "taken over before their reply was stored (lost)",
        )
        self._abandoned = meter.create_counter(
            "custody.lease.abandoned",
            unit="{turn}",
            description="Turns closed as abandoned (their holder died), by who closed them (takeover, reaper)",
        )
        self._detector_hits = meter.create_counter(
            "custody.detector.hits",
            unit="{hit}",
            description="Turn inputs and model answers in which a detector found a data class",
        )
        self._audit_append = meter.create_histogram(
            "custody.audit.append.duration",
            unit="s",
            description="Appending one audit record: waiting for its chain's head row, hashing and inserting",
            explicit_bucket_boundaries_advisory=_AUDIT_BUCKETS,
        )
        self._purges = meter.create_counter(
            "custody.retention.purges",
            unit="{conversation}",
            description="Conversations the retention runner purged, skipped (taken, held or busy) or failed on",
        )
        self._provider_deletions = meter.create_counter(
            "custody.retention.provider_deletions",
            unit="{copy}",
            description="Provider copies the retention runner deleted, or failed to delete",
        )
        self._pending = meter.create_gauge(
            "custody.retention.provider_copies_pending",
            unit="{copy}",
            description="Provider copies waiting for deletion, as of this replica's last retention run",
        )
        self._oldest_pending = meter.create_gauge(
            "custody.retention.oldest_pending_copy_age",
            unit="s",
            description="Age of the oldest provider copy waiting for deletion (0: none), as of this replica's "
            "last retention run",
        )
        self._auth_failures = meter.create_counter(
            "custody.auth.failures",
            unit="{request}",
            description="Requests refused at authentication or authorization, by reason (unauthenticated, "
            "invalid_secret, revoked_key, rate_limited, forbidden, metrics_token)",
        )
        self._http_duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="HTTP requests, by method, route template and status",
            explicit_bucket_boundaries_advisory=_HTTP_BUCKETS,
        )
        self._pool_observed = False

    @classmethod
    def disabled(cls) -> Metrics:
        """Instruments that record nothing: for a service nobody reads metrics from, and tests."""
        return cls(NoOpMeterProvider().get_meter("custody"))

    # --- turns (service/turns) -----------------------------------------------------------------

    def turn_finished(self, route: str, status: str, seconds: float, tenant_id: str) -> None:
        attributes = {"route": route, "status": status}
        self._turns.add(1, self._tenant(attributes, tenant_id))
        self._turn_duration.record(seconds, attributes)

    def lease_conflict(self, kind: str, tenant_id: str) -> None:
        self._lease_conflicts.add(1, self._tenant({"kind": kind}, tenant_id))

    def abandoned_turns(self, count: int, closed_by: str) -> None:
        if count:
            self._abandoned.add(count, {"closed_by": closed_by})

    def detector_hits(self, classes: Iterable[str], tenant_id: str) -> None:
        for name in classes:
            self._detector_hits.add(1, self._tenant({"class": name}, tenant_id))

    # --- the model service (service/upstream.py) -----------------------------------------------

    @contextmanager
    def upstream_request(self, operation: str, classify: Callable[[BaseException], str]) -> Iterator[None]:
        """Count and time one request to the model service; `classify` names the outcome of a
        request that raised (the SDK's errors stay in service/upstream.py)."""
        started = time.perf_counter()
        outcome = "ok"
        try:
            yield
        except BaseException as exc:
            outcome = classify(exc)
            raise
        finally:
            self._upstream_attempts.add(1, {"operation": operation, "outcome": outcome})
            self._upstream_duration.record(
                time.perf_counter() - started, {"operation": operation, "outcome": "ok" if outcome == "ok" else "error"}
            )

    def upstream_failed(self, reason: str) -> None:
        self._upstream_failures.add(1, {"reason": reason})

    def upstream_breaker(self, state: str) -> None:
        """The breaker changed state (closed, open, half_open); openings are counted."""
        if state == "open":
            self._breaker_openings.add(1)

    def watch_upstream_breaker(self, state: Callable[[], int]) -> None:
        """Report the breaker's state (0 closed, 1 half-open, 2 open) whenever metrics are read:
        it goes from open to half-open by the clock alone, with no event to record."""

        def observe(_: CallbackOptions) -> Iterable[Observation]:
            yield Observation(state())

        self._meter.create_observable_gauge(
            "custody.upstream.breaker_state",
            callbacks=[observe],
            unit="1",
            description="The circuit breaker before the model service: 0 closed, 1 half-open (probing), 2 open",
        )

    # --- audit (service/audit) -----------------------------------------------------------------

    def audit_appended(self, seconds: float) -> None:
        self._audit_append.record(seconds)

    # --- retention (service/retention) ---------------------------------------------------------

    def retention_run(self, run: RetentionCounts, *, whole: bool) -> None:
        """A finished run's counts; the pending copies are set only by a run over every tenant
        (`whole`), since a tenant's run counts that tenant's alone."""
        if run.dry_run:
            return
        for outcome, count in (("purged", run.purged), ("skipped", run.skipped), ("failed", run.failed)):
            if count:
                self._purges.add(count, {"outcome": outcome})
        for outcome, count in (("deleted", run.provider_deleted), ("failed", run.provider_failed)):
            if count:
                self._provider_deletions.add(count, {"outcome": outcome})
        if whole:
            self._pending.set(run.provider_pending)
            self._oldest_pending.set(run.oldest_pending_seconds or 0.0)

    # --- authentication (service/api/security.py, service/api/metrics.py) ----------------------

    def auth_failure(self, reason: str, tenant_id: str | None = None) -> None:
        self._auth_failures.add(1, self._tenant({"reason": reason}, tenant_id))

    # --- HTTP (service/api/tracing.py) ---------------------------------------------------------

    def http_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self._http_duration.record(
            seconds,
            {"http.request.method": method, "http.route": route, "http.response.status_code": status},
        )

    # --- the database pool (service/runtime.py) ------------------------------------------------

    def observe_pool(self, engine: Engine) -> None:
        """Observable gauges over the engine's connection pool, read at each collection (the
        engine, not the pool: `dispose` replaces the pool)."""
        if self._pool_observed:
            return
        self._pool_observed = True

        def connections(_: CallbackOptions) -> Iterable[Observation]:
            pool = engine.pool
            if isinstance(pool, QueuePool):
                yield Observation(pool.checkedout(), {"state": "used"})
                yield Observation(pool.checkedin(), {"state": "idle"})

        def size(_: CallbackOptions) -> Iterable[Observation]:
            pool = engine.pool
            if isinstance(pool, QueuePool):
                yield Observation(pool.size())

        self._meter.create_observable_gauge(
            "custody.db.pool.connections",
            callbacks=[connections],
            unit="{connection}",
            description="Database connections of this process's pool: checked out (used) or idle in it",
        )
        self._meter.create_observable_gauge(
            "custody.db.pool.size",
            callbacks=[size],
            unit="{connection}",
            description="The pool's steady size; used connections beyond it are overflow, opened and closed on demand",
        )

    def _tenant(self, attributes: dict[str, str], tenant_id: str | None) -> dict[str, str]:
        """The attributes, with the tenant's id when the operator opted in (a copy: the same
        attributes may go on to a histogram, which never carries it)."""
        if self.tenant_labels and tenant_id is not None:
            return {**attributes, "tenant": tenant_id}
        return attributes
