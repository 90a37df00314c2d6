"""The Gemini gateway: pinned revision, Custody-owned retries, Vertex AI express mode."""

from __future__ import annotations

import pytest

from service.config import UpstreamSettings
from service.errors import UpstreamFailed
from service.simulator import FaultSpec, RunningSimulator
from service.upstream import Upstream

STEPS = [{"type": "user_input", "content": [{"type": "text", "text": "hello"}]}]
SETTINGS = {"model": "gemini-3-flash-preview"}


def _upstream(gemini: RunningSimulator, *, vertex: bool = False, attempts: int = 3) -> Upstream:
    settings = UpstreamSettings(
        api_key="test-key",
        base_url=gemini.base_url,
        use_vertexai=vertex,
        project="proj" if vertex else None,
        location="europe-west4" if vertex else None,
    )
    return Upstream(settings, attempts=attempts, timeout_seconds=5)


async def test_vertex_express_mode_reaches_the_same_api(gemini: RunningSimulator) -> None:
    """With GOOGLE_GENAI_USE_VERTEXAI and an API key, calls go to the Vertex path with the key and the pinned revision."""
    gemini.app.reset()
    upstream = _upstream(gemini, vertex=True)
    reply = await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    await upstream.aclose()
    assert reply.body["status"] == "completed"
    request = gemini.app.create_requests()[-1]
    assert request.path == "/v1beta1/interactions"
    assert request.headers["x-goog-api-key"] == "test-key"
    assert request.headers["api-revision"] == "2026-05-20"


async def test_provider_storage_turns_are_not_retried_after_5xx(gemini: RunningSimulator) -> None:
    """With store=true a 503 is not retried: a retried create could leave a provider copy we never hear of."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(status=503, retry_after=0))
    upstream = _upstream(gemini)
    with pytest.raises(UpstreamFailed) as caught:
        await upstream.create(settings=SETTINGS, steps=STEPS, store=True)
    await upstream.aclose()
    assert caught.value.code == "upstream_http_503"
    assert len(gemini.app.creates()) == 1


async def test_rate_limits_are_retried_even_with_provider_storage(gemini: RunningSimulator) -> None:
    """A 429 is refused before any work, so it is retried whatever `store` is."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(status=429, retry_after=0))
    upstream = _upstream(gemini)
    reply = await upstream.create(settings=SETTINGS, steps=STEPS, store=True)
    await upstream.aclose()
    assert reply.attempts == 2
    assert len(gemini.app.creates()) == 2


async def test_dropped_connections_are_retried_only_without_storage(gemini: RunningSimulator) -> None:
    """A dropped connection is retried with store=false and reported with store=true."""
    gemini.app.reset()
    upstream = _upstream(gemini)
    gemini.app.inject(FaultSpec(drop=True))
    assert (await upstream.create(settings=SETTINGS, steps=STEPS, store=False)).attempts == 2
    gemini.app.inject(FaultSpec(drop=True))
    with pytest.raises(UpstreamFailed, match="could not be reached"):
        await upstream.create(settings=SETTINGS, steps=STEPS, store=True)
    await upstream.aclose()


async def test_history_is_sent_as_the_same_json_values(gemini: RunningSimulator) -> None:
    """Steps go upstream with nulls and unknown fields intact (the SDK's own `input=` would drop declared nulls)."""
    gemini.app.reset()
    upstream = _upstream(gemini)
    steps = [{"type": "user_input", "content": [{"type": "text", "text": "hi", "annotations": None}], "x_extra": None}]
    await upstream.create(settings=SETTINGS, steps=steps, store=False)
    await upstream.aclose()
    assert gemini.app.creates()[-1]["input"] == steps
