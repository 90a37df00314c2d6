"""requires_continuation: a long turn over several interactions, continued the way the SDK does it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from google import genai
from google.genai import _interactions as errors
from google.genai import interactions

from service.simulator import RunningSimulator

from .conftest import MODEL


def raw_create(client: genai.Client, **body: Any) -> dict[str, Any]:
    return dict(json.loads(client.interactions.with_raw_response.create(**body).read()))


@pytest.mark.parametrize("store", [False, True])
def test_the_sdk_continues_every_hop_and_merges_them(client: genai.Client, sim: RunningSimulator, store: bool) -> None:
    """`sim:continue 2` is answered in three interactions, which the SDK's automatic continuation follows and merges."""
    result = client.interactions.create(model=MODEL, input="a long one sim:continue 2", store=store)
    assert result.status == "completed"
    assert 'you said "a long one sim:continue 2"' in result.output_text
    creates = sim.app.creates()
    assert len(creates) == 3
    assert [("continuation_token" in body) for body in creates] == [False, True, True]
    if store:
        assert all("previous_interaction_id" in body and "input" not in body for body in creates[1:])
    else:
        assert all(body["input"] == creates[0]["input"] for body in creates[1:])
    texts = [
        block.text
        for step in result.steps
        if isinstance(step, interactions.ModelOutputStep)
        for block in step.content
        if isinstance(block, interactions.TextContent)
    ]
    assert texts[:2] == ["(part 1 of 3)", "(part 2 of 3)"]


def test_each_hop_is_its_own_interaction(client: genai.Client) -> None:
    """Every hop has its own id and a single-use token; the last one carries the turn's status and usage."""
    first = raw_create(client, model=MODEL, input="go sim:continue 1", store=False)
    assert first["status"] == "requires_continuation"
    assert first["continuation_token"].startswith("ct_")
    second = raw_create(
        client, model=MODEL, input="go sim:continue 1", store=False, continuation_token=first["continuation_token"]
    )
    assert second["status"] == "completed"
    assert second["id"] != first["id"]
    assert second["steps"][0]["type"] == "user_input"  # clients drop it when merging
    assert "continuation_token" not in second
    with pytest.raises(errors.BadRequestError, match="already used"):
        client.interactions.with_raw_response.create(
            model=MODEL, input="go sim:continue 1", store=False, continuation_token=first["continuation_token"]
        )


def test_a_stateless_continuation_must_resend_the_same_input(client: genai.Client) -> None:
    """With store=false a continuation that changes (or drops) the original input is refused."""
    first = raw_create(client, model=MODEL, input="keep me sim:continue 1", store=False)
    with pytest.raises(errors.BadRequestError, match="resend the original input"):
        client.interactions.with_raw_response.create(
            model=MODEL, input="something else", store=False, continuation_token=first["continuation_token"]
        )


def test_a_stored_continuation_must_name_the_hop_it_follows(client: genai.Client) -> None:
    """With store=true a continuation without the previous hop's id is refused."""
    first = raw_create(client, model=MODEL, input="stored sim:continue 1", store=True)
    with pytest.raises(errors.BadRequestError, match="previous_interaction_id"):
        client.interactions.with_raw_response.create(
            model=MODEL, input="stored sim:continue 1", store=True, continuation_token=first["continuation_token"]
        )
