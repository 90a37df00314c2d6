"""create: input shapes, settings, the deterministic model and usage."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from google import genai
from google.genai import _interactions as errors
from google.genai import interactions

from service.simulator import RunningSimulator

from .conftest import MODEL, error_body, make_client, text_input, user_step


def raw_create(client: genai.Client, **body: Any) -> dict[str, Any]:
    response = client.interactions.with_raw_response.create(**body)
    data: dict[str, Any] = json.loads(response.read())
    return data


def test_string_input_gets_a_thought_and_an_echo(client: genai.Client) -> None:
    """A string input is answered with a signed thought step and a reply that quotes it."""
    result = client.interactions.create(model=MODEL, input="Hello simulator", store=False)
    assert result.status == "completed"
    assert 'you said "Hello simulator"' in result.output_text
    thought = result.steps[0]
    assert thought.type == "thought"
    assert thought.signature


def test_agent_is_accepted_and_echoed(client: genai.Client) -> None:
    """An agent name may replace the model, and the interaction names it back."""
    data = raw_create(client, agent="deep-research-pro-preview-12-2025", input="hi", store=False)
    assert data["agent"] == "deep-research-pro-preview-12-2025"
    assert "model" not in data


def test_content_blocks_are_wrapped_as_user_input(client: genai.Client, sim: RunningSimulator) -> None:
    """A list of content blocks arrives as one user_input step and is answered from its text."""
    blocks: list[interactions.ContentParam] = [{"type": "text", "text": "block one"}]
    result = client.interactions.create(model=MODEL, input=blocks, store=False)
    assert sim.app.creates()[-1]["input"] == [text_input("block one")]
    assert 'you said "block one"' in result.output_text


async def test_async_client_creates(sim: RunningSimulator) -> None:
    """The async client gets the same kind of answer as the sync one."""
    client = make_client(sim)
    result = await client.aio.interactions.create(model=MODEL, input=[user_step("async hi")], store=False)
    assert 'you said "async hi"' in result.output_text


def test_replayed_history_is_what_the_model_answers_from(client: genai.Client) -> None:
    """'What did I say first?' is answered correctly only when the history is replayed."""
    first = raw_create(client, model=MODEL, input="My favourite colour is teal", store=False)
    question = user_step("What did I say first?")
    replay: list[interactions.StepParam] = [user_step("My favourite colour is teal"), *first["steps"], question]
    with_history = client.interactions.create(model=MODEL, input=replay, store=False)
    without = client.interactions.create(model=MODEL, input=[question], store=False)
    assert with_history.output_text == 'You first said: "My favourite colour is teal".'
    assert without.output_text == 'You first said: "What did I say first?".'


def test_previous_interaction_id_chains_stored_history(client: genai.Client) -> None:
    """A stored interaction's history is available to the next turn by id."""
    first = client.interactions.create(model=MODEL, input="Remember the word quince", store=True)
    second = client.interactions.create(
        model=MODEL, input="what did I say first?", previous_interaction_id=first.id, store=True
    )
    third = client.interactions.create(
        model=MODEL, input="how many messages?", previous_interaction_id=second.id, store=False
    )
    assert second.output_text == 'You first said: "Remember the word quince".'
    assert third.output_text == "You have sent 3 messages."


def test_settings_reach_the_wire_as_sent(client: genai.Client, sim: RunningSimulator) -> None:
    """system_instruction, tools, generation_config and response_format are received as sent."""
    tools = [{"type": "function", "name": "lookup", "description": "d", "parameters": {"type": "object"}}]
    client.interactions.create(
        model=MODEL,
        input="hi",
        store=False,
        system_instruction="Be brief.",
        tools=tools,
        generation_config={"temperature": 0.2, "thinking_level": "low"},
        response_format={"type": "text", "mime_type": "application/json", "schema": {"type": "object"}},
    )
    body = sim.app.creates()[-1]
    assert body["system_instruction"] == "Be brief."
    assert body["tools"] == tools
    assert body["generation_config"] == {"temperature": 0.2, "thinking_level": "low"}
    assert body["response_format"]["schema"] == {"type": "object"}
    assert body["store"] is False


