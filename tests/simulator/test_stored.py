"""Server-side state with store=true: get, delete, cancel, background jobs."""

from __future__ import annotations

import pytest
from google import genai
from google.genai import _interactions as errors

from service.simulator import RunningSimulator

from .conftest import MODEL, error_body, make_client, user_step


def test_get_returns_the_stored_interaction(client: genai.Client) -> None:
    """get returns a stored interaction's steps; include_input adds the input it received."""
    created = client.interactions.create(model=MODEL, input="keep me", store=True)
    plain = client.interactions.with_raw_response.get(created.id).json()
    with_input = client.interactions.get(created.id, include_input=True)
    assert plain["id"] == created.id
    assert plain["status"] == "completed"
    assert "input" not in plain
    assert [s["type"] for s in plain["steps"]] == [
        s.type if s.type != "UNKNOWN" else "x_sim_trace" for s in created.steps
    ]
    assert with_input.model_dump(mode="json")["input"][0]["content"][0]["text"] == "keep me"


def test_store_defaults_to_true(client: genai.Client) -> None:
    """Like the real API, an interaction is stored when `store` is not sent."""
    created = client.interactions.create(model=MODEL, input="default store")
    assert client.interactions.get(created.id).id == created.id


def test_unstored_interaction_cannot_be_read(client: genai.Client) -> None:
    """An interaction created with store=false is a 404 on get."""
    created = client.interactions.create(model=MODEL, input="forget me", store=False)
    with pytest.raises(errors.NotFoundError):
        client.interactions.get(created.id)


def test_delete_removes_the_provider_copy(client: genai.Client) -> None:
    """After delete, get and a second delete are 404s."""
    created = client.interactions.create(model=MODEL, input="delete me", store=True)
    assert client.interactions.delete(created.id) is None
    with pytest.raises(errors.NotFoundError):
        client.interactions.get(created.id)
    with pytest.raises(errors.NotFoundError):
        client.interactions.delete(created.id)


async def test_async_get_and_delete(sim: RunningSimulator) -> None:
    """The async client reads and deletes stored interactions too."""
    client = make_client(sim)
    created = await client.aio.interactions.create(model=MODEL, input=[user_step("async keep")], store=True)
    fetched = await client.aio.interactions.get(created.id)
    assert fetched.status == "completed"
    await client.aio.interactions.delete(created.id)
    with pytest.raises(errors.NotFoundError):
        await client.aio.interactions.get(created.id)


def test_background_job_moves_from_queued_to_completed(client: genai.Client, sim: RunningSimulator) -> None:
    """A background interaction is queued, then in_progress, then completed with its steps."""
    created = client.interactions.create(model=MODEL, input="slow job", background=True, store=True)
    assert created.status == "queued"
    assert not created.steps
    sim.app.advance(0.3)
    assert client.interactions.get(created.id).status == "in_progress"
    sim.app.advance(0.5)
    done = client.interactions.get(created.id)
    assert done.status == "completed"
    assert 'you said "slow job"' in done.output_text


def test_cancel_stops_a_running_background_job(client: genai.Client) -> None:
    """cancel turns a queued background interaction into a cancelled one."""
    created = client.interactions.create(model=MODEL, input="cancel me", background=True, store=True)
    cancelled = client.interactions.cancel(created.id)
    assert cancelled.status == "cancelled"
    assert client.interactions.get(created.id).status == "cancelled"


def test_cancel_of_a_finished_interaction_is_refused(client: genai.Client) -> None:
    """cancel on a completed interaction is a 400 FAILED_PRECONDITION."""
    created = client.interactions.create(model=MODEL, input="done", store=True)
    with pytest.raises(errors.BadRequestError) as caught:
        client.interactions.cancel(created.id)
    assert error_body(caught.value)["error"]["status"] == "FAILED_PRECONDITION"


def test_any_version_prefix_is_served(sim: RunningSimulator) -> None:
    """The API version segment is free: v1beta works like v1."""
    client = genai.Client(
        api_key="k",
        http_options={"base_url": sim.base_url, "api_version": "v1beta", "retry_options": {"attempts": 1}},
    )
    client.interactions.create(model=MODEL, input="hi", store=False)
    assert sim.app.requests[-1].path == "/v1beta/interactions"
