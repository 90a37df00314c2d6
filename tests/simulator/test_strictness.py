"""Strictness: altered replays, function results and stale ids fail loudly."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from google import genai
from google.genai import _interactions as errors

from service.simulator import RunningSimulator

from .conftest import MODEL, error_body, text_input, user_step

TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    }
]


def turn(client: genai.Client, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    raw = client.interactions.with_raw_response.create(model=MODEL, input=steps, store=False, **extra)
    data: dict[str, Any] = json.loads(raw.read())
    return data


def ask_for_call(client: genai.Client) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    history = [text_input('call get_weather with {"city": "Oslo"}')]
    reply = turn(client, history, tools=TOOLS)
    return history + reply["steps"], reply


def test_function_call_round_trip(client: genai.Client) -> None:
    """A declared tool named with `call NAME with {json}` yields a function_call, and its result is answered."""
    history, reply = ask_for_call(client)
    assert reply["status"] == "requires_action"
    call = next(s for s in reply["steps"] if s["type"] == "function_call")
    assert call["name"] == "get_weather"
    assert call["arguments"] == {"city": "Oslo"}
    assert call["signature"]
    result = {"type": "function_result", "call_id": call["id"], "name": "get_weather", "result": {"temp_c": 4}}
    answer = turn(client, [*history, result], tools=TOOLS)
    assert answer["status"] == "completed"
    assert 'get_weather returned {"temp_c": 4}' in answer["steps"][-1]["content"][0]["text"]


def test_call_without_declared_tool_is_just_text(client: genai.Client) -> None:
    """Naming a tool that is not declared does not produce a function call."""
    reply = turn(client, [text_input("call get_weather")])
    assert reply["status"] == "completed"
    assert all(s["type"] != "function_call" for s in reply["steps"])


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"call_id": "call_nope"}, "matches no function call"),
        ({"name": "get_time"}, "does not match call"),
    ],
)
def test_mismatched_function_result_is_400(client: genai.Client, change: dict[str, str], fragment: str) -> None:
    """A function_result whose call_id or name matches no issued call is a 400, not an empty reply."""
    history, reply = ask_for_call(client)
    call = next(s for s in reply["steps"] if s["type"] == "function_call")
    result = {"type": "function_result", "call_id": call["id"], "name": "get_weather", "result": "4C"} | change
    with pytest.raises(errors.BadRequestError, match=fragment):
        turn(client, [*history, result], tools=TOOLS)


def test_result_for_a_call_outside_this_history_is_400(client: genai.Client) -> None:
    """A function_result for a real call that is not in the replayed history is a 400."""
    _, reply = ask_for_call(client)
    call = next(s for s in reply["steps"] if s["type"] == "function_call")
    result = {"type": "function_result", "call_id": call["id"], "result": "4C"}
    with pytest.raises(errors.BadRequestError, match="not awaiting a result"):
        turn(client, [text_input("hello"), result], tools=TOOLS)


def test_user_input_while_calls_pending_is_400(client: genai.Client) -> None:
    """New user input while a function call waits for its result is a 400."""
    history, _ = ask_for_call(client)
    with pytest.raises(errors.BadRequestError, match="must be answered"):
        turn(client, [*history, text_input("never mind")], tools=TOOLS)


def test_altered_thought_signature_is_400(client: genai.Client) -> None:
    """A replayed thought whose signature was altered is a 400."""
    first = turn(client, [text_input("hello")])
    steps = copy.deepcopy(first["steps"])
    signature = steps[0]["signature"]
    steps[0]["signature"] = ("A" if signature[0] != "A" else "B") + signature[1:]
    with pytest.raises(errors.BadRequestError, match="thought signature is not valid"):
        turn(client, [text_input("hello"), *steps, text_input("again")])


def test_dropped_thought_signature_is_400(client: genai.Client) -> None:
    """A replayed thought without its signature is a 400."""
    first = turn(client, [text_input("hello")])
    steps = copy.deepcopy(first["steps"])
    del steps[0]["signature"]
    with pytest.raises(errors.BadRequestError, match="no signature"):
        turn(client, [text_input("hello"), *steps, text_input("again")])


@pytest.mark.parametrize("where", ["x_sim_trace", "model_output"])
def test_altered_model_steps_are_400(client: genai.Client, where: str) -> None:
    """A replayed model step that lost an unknown field or changed a value is a 400."""
    first = turn(client, [text_input("hello")])
    steps = copy.deepcopy(first["steps"])
    step = next(s for s in steps if s["type"] == where)
    if where == "model_output":
        step.pop("x_sim_meta")
    else:
        step["turn"] = 99
    with pytest.raises(errors.BadRequestError, match="does not match any step"):
        turn(client, [text_input("hello"), *steps, text_input("again")])


def test_faithful_replay_through_sdk_objects_is_accepted(client: genai.Client) -> None:
    """History replayed as the SDK's own typed steps (re-serialized) is still accepted."""
    first = client.interactions.create(model=MODEL, input=[user_step("hello")], store=False)
    second = client.interactions.create(
        model=MODEL, input=[user_step("hello"), *first.steps, user_step("what did I say first?")], store=False
    )
    assert second.output_text == 'You first said: "hello".'


def test_unknown_previous_interaction_is_404(client: genai.Client) -> None:
    """A previous_interaction_id that names no interaction is a 404 NOT_FOUND."""
    with pytest.raises(errors.NotFoundError) as caught:
        client.interactions.create(model=MODEL, input="hi", previous_interaction_id="int_missing")
    assert error_body(caught.value)["error"]["status"] == "NOT_FOUND"


def test_store_false_interaction_cannot_be_chained(client: genai.Client) -> None:
    """An interaction created with store=false cannot be named by previous_interaction_id."""
    first = client.interactions.create(model=MODEL, input="hi", store=False)
    with pytest.raises(errors.NotFoundError):
        client.interactions.create(model=MODEL, input="again", previous_interaction_id=first.id)


def test_expired_previous_interaction_is_404(client: genai.Client, sim: RunningSimulator) -> None:
    """Once the retention TTL passes, a stored interaction cannot be chained or read."""
    first = client.interactions.create(model=MODEL, input="hi", store=True)
    sim.app.advance(61)
    with pytest.raises(errors.NotFoundError):
        client.interactions.create(model=MODEL, input="again", previous_interaction_id=first.id)
    with pytest.raises(errors.NotFoundError):
        client.interactions.get(first.id)
