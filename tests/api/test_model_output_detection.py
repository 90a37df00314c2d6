"""The detectors also read the model's answer on its way into storage: a model that echoes a card
number raises the conversation's classification, and one whose answer carries a class the route
blocks gets its turn refused with nothing stored. The matched text is recorded nowhere."""

from __future__ import annotations

import json
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from service.simulator import RunningSimulator

from ..conftest import CANARY, Tenant
from .helpers import assert_problem, open_conversation, row_counts, take_turn

CARD = "4111 1111 1111 1111"
BILLING = {"route": "billing-support", "data_classes": ["financial"]}
INTAKE = {"route": "patient-intake", "data_classes": ["phi"]}


def answer(*steps: dict[str, Any], status: str = "completed") -> bytes:
    """An upstream reply carrying `steps`, as bytes for the simulator to send verbatim."""
    return json.dumps(
        {"id": "int_output_scan_1", "status": status, "steps": list(steps), "usage": {"total_tokens": 9}}
    ).encode()


def said(text: str) -> dict[str, Any]:
    return {"type": "model_output", "content": [{"type": "text", "text": text}]}


async def _audit(api: httpx.AsyncClient, tenant: Tenant, **params: str) -> list[dict[str, Any]]:
    response = await api.get("/v1/audit/events", params=params | {"limit": "1000"}, headers=tenant.headers("auditor"))
    return list(response.json()["events"])


async def _classes(api: httpx.AsyncClient, tenant: Tenant, conversation: str) -> list[str]:
    response = await api.get(f"/v1/conversations/{conversation}", headers=tenant.headers())
    return list(response.json()["data_classes"])


async def test_a_card_number_the_model_echoes_raises_the_classification(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """A card number in the model's answer (none in the input) raises the conversation to `pan`, recorded as a detector hit from the model's output and on the turn's record, by class only."""
    conversation = await open_conversation(api, tenant.headers(), BILLING)
    gemini.app.answer_next_create(answer(said(f"{CANARY} your card on file is {CARD}")))
    turn = await take_turn(api, tenant.headers(), conversation, "which card do you have on file?")
    assert turn["status"] == "completed"
    assert await _classes(api, tenant, conversation) == ["financial", "pan"]
    (hit,) = await _audit(api, tenant, action="detector.hit")
    assert hit["details"]["source"] == "model_output"
    assert hit["details"]["classes"] == ["pan"]
    (created,) = await _audit(api, tenant, action="turn.create")
    assert created["outcome"] == "success"
    assert created["data_classes"] == ["financial", "pan"]
    assert created["details"]["classification_raised"] == ["pan"]
    records = json.dumps(await _audit(api, tenant))
    assert CANARY not in records
    assert CARD.replace(" ", "") not in records
    assert CARD not in records


async def test_function_call_arguments_are_read_too(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """An e-mail address in a function call's arguments raises the conversation to `pii`."""
    conversation = await open_conversation(api, tenant.headers(), BILLING)
    call = {
        "type": "function_call",
        "id": "call_1",
        "name": "lookup_account",
        "arguments": {"email": "jane@example.org"},
    }
    gemini.app.answer_next_create(answer(call, status="requires_action"))
    turn = await take_turn(api, tenant.headers(), conversation, "look me up")
    assert turn["status"] == "requires_action"
    assert await _classes(api, tenant, conversation) == ["financial", "pii"]


async def test_a_blocked_class_in_the_models_answer_refuses_the_turn_and_stores_nothing(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """On a route that blocks `pan`, an answer carrying a card number is refused 422 naming the class: the history stays as it was, the turn is on record as refused, and the conversation takes the next turn."""
    conversation = await open_conversation(api, tenant.headers(), INTAKE)
    await take_turn(api, tenant.headers(), conversation, "first")
    before = await row_counts(engine)
    gemini.app.answer_next_create(answer(said(f"{CANARY} the card is {CARD}")))
    response = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "second"}, headers=tenant.headers()
    )
    problem = assert_problem(response, 422, "data-class-blocked")
    assert problem["data_classes"] == ["pan"]
    assert CANARY not in response.text
    after = await row_counts(engine)
    assert after["steps"] == before["steps"]
    assert after["turns"] == before["turns"] + 1  # the refused turn's row, failed
    assert await _classes(api, tenant, conversation) == ["phi"]
    created = await _audit(api, tenant, action="turn.create")
    assert [(r["outcome"], r["reason"]) for r in created][-1] == ("denied", "model_output_refused")
    assert created[-1]["details"]["blocked_classes"] == ["pan"]
    steps = (await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())).json()["steps"]
    assert CANARY not in json.dumps(steps)
    third = await take_turn(api, tenant.headers(), conversation, "third")
    assert third["status"] == "completed"
    assert CANARY not in json.dumps(await _audit(api, tenant))
