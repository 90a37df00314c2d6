"""The Gemini gateway: pinned revision, Custody-owned retries, Vertex AI express mode."""

from __future__ import annotations

import json

import pytest

from service.config import UpstreamSettings
from service.errors import UpstreamFailed
from service.simulator import FaultSpec, RunningSimulator
from service.upstream import Upstream

STEPS = [b'{"type":"user_input","content":[{"type":"text","text":"hello"}]}']
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
    await upstream.create(settings=SETTINGS, steps=[json.dumps(step).encode() for step in steps], store=False)
    await upstream.aclose()
    assert gemini.app.creates()[-1]["input"] == steps


@pytest.mark.parametrize("status", [408, 500, 502, 503, 504])
async def test_transient_statuses_are_retried_without_storage(gemini: RunningSimulator, status: int) -> None:
    """With store=false a transient status is retried, and the retry's reply is the turn's."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(status=status, retry_after=0))
    upstream = _upstream(gemini)
    reply = await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    await upstream.aclose()
    assert reply.attempts == 2
    assert reply.body["status"] == "completed"
    assert [json.loads(raw) for raw in reply.steps] == reply.body["steps"]
    assert len(gemini.app.creates()) == 2


async def test_other_statuses_are_not_retried(gemini: RunningSimulator) -> None:
    """A 400 is the request's own fault: reported at once, by status only."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(status=400))
    upstream = _upstream(gemini)
    with pytest.raises(UpstreamFailed) as caught:
        await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    await upstream.aclose()
    assert (caught.value.code, caught.value.attempts) == ("upstream_http_400", 1)
    assert len(gemini.app.creates()) == 1


async def test_retries_stop_after_the_configured_attempts(gemini: RunningSimulator) -> None:
    """Three 503s in a row with three attempts: the turn fails with the status, having sent three requests."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(status=503, retry_after=0, count=3))
    upstream = _upstream(gemini, attempts=3)
    with pytest.raises(UpstreamFailed) as caught:
        await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    await upstream.aclose()
    assert (caught.value.code, caught.value.attempts) == ("upstream_http_503", 3)
    assert len(gemini.app.creates()) == 3


async def test_timeouts_are_not_retried_with_provider_storage(gemini: RunningSimulator) -> None:
    """A model that does not answer in time, with store=true (it may still be working on a copy it keeps), fails the turn with upstream_timeout after one request."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(hang_seconds=3))
    settings = UpstreamSettings(
        api_key="test-key", base_url=gemini.base_url, use_vertexai=False, project=None, location=None
    )
    upstream = Upstream(settings, attempts=3, timeout_seconds=0.3)
    with pytest.raises(UpstreamFailed) as caught:
        await upstream.create(settings=SETTINGS, steps=STEPS, store=True)
    await upstream.aclose()
    assert (caught.value.code, caught.value.timeout, caught.value.attempts) == ("upstream_timeout", True, 1)
    assert len(gemini.app.creates()) == 1


async def test_timeouts_are_retried_without_provider_storage(gemini: RunningSimulator) -> None:
    """With store=false a hung attempt left nothing behind: the next attempt goes, and answers."""
    gemini.app.reset()
    gemini.app.inject(FaultSpec(hang_seconds=3))
    settings = UpstreamSettings(
        api_key="test-key", base_url=gemini.base_url, use_vertexai=False, project=None, location=None
    )
    upstream = Upstream(settings, attempts=3, timeout_seconds=0.3)
    reply = await upstream.create(settings=SETTINGS, steps=STEPS, store=False)
    await upstream.aclose()
    assert reply.attempts == 2
    assert len(gemini.app.creates()) == 2


async def test_a_continued_turn_keeps_its_step_bytes_aligned(gemini: RunningSimulator) -> None:
    """A turn over three interactions: the merged steps and their bytes match, each continuation's echoed input dropped from both."""
    gemini.app.reset()
    upstream = _upstream(gemini)
    steps = [b'{"type":"user_input","content":[{"type":"text","text":"sim:continue 2"}]}']
    reply = await upstream.create(settings=SETTINGS, steps=steps, store=False)
    await upstream.aclose()
    hops = gemini.app.create_requests()
    assert len(hops) == 3
    assert len(reply.interaction_ids) == 3
    assert [json.loads(raw) for raw in reply.steps] == reply.body["steps"]
    assert [step["type"] for step in reply.body["steps"]].count("user_input") == 0
    assert reply.body["status"] == "completed"
