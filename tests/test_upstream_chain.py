"""A turn chained onto the provider's copy of its history (`previous_interaction_id`): what goes
on the wire, and the fall back to the whole history when the provider says that copy is gone."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from google.genai import _interactions as sdk_errors

from service.config import UpstreamSettings
from service.errors import UpstreamFailed
from service.simulator import FaultSpec, RunningSimulator
from service.upstream import Chain, Upstream, _chain_gone

SETTINGS = {"model": "gemini-3-flash-preview", "system_instruction": "Be brief.", "generation_config": {"seed": 7}}


def _step(text: str) -> bytes:
    return json.dumps({"type": "user_input", "content": [{"type": "text", "text": text}]}).encode()


def _upstream(gemini: RunningSimulator, attempts: int = 3) -> Upstream:
    return Upstream(
        UpstreamSettings(api_key="test-key", base_url=gemini.base_url, use_vertexai=False, project=None, location=None),
        attempts=attempts,
    )


async def _first_turn(upstream: Upstream) -> tuple[list[bytes], str]:
    """A stored first turn: the history it leaves (input and answer) and its interaction id."""
    history = [_step("hello")]
    reply = await upstream.create(settings=SETTINGS, steps=history, store=True)
    return [*history, *reply.steps], reply.interaction_ids[-1]


async def test_a_chained_turn_sends_only_its_new_input_and_the_settings(gemini: RunningSimulator) -> None:
    """The request names the copy and carries the new steps only, with the route's settings; hops of a continued turn chain on from there."""
    upstream = _upstream(gemini)
    history, previous = await _first_turn(upstream)
    gemini.app.reset()
    new = _step("and a long answer please sim:continue 1")
    reply = await upstream.create(settings=SETTINGS, steps=[*history, new], store=True, chain=Chain(previous, 1))
    await upstream.aclose()
    first, second = gemini.app.create_requests()
    assert first.raw.endswith(b',"previous_interaction_id":"' + previous.encode() + b'","input":[' + new + b"]}")
    assert {k: first.body[k] for k in SETTINGS} == SETTINGS
    assert second.body["previous_interaction_id"] == first.response["id"]
    assert "input" not in second.body
    assert reply.history_sent == "chained"
    assert reply.interaction_ids == [first.response["id"], second.response["id"]]


@pytest.mark.parametrize("status", [404, 410])
async def test_a_gone_copy_falls_back_to_the_whole_history(gemini: RunningSimulator, status: int) -> None:
    """The provider refuses the chained request as gone: the same turn goes again with the whole history and no previous id; both requests count as attempts."""
    upstream = _upstream(gemini)
    history, previous = await _first_turn(upstream)
    gemini.app.reset()
    gemini.app.inject(FaultSpec(status=status))
    new = _step("next")
    reply = await upstream.create(settings=SETTINGS, steps=[*history, new], store=True, chain=Chain(previous, 1))
    await upstream.aclose()
    refused, replayed = gemini.app.create_requests()
    assert refused.status == status
    assert replayed.raw.endswith(b',"input":[' + b",".join([*history, new]) + b"]}")
    assert "previous_interaction_id" not in replayed.body
    assert (reply.history_sent, reply.attempts) == ("replayed_after_chain_lost", 2)


@pytest.mark.parametrize("status", [400, 500])
async def test_other_refusals_do_not_fall_back(gemini: RunningSimulator, status: int) -> None:
    """A refusal that does not say the copy is gone fails the turn as before (a chained turn has provider storage, so a 500 is not retried): one request, and the failure says the history was chained."""
    upstream = _upstream(gemini)
    history, previous = await _first_turn(upstream)
    gemini.app.reset()
    gemini.app.inject(FaultSpec(status=status))
    with pytest.raises(UpstreamFailed) as failed:
        await upstream.create(settings=SETTINGS, steps=[*history, _step("x")], store=True, chain=Chain(previous, 1))
    await upstream.aclose()
    assert len(gemini.app.create_requests()) == 1
    assert (failed.value.code, failed.value.history_sent) == (f"upstream_http_{status}", "chained")


async def test_without_provider_storage_a_chain_is_ignored(gemini: RunningSimulator) -> None:
    """store=false never names a previous interaction, whatever the caller passes."""
    upstream = _upstream(gemini)
    gemini.app.reset()
    steps = [_step("a"), _step("b")]
    reply = await upstream.create(settings=SETTINGS, steps=steps, store=False, chain=Chain("int_x", 1))
    await upstream.aclose()
    (create,) = gemini.app.create_requests()
    assert "previous_interaction_id" not in create.body
    assert len(create.body["input"]) == 2
    assert reply.history_sent == "replayed"


def _refusal(status: int, body: Any) -> sdk_errors.APIStatusError:
    response = httpx.Response(status, request=httpx.Request("POST", "http://upstream.test/v1beta/interactions"))
    error = sdk_errors.APIError.generate(status_code=status, body=body, message=None, response=response)
    assert isinstance(error, sdk_errors.APIStatusError)
    return error


@pytest.mark.parametrize(
    ("status", "body", "gone"),
    [
        (404, {"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}, True),
        (410, "gone", True),
        (400, {"error": {"code": 400, "message": "previous_interaction_id is invalid or expired"}}, True),
        (400, {"error": {"code": 400, "message": "input must not be empty"}}, False),
        (400, "<html>bad request</html>", False),
        (403, {"error": {"code": 403, "message": "previous_interaction_id belongs to another project"}}, False),
        (500, {"error": {"code": 500, "message": "previous_interaction lookup failed"}}, False),
    ],
)
def test_which_refusals_say_the_copy_is_gone(status: int, body: Any, gone: bool) -> None:
    """404 and 410 always; a 400 only when its message names the previous interaction; nothing else."""
    assert _chain_gone(_refusal(status, body)) is gone
