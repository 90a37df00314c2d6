"""Upstream resilience: a deadline per turn across attempts, Retry-After as seconds or an HTTP date,
full jitter, and a circuit breaker that opens, fails fast, half-opens and closes on its own; and
how each failure reaches the caller (502/503/504 problem+json, Retry-After when known)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import httpx
import pytest

from service.api import create_app
from service.auth_failures import AuthFailures
from service.circuit_breaker import BreakerOpen, CircuitBreaker
from service.context import ServiceContext
from service.errors import UpstreamFailed
from service.metrics_export import metrics_export_from_env
from service.simulator import FaultSpec, RunningSimulator
from service.upstream import Upstream, _backoff, _retry_after

from .api.helpers import assert_problem, open_conversation
from .conftest import Tenant, asgi_transport, make_upstream
from .observability import Scrape

STEPS = [b'{"type":"user_input","content":[{"type":"text","text":"hello"}]}']
SETTINGS = {"model": "gemini-3-flash-preview"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breaker(clock: FakeClock, failures: int = 3) -> CircuitBreaker:
    return CircuitBreaker(failure_threshold=failures, open_seconds=30, clock=clock)


# --- the breaker on its own --------------------------------------------------------------------


def test_the_breaker_opens_after_failures_in_a_row_and_not_before() -> None:
    """Failures in a row open it; a success between them starts the count again."""
    clock = FakeClock()
    breaker = _breaker(clock)
    for _ in range(2):
        breaker.before_request()
        breaker.record_failure()
    breaker.record_success()
    for _ in range(2):
        breaker.before_request()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_failure()
    assert breaker.state == "open"
    with pytest.raises(BreakerOpen) as refused:
        breaker.before_request()
    assert refused.value.retry_after == 30


def test_the_breaker_half_opens_lets_one_probe_through_and_closes_on_its_success() -> None:
    """After the open period one request goes through as a probe (the others still wait); its success closes the breaker, its failure opens it again."""
    clock = FakeClock()
    breaker = _breaker(clock, failures=1)
    breaker.before_request()
    breaker.record_failure()
    clock.now += 30
    assert breaker.state == "half_open"
    breaker.before_request()  # the probe
    with pytest.raises(BreakerOpen):
        breaker.before_request()  # another request while the probe is out
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 30
    breaker.before_request()
    breaker.record_success()
    assert breaker.state == "closed"
    breaker.before_request()


def test_a_cancelled_probe_lets_the_next_request_probe() -> None:
    clock = FakeClock()
    breaker = _breaker(clock, failures=1)
    breaker.record_failure()
    clock.now += 31
    breaker.before_request()
    breaker.record_abandoned()
    breaker.before_request()


# --- waits ---------------------------------------------------------------------------------------


def test_retry_after_is_read_as_seconds_an_http_date_or_milliseconds() -> None:
    in_20s = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    past = format_datetime(datetime.now(UTC) - timedelta(seconds=20), usegmt=True)
    assert _retry_after(httpx.Headers({"retry-after": "3"})) == 3
    assert 18 <= (_retry_after(httpx.Headers({"retry-after": in_20s})) or 0) <= 20
    assert _retry_after(httpx.Headers({"retry-after": past})) == 0
    assert _retry_after(httpx.Headers({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert _retry_after(httpx.Headers({"retry-after": "soon"})) is None
    assert _retry_after(httpx.Headers({})) is None


def test_backoff_is_fully_jittered() -> None:
    """Anywhere from nothing to the exponential step: clients that failed together spread out."""
    draws = [_backoff(3) for _ in range(400)]
    assert all(0 <= d <= 1.0 for d in draws)
    assert min(draws) < 0.2
    assert max(draws) > 0.8


# --- the deadline --------------------------------------------------------------------------------


async def test_the_deadline_bounds_a_turn_whose_upstream_hangs_on_every_attempt(gemini: RunningSimulator) -> None:
    """Every attempt hangs: each is cut to what is left of the turn's deadline (far below the 30 s per-attempt timeout), and the turn fails as `upstream_deadline` instead of waiting attempts x timeout."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(hang_seconds=5, count=5))
    upstream = make_upstream(gemini, attempts=5, timeout_seconds=30)
    with pytest.raises(UpstreamFailed) as caught:
        await upstream.create(settings=SETTINGS, steps=STEPS, store=False, deadline=time.monotonic() + 0.6)
    await upstream.aclose()
    assert (caught.value.code, caught.value.timeout) == ("upstream_deadline", True)
    assert 1 <= len(gemini.app.creates()) <= 5
    gemini.app.reset()


