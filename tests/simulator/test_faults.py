"""Fault injection: latency, 429, 5xx bursts, hangs and drops, per instance and per request."""

from __future__ import annotations

import pytest
from google import genai
from google.genai import _interactions as errors

from service.simulator import FaultSpec, RunningSimulator

from .conftest import MODEL, error_body, make_client


def test_rate_limit_carries_retry_after(client: genai.Client, sim: RunningSimulator) -> None:
    """An injected 429 reaches the SDK as RateLimitError with the Retry-After header."""
    sim.app.inject(FaultSpec(status=429, retry_after=1))
    with pytest.raises(errors.RateLimitError) as caught:
        client.interactions.create(model=MODEL, input="hi", store=False)
    assert caught.value.response.headers["retry-after"] == "1"
    assert error_body(caught.value)["error"]["status"] == "RESOURCE_EXHAUSTED"


def test_burst_of_503_is_retried_by_the_sdk(sim: RunningSimulator) -> None:
    """A burst of two 503s fails two attempts; the SDK's third attempt succeeds, so the server saw three creates."""
    sim.app.inject(FaultSpec(status=503, count=2))
    client = make_client(sim, attempts=3, initial_delay=0.01, max_delay=0.02)
    result = client.interactions.create(model=MODEL, input="hi", store=False)
    assert result.status == "completed"
    assert len(sim.app.creates()) == 3


def test_instance_faults_apply_to_the_next_requests_only(client: genai.Client, sim: RunningSimulator) -> None:
    """An instance fault with count=2 fails exactly the next two requests."""
    sim.app.inject(FaultSpec(status=500, count=2))
    for _ in range(2):
        with pytest.raises(errors.InternalServerError):
            client.interactions.create(model=MODEL, input="hi", store=False)
    assert client.interactions.create(model=MODEL, input="hi", store=False).status == "completed"


def test_per_request_fault_header(sim: RunningSimulator) -> None:
    """A request's x-sim-fault header fails that request's first attempts and lets a retry through."""
    client = make_client(sim, attempts=3, initial_delay=0.01, max_delay=0.02)
    result = client.interactions.create(
        model=MODEL, input="hi", store=False, extra_headers={"x-sim-fault": "status=500; count=2"}
    )
    assert result.status == "completed"
    assert len(sim.app.creates()) == 3


def test_unknown_fault_header_field_is_400(client: genai.Client) -> None:
    """A malformed x-sim-fault header is refused rather than ignored."""
    with pytest.raises(errors.BadRequestError, match="unknown fault field"):
        client.interactions.create(model=MODEL, input="hi", store=False, extra_headers={"x-sim-fault": "stauts=500"})


def test_latency_beyond_client_timeout_times_out(client: genai.Client, sim: RunningSimulator) -> None:
    """Added latency longer than the client's timeout surfaces as APITimeoutError."""
    sim.app.inject(FaultSpec(latency_ms=2000))
    with pytest.raises(errors.APITimeoutError):
        client.interactions.create(model=MODEL, input="hi", store=False, timeout=0.2)


def test_hanging_request_times_out(client: genai.Client, sim: RunningSimulator) -> None:
    """A hanging request holds the connection until the client gives up."""
    sim.app.inject(FaultSpec(hang_seconds=30))
    with pytest.raises(errors.APITimeoutError):
        client.interactions.create(model=MODEL, input="hi", store=False, timeout=0.3)


def test_dropped_connection_on_a_unary_call(client: genai.Client, sim: RunningSimulator) -> None:
    """A response cut off part-way raises APIConnectionError."""
    sim.app.inject(FaultSpec(drop=True))
    with pytest.raises(errors.APIConnectionError):
        client.interactions.create(model=MODEL, input="hi", store=False)


def test_sdk_retries_non_idempotent_create_by_default(sim: RunningSimulator) -> None:
    """With its default retry options the SDK re-sends create after a 503: the duplicate Custody must prevent."""
    sim.app.inject(FaultSpec(status=503, retry_after=0.01))
    client = genai.Client(api_key="k", http_options={"base_url": sim.base_url})
    client.interactions.create(model=MODEL, input="hi", store=False)
    assert len(sim.app.creates()) == 2


def test_fault_rates_fail_a_share_of_requests_at_random(client: genai.Client, sim: RunningSimulator) -> None:
    """With a 30 % rate of 503s, about that share of 100 creates fail, the same ones for the same seed; queued faults still come first, and a reset stops the rates."""

    def failures() -> list[int]:
        failed = []
        for index in range(100):
            try:
                client.interactions.create(model=MODEL, input="hi", store=False)
            except errors.InternalServerError:
                failed.append(index)
        return failed

    sim.app.set_fault_rates([(0.3, FaultSpec(status=503))], seed=7)
    first = failures()
    assert 12 <= len(first) <= 50
    sim.app.set_fault_rates([(0.3, FaultSpec(status=503))], seed=7)
    assert failures() == first
    sim.app.inject(FaultSpec(status=400))
    with pytest.raises(errors.BadRequestError):
        client.interactions.create(model=MODEL, input="hi", store=False)
    sim.app.reset()
    assert failures() == []
    with pytest.raises(ValueError, match="sum to at most 1"):
        sim.app.set_fault_rates([(0.7, FaultSpec(status=503)), (0.4, FaultSpec(status=500))])
