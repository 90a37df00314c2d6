"""The simulator's generateContent surface, through the real SDK: the same model, strict about
thought signatures and function calls, and faults that hit one surface alone."""

from __future__ import annotations

import base64

import pytest
from google import genai
from google.genai import _interactions as interactions_errors
from google.genai import errors, types

from service.simulator import FaultSpec, RunningSimulator

from .conftest import MODEL


def test_a_fault_can_hit_the_interactions_surface_alone(client: genai.Client, sim: RunningSimulator) -> None:
    """A queued interactions-only fault lets generateContent through and waits for the next create."""
    sim.app.inject(FaultSpec(status=503, surface="interactions"))
    answer = client.models.generate_content(model=MODEL, contents="hello from generateContent")
    assert answer.text is not None
    assert 'you said "hello from generateContent"' in answer.text
    with pytest.raises(interactions_errors.APIStatusError) as caught:
        client.interactions.create(model=MODEL, input="hi", store=False)
    assert caught.value.status_code == 503
    assert client.interactions.create(model=MODEL, input="hi", store=False).status == "completed"
    sim.app.inject(FaultSpec(status=500, surface="generate_content"))
    assert client.interactions.create(model=MODEL, input="hi", store=False).status == "completed"
    with pytest.raises(errors.ServerError):
        client.models.generate_content(model=MODEL, contents="hello from generateContent")
    with pytest.raises(ValueError, match="surface"):
        FaultSpec(surface="both")


def test_signatures_it_did_not_issue_are_refused(client: genai.Client) -> None:
    """A thought signature the simulator never issued, or a signed call replayed without its
    signature, is a 400, as the real service refuses them."""
    answer = client.models.generate_content(model=MODEL, contents="hello from generateContent")
    parts = answer.candidates[0].content.parts
    assert parts is not None
    assert parts[0].thought_signature
    history = [
        types.Content(role="user", parts=[types.Part(text="hello from generateContent")]),
        types.Content(role="model", parts=parts),
    ]
    again = [*history, types.Content(role="user", parts=[types.Part(text="more")])]
    assert client.models.generate_content(model=MODEL, contents=again).text
    forged = base64.b64decode(base64.b64encode(b"x" * 40))
    parts[0].thought_signature = forged
    with pytest.raises(errors.ClientError, match="signature"):
        client.models.generate_content(model=MODEL, contents=again)


def test_function_calls_need_their_signature_and_an_answer(client: genai.Client) -> None:
    """A call the model signed must come back with the signature, and be answered before new input."""
    tool = types.Tool(
        function_declarations=[
            types.FunctionDeclaration(name="lookup", parameters_json_schema={"type": "object", "properties": {}})
        ]
    )
    config = types.GenerateContentConfig(
        tools=[tool], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True)
    )
    answer = client.models.generate_content(model=MODEL, contents="call lookup", config=config)
    call_part = answer.candidates[0].content.parts[0]
    assert call_part.function_call is not None
    assert call_part.thought_signature
    call = call_part.function_call
    asked = [types.Content(role="user", parts=[types.Part(text="call lookup")])]
    response = types.Part(function_response=types.FunctionResponse(id=call.id, name=call.name, response={"ok": 1}))
    unanswered = [
        *asked,
        types.Content(role="model", parts=[call_part]),
        types.Content(role="user", parts=[types.Part(text="hi")]),
    ]
    with pytest.raises(errors.ClientError, match="answered"):
        client.models.generate_content(model=MODEL, contents=unanswered, config=config)
    unsigned = types.Part(function_call=call)
    for model_part, expected in ((unsigned, "thought_signature"), (call_part, None)):
        contents = [
            *asked,
            types.Content(role="model", parts=[model_part]),
            types.Content(role="user", parts=[response]),
        ]
        if expected is None:
            assert "lookup returned" in (
                client.models.generate_content(model=MODEL, contents=contents, config=config).text or ""
            )
        else:
            with pytest.raises(errors.ClientError, match=expected):
                client.models.generate_content(model=MODEL, contents=contents, config=config)