async def test_no_retry_starts_that_could_not_start_before_the_deadline(gemini: RunningSimulator) -> None:
    """A 503 asking for a 5 s wait, with 1 s of the deadline left: the error goes back at once, with the service's Retry-After."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(status=503, retry_after=5, count=2))
    upstream = make_upstream(gemini, attempts=3)
    with pytest.raises(UpstreamFailed) as caught:
        await upstream.create(settings=SETTINGS, steps=STEPS, store=False, deadline=time.monotonic() + 1)
    await upstream.aclose()
    assert (caught.value.code, caught.value.upstream_status, caught.value.retry_after) == ("upstream_http_503", 503, 5)
    assert len(gemini.app.creates()) == 1
    gemini.app.reset()


async def test_a_wait_longer_than_a_turn_should_wait_goes_to_the_caller(gemini: RunningSimulator) -> None:
    """A 429 asking for a minute is not waited out inside the turn: one request, and the caller learns when to come back."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(status=429, retry_after=60))
    upstream = make_upstream(gemini, attempts=3)
    with pytest.raises(UpstreamFailed) as caught:
        await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    await upstream.aclose()
    assert (caught.value.unavailable, caught.value.retry_after) == (True, 60)
    assert len(gemini.app.creates()) == 1


# --- the breaker in front of the model service ---------------------------------------------------


async def test_the_breaker_opens_fails_fast_half_opens_and_closes(gemini: RunningSimulator) -> None:
    """Three failed creates open it; the next is refused without a request reaching the model; after the open period a probe goes through and its success closes the breaker."""
    gemini.app.reset()
    upstream = make_upstream(gemini, attempts=1)
    clock = FakeClock()
    upstream.breaker = _breaker(clock)
    gemini.app.inject(FaultSpec(status=500, count=3))
    for _ in range(3):
        with pytest.raises(UpstreamFailed):
            await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    assert upstream.breaker.state == "open"
    with pytest.raises(UpstreamFailed) as caught:
        await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    assert (caught.value.code, caught.value.unavailable, caught.value.retry_after) == (
        "upstream_circuit_open",
        True,
        30,
    )
    assert len(gemini.app.creates()) == 3  # the fourth never left
    clock.now += 30
    reply = await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    assert reply.body["status"] == "completed"
    assert upstream.breaker.state == "closed"
    await upstream.aclose()


async def test_refusals_of_the_request_itself_do_not_open_the_breaker(gemini: RunningSimulator) -> None:
    """400s and 429s say the service is up: however many, the breaker stays closed."""
    gemini.app.reset()
    upstream = make_upstream(gemini, attempts=1)
    upstream.breaker = _breaker(FakeClock(), failures=2)
    gemini.app.inject(FaultSpec(status=400, count=2))
    gemini.app.inject(FaultSpec(status=429, count=2))
    for _ in range(4):
        with pytest.raises(UpstreamFailed):
            await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    assert upstream.breaker.state == "closed"
    await upstream.aclose()


# --- what the caller sees ------------------------------------------------------------------------


@pytest.fixture
async def own_upstream(
    ctx: ServiceContext, gemini: RunningSimulator
) -> AsyncIterator[tuple[httpx.AsyncClient, Upstream]]:
    """The app with an upstream (and breaker) of its own, opening after two failures."""
    gemini.app.reset()
    upstream = make_upstream(gemini, attempts=1, timeout_seconds=30, breaker_failures=2, breaker_open_seconds=30)
    own = dataclasses.replace(ctx, upstream=upstream, auth_failures=AuthFailures())
    async with httpx.AsyncClient(
        transport=asgi_transport(create_app(own, max_body_bytes=64_000)), base_url="http://custody.test"
    ) as client:
        yield client, upstream
    await upstream.aclose()
    gemini.app.reset()


