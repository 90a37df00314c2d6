"""Detectors under policy, end to end: a card security code is always refused, `on_detect: block`
refuses a class on its route, and what a detector matched is written nowhere."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.auth_failures import AuthFailures
from service.config import REPO_ROOT
from service.context import ServiceContext
from service.policy import parse_policy
from service.simulator import RunningSimulator

from ..conftest import CANARY, Tenant, asgi_transport
from .helpers import assert_problem, open_conversation, row_counts, take_turn

CARD = "4111 1111 1111 1111"
BILLING = {"route": "billing-support", "data_classes": ["pan"]}
INTAKE = {"route": "patient-intake", "data_classes": ["phi"]}
STRICT = {"route": "intake-strict", "data_classes": ["phi"]}
# The part of the canary the deployment's pattern matches.
TAG = CANARY.split("-NEVER")[0]


async def _audit(api: httpx.AsyncClient, tenant: Tenant, **params: str) -> list[dict[str, Any]]:
    response = await api.get("/v1/audit/events", params=params | {"limit": "1000"}, headers=tenant.headers("auditor"))
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


async def _turn(api: httpx.AsyncClient, tenant: Tenant, conversation: str, text: str) -> httpx.Response:
    return await api.post(f"/v1/conversations/{conversation}/turns", json={"input": text}, headers=tenant.headers())


@pytest.fixture
async def strict(ctx: ServiceContext, gemini: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    """The app under the example policy plus a deployment pattern raising `pii` (it matches the
    canary's tag) and a route like patient-intake that blocks `pii` instead of raising it."""
    gemini.app.reset()
    document = yaml.safe_load((REPO_ROOT / "ops" / "policy.example.yaml").read_text(encoding="utf-8"))
    document["detectors"]["badge"] = {
        "pattern": r"\bCANARY-[0-9a-f]{16}\b",
        "data_class": "pii",
        "must_match": ["badge CANARY-0123456789abcdef"],
        "must_not_match": ["CANARY-0123"],
    }
    document["routes"]["intake-strict"] = copy.deepcopy(document["routes"]["patient-intake"]) | {
        "on_detect": {"pii": "block", "pan": "block"}
    }
    own = dataclasses.replace(ctx, policy=parse_policy(document, source="test"), auth_failures=AuthFailures())
    transport = asgi_transport(create_app(own, max_body_bytes=64_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
        yield client


async def test_a_card_security_code_next_to_a_card_is_always_refused(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """On a route that carries card data, a turn with a CVV next to the card number is refused (422): nothing is stored or sent to the model, and both the hit and the refused turn.start are audited by class."""
    conversation = await open_conversation(api, tenant.headers(), BILLING)
    before = await row_counts(engine)
    response = await _turn(api, tenant, conversation, f"card {CARD}, CVV 737")
    body = assert_problem(response, 422, "card-security-code")
    assert body["data_classes"] == ["pan"]
    assert gemini.app.creates() == []
    assert await row_counts(engine) == before
    (hit,) = await _audit(api, tenant, action="detector.hit")
    assert hit["data_classes"] == ["pan"]
    assert hit["details"] == {"classes": ["pan"], "detectors": ["card_security_code", "pan"]}
    (start,) = await _audit(api, tenant, action="turn.start")
    assert (start["outcome"], start["reason"]) == ("denied", "card_security_code_refused")
    assert start["details"]["blocked_classes"] == ["pan"]
    records = json.dumps(await _audit(api, tenant)) + response.text
    assert CARD not in records
    assert CARD.replace(" ", "") not in records
    assert "CVV 737" not in records  # (three digits alone turn up in any hash)
    # The same card without its code goes through: the refusal left no lease or turn behind.
    await take_turn(api, tenant.headers(), conversation, f"card {CARD}")
    assert len(gemini.app.creates()) == 1


async def test_the_example_intake_route_blocks_card_and_bank_data(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """The example's patient-intake route blocks `pan` and `financial`: an IBAN there is refused as data-class-blocked naming the class, not added to the conversation."""
    conversation = await open_conversation(api, tenant.headers(), INTAKE)
    before = await row_counts(engine)
    response = await _turn(api, tenant, conversation, "refund to DE89 3704 0044 0532 0130 00")
    body = assert_problem(response, 422, "data-class-blocked")
    assert body["data_classes"] == ["financial"]
    assert "financial" in body["detail"]
    assert gemini.app.creates() == []
    assert await row_counts(engine) == before
    view = (await api.get(f"/v1/conversations/{conversation}", headers=tenant.headers())).json()
    assert view["data_classes"] == ["phi"]


async def test_block_and_raise_are_per_route(
    strict: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """The same e-mail address raises `pii` on a route left at `raise` and refuses the turn on a route that blocks `pii`: nothing stored or sent, the hit and the refused turn.start audited with class names only."""
    raising = await open_conversation(strict, tenant.headers(), INTAKE)
    await take_turn(strict, tenant.headers(), raising, "write to jane.doe@example.org")
    view = (await strict.get(f"/v1/conversations/{raising}", headers=tenant.headers())).json()
    assert view["data_classes"] == ["phi", "pii"]
    assert len(gemini.app.creates()) == 1

    blocking = await open_conversation(strict, tenant.headers(), STRICT)
    before = await row_counts(engine)
    response = await _turn(strict, tenant, blocking, "write to jane.doe@example.org")
    body = assert_problem(response, 422, "data-class-blocked")
    assert body["data_classes"] == ["pii"]
    assert len(gemini.app.creates()) == 1
    assert await row_counts(engine) == before
    view = (await strict.get(f"/v1/conversations/{blocking}", headers=tenant.headers())).json()
    assert view["data_classes"] == ["phi"]
    hits = await _audit(strict, tenant, action="detector.hit", resource_id=blocking)
    assert [h["details"] for h in hits if h["resource"]["id"] == blocking] == [
        {"classes": ["pii"], "detectors": ["email"]}
    ]
    starts = [s for s in await _audit(strict, tenant, action="turn.start") if s["resource"]["id"] == blocking]
    assert [(s["outcome"], s["reason"], s["details"].get("blocked_classes")) for s in starts] == [
        ("denied", "data_class_blocked", ["pii"])
    ]
    assert "jane.doe" not in json.dumps(await _audit(strict, tenant)) + response.text


async def test_the_canary_never_appears_in_any_record_about_a_detection(
    strict: httpx.AsyncClient,
    tenant: Tenant,
    gemini: RunningSimulator,
    spans: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A deployment pattern that matches the canary, once raising its class and once blocking the turn: the canary is in no audit record, span, log line or error body."""
    caplog.set_level(logging.DEBUG)
    spans.clear()
    raising = await open_conversation(strict, tenant.headers(), INTAKE)
    await take_turn(strict, tenant.headers(), raising, f"my badge is {CANARY}")
    view = (await strict.get(f"/v1/conversations/{raising}", headers=tenant.headers())).json()
    assert view["data_classes"] == ["phi", "pii"]  # the deployment's pattern really hit
    blocking = await open_conversation(strict, tenant.headers(), STRICT)
    refused = await _turn(strict, tenant, blocking, f"my badge is {CANARY}")
    assert_problem(refused, 422, "data-class-blocked")
    refused_cvv = await _turn(strict, tenant, raising, f"{CANARY} card {CARD} cvc 737")
    assert_problem(refused_cvv, 422, "card-security-code")

    records = await _audit(strict, tenant)
    hits = [r for r in records if r["action"] == "detector.hit"]
    assert {tuple(h["details"]["detectors"]) for h in hits} == {
        ("badge",),
        ("badge", "card_security_code", "pan"),
    }
    everything = {
        "audit records": json.dumps(records),
        "error bodies": refused.text + refused_cvv.text,
        "logs": caplog.text,
        "spans": json.dumps(
            [
                [span.name, dict(span.attributes or {}), [dict(e.attributes or {}) for e in span.events]]
                for span in spans.get_finished_spans()
            ],
            default=str,
        ),
    }
    assert spans.get_finished_spans(), "no spans: the check would prove nothing"
    for where, text in everything.items():
        assert TAG not in text, where
        assert CARD.replace(" ", "") not in text, where
