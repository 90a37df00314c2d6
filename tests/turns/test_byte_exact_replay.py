"""Replay is byte-exact: a model step goes back upstream spelled exactly as the upstream sent it.

The upstream here answers with steps a JSON re-serializer would change: keys out of any sorted
order, spaces and newlines between tokens, numbers spelled `1.50E+2`, `-0.0`, `1e-7` and past
2**64, a non-ASCII character escaped and another one raw. Custody must store those bytes and
splice them into the next turn's `input` untouched, and still read them as the same JSON values.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from service.context import ServiceContext
from service.conversations import load_cipher, read_steps
from service.models import Conversation
from service.simulator import RunningSimulator

from ..api.helpers import open_conversation, take_turn
from ..conftest import Tenant

MODEL_STEP = (
    b'{ "type" : "model_output",\n  "content": [ {"text": "r\\u00e9ponse \xc3\xa9 ok", "type":"text",'
    b' "x_score": 1.50E+2, "x_neg": -0.0, "x_small": 1e-7, "x_big": 123456789012345678901234567890} ] }'
)
THOUGHT_STEP = b'{"signature":"c2ln" , "type":"thought"}'
RESPONSE = (
    b'{\n  "status" : "completed",\n  "id": "int_bytes_exact_1",\n  "steps" : [\n    '
    + THOUGHT_STEP
    + b" ,\n    "
    + MODEL_STEP
    + b'\n  ],\n  "usage": {"total_tokens": 7 , "total_input_tokens": 3, "total_output_tokens": 4}\n}\n'
)


async def test_model_steps_are_replayed_byte_for_byte(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, ctx: ServiceContext
) -> None:
    """The next turn's request carries the stored model steps as the very bytes the upstream sent."""
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.answer_next_create(RESPONSE)
    first = await take_turn(api, tenant.headers(), conversation, "first")
    # The caller gets the same JSON values, whatever their spelling upstream.
    assert first["steps"] == [json.loads(THOUGHT_STEP), json.loads(MODEL_STEP)]
    assert first["output_text"] == "réponse é ok"

    gemini.app.reset()
    await take_turn(api, tenant.headers(), conversation, "second")
    (request,) = gemini.app.create_requests()
    # Input: the first user input, the two model steps exactly as sent, then the new input.
    assert THOUGHT_STEP + b"," + MODEL_STEP + b"," in request.raw
    sent: list[Any] = request.body["input"]
    assert sent[1:3] == [json.loads(THOUGHT_STEP), json.loads(MODEL_STEP)]
    # A re-serializer would have written the number differently: the exact spelling went out.
    assert b"1.50E+2" in request.raw
    assert b"123456789012345678901234567890" in request.raw

    # What is stored is those bytes too, and the history API reads them as the same values.
    async with ctx.sessions() as session:
        row = await session.get(Conversation, conversation)
        assert row is not None
        stored = [step for _, _, step in await read_steps(session, await load_cipher(session, ctx, row))]
    assert stored[1:3] == [THOUGHT_STEP, MODEL_STEP]
    history = await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())
    assert history.status_code == 200, history.text
    assert [item["step"] for item in history.json()["steps"]][1:3] == [
        json.loads(THOUGHT_STEP),
        json.loads(MODEL_STEP),
    ]