async def _turn(api: httpx.AsyncClient, tenant: Tenant, conversation: str, **headers: str) -> httpx.Response:
    return await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "hello"}, headers=tenant.headers() | headers
    )


async def test_failures_answer_502_503_504_naming_the_upstream_status(
    own_upstream: tuple[httpx.AsyncClient, Upstream], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """A 400 from the model: 502 naming it. A 503 with Retry-After: 503 with the same Retry-After. Then the breaker is open (two server failures): 503 upstream_circuit_open with Retry-After, visible in /readyz, and no request reaches the model."""
    api, _ = own_upstream
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(FaultSpec(status=400))
    body = assert_problem(await _turn(api, tenant, conversation), 502, "upstream-failed")
    assert (body["code"], body["upstream_status"]) == ("upstream_http_400", 400)

    gemini.app.inject(FaultSpec(status=503, retry_after=7))
    response = await _turn(api, tenant, conversation)
    body = assert_problem(response, 503, "upstream-failed")
    assert (body["code"], body["upstream_status"], response.headers["retry-after"]) == ("upstream_http_503", 503, "7")

    gemini.app.inject(FaultSpec(status=500))
    assert_problem(await _turn(api, tenant, conversation), 502, "upstream-failed")
    sent = len(gemini.app.creates())
    response = await _turn(api, tenant, conversation)
    body = assert_problem(response, 503, "upstream-failed")
    assert body["code"] == "upstream_circuit_open"
    assert "upstream_status" not in body
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert len(gemini.app.creates()) == sent
    ready = (await api.get("/readyz")).json()
    assert ready["status"] == "ready"
    assert ready["upstream"]["breaker"] == "open"
    assert 0 < ready["upstream"]["retry_after"] <= 30


async def test_request_timeout_shortens_the_deadline(
    own_upstream: tuple[httpx.AsyncClient, Upstream], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """A model that hangs, a caller that will wait half a second: 504 upstream_deadline (the per-attempt timeout is 30 s); a malformed Request-Timeout is 422 naming the header, with nothing sent."""
    api, _ = own_upstream
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(FaultSpec(hang_seconds=5))
    body = assert_problem(await _turn(api, tenant, conversation, **{"Request-Timeout": "0.5"}), 504, "upstream-failed")
    assert body["code"] == "upstream_deadline"
    gemini.app.reset()
    for bad in ("0", "-1", "1e3", "soon", "99999999", " 5"):
        response = await _turn(api, tenant, conversation, **{"Request-Timeout": bad})
        assert assert_problem(response, 422, "invalid-input")["pointer"] == "Request-Timeout", bad
    assert gemini.app.creates() == []


async def test_the_breaker_is_in_the_metrics(gemini: RunningSimulator) -> None:
    """The breaker's state as a gauge (read when scraped: it half-opens by the clock alone) and its openings as a counter."""
    export = metrics_export_from_env({"OTEL_TRACES_EXPORTER": "none"}, prometheus=True)
    gemini.app.reset()
    upstream = make_upstream(gemini, attempts=1, metrics=export.metrics, breaker_failures=1, breaker_open_seconds=30)
    clock = FakeClock()
    upstream.breaker = CircuitBreaker(
        failure_threshold=1, open_seconds=30, clock=clock, on_change=export.metrics.upstream_breaker
    )
    assert Scrape(export.prometheus_text().decode()).value("custody_upstream_breaker_state") == 0
    gemini.app.inject(FaultSpec(status=500))
    with pytest.raises(UpstreamFailed):
        await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    scrape = Scrape(export.prometheus_text().decode())
    assert scrape.value("custody_upstream_breaker_state") == 2
    assert scrape.value("custody_upstream_breaker_openings_total") == 1
    clock.now += 30
    assert Scrape(export.prometheus_text().decode()).value("custody_upstream_breaker_state") == 1
    await upstream.aclose()
    export.shutdown()