def test_json_output_validates_against_response_format(client: genai.Client) -> None:
    """With a response_format schema the reply is JSON that validates against it."""
    schema = {
        "type": "object",
        "properties": {
            "answer": {"type": "string", "minLength": 3},
            "confidence": {"type": "number", "minimum": 0},
            "sources": {"type": "array", "items": {"type": "string"}, "minItems": 2},
            "kind": {"enum": ["faq", "other"]},
            "nested": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
        },
        "required": ["answer", "confidence", "sources", "kind", "nested"],
        "additionalProperties": False,
    }
    result = client.interactions.create(
        model=MODEL,
        input="What are your opening hours?",
        store=False,
        response_format={"type": "text", "mime_type": "application/json", "schema": schema},
    )
    jsonschema.validate(json.loads(result.output_text), schema)


def test_usage_grows_with_input_size(client: genai.Client) -> None:
    """Input token counts grow with the size of the input."""
    small = client.interactions.create(model=MODEL, input="short", store=False)
    large = client.interactions.create(model=MODEL, input="long " * 400, store=False)
    assert small.usage
    assert large.usage
    assert large.usage.total_input_tokens > small.usage.total_input_tokens * 10
    assert large.usage.total_tokens == (
        large.usage.total_input_tokens + large.usage.total_output_tokens + large.usage.total_thought_tokens
    )


def test_unknown_step_types_and_fields_are_emitted(client: genai.Client) -> None:
    """Every turn carries an unknown step type and unknown fields, which the SDK keeps raw."""
    data = raw_create(client, model=MODEL, input="hi", store=False)
    kinds = [s["type"] for s in data["steps"]]
    assert kinds == ["thought", "x_sim_trace", "model_output"]
    assert data["steps"][2]["x_sim_meta"]["nested"] == {"kept": None}
    parsed = client.interactions.create(model=MODEL, input="hi", store=False)
    assert getattr(parsed.steps[1], "is_unknown", False)


def test_failure_trigger_ends_failed(client: genai.Client) -> None:
    """The sim:fail trigger makes the interaction end `failed` with an error on its output."""
    data = raw_create(client, model=MODEL, input="please sim:fail now", store=False)
    assert data["status"] == "failed"
    assert data["steps"][-1]["error"]["code"] == 500


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"input": "hi", "extra_body": {"stroe": False}}, "Unknown name 'stroe'"),
        ({"input": "hi", "generation_config": {"temperature": 7}}, "temperature"),
        ({"input": "hi", "generation_config": {"thinking_level": "max"}}, "thinking_level"),
        ({"input": "hi", "tools": [{"type": "function"}]}, "needs a name"),
        ({"input": "hi", "extra_body": {"store": "no"}}, "store must be a boolean"),
        ({"input": [], "store": False}, "non-empty"),
    ],
)
def test_malformed_bodies_are_400_in_google_shape(client: genai.Client, body: dict[str, Any], fragment: str) -> None:
    """A malformed create body is a 400 with Google's {error: {code, message, status}} JSON."""
    with pytest.raises(errors.BadRequestError) as caught:
        client.interactions.create(model=MODEL, **body)
    error = error_body(caught.value)["error"]
    assert error["code"] == 400
    assert error["status"] == "INVALID_ARGUMENT"
    assert fragment in error["message"]


def test_non_json_body_is_400(sim: RunningSimulator) -> None:
    """A body that is not JSON at all (which the SDK cannot send) is a 400 in Google's shape."""
    import httpx

    response = httpx.post(f"{sim.base_url}/v1/interactions", content=b"{not json", headers={"x-goog-api-key": "k"})
    assert response.status_code == 400
    assert response.json()["error"]["status"] == "INVALID_ARGUMENT"


def test_background_without_store_is_refused(client: genai.Client) -> None:
    """background=true with store=false is a 400."""
    with pytest.raises(errors.BadRequestError, match="background=true requires store=true"):
        client.interactions.create(model=MODEL, input="hi", background=True, store=False)


def test_wrong_api_key_is_refused() -> None:
    """A simulator configured with a key refuses any other key, as Google does."""
    from service.simulator import SimulatorConfig, start_simulator

    with start_simulator(SimulatorConfig(api_key="right")) as sim:
        client = genai.Client(
            api_key="wrong", http_options={"base_url": sim.base_url, "retry_options": {"attempts": 1}}
        )
        with pytest.raises(errors.BadRequestError, match="API key not valid"):
            client.interactions.create(model=MODEL, input="hi", store=False)
