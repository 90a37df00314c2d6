"""Erasing a data subject: every conversation of the subject goes under one signed receipt, except
those a hold, a minimum retention or a running turn keeps, which the receipt lists with their
reasons; the identifier is never logged, spanned, recorded or echoed. Listing a subject's (or the
tenant's) conversations shows metadata only."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from service.conversations import receipt_valid
from service.simulator import FaultSpec, RunningSimulator

from ..conftest import CANARY, signer_of
from ..retention.conftest import RetentionService
from .helpers import assert_problem

SUBJECT = "MRN-0042"


async def records(service: RetentionService, pattern: dict[str, Any]) -> list[dict[str, Any]]:
    async with service.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT record FROM audit_events WHERE record @> CAST(:p AS jsonb) ORDER BY chain, seq"),
            {"p": json.dumps(pattern)},
        )
        return [dict(row.record) for row in rows]


async def all_records(service: RetentionService) -> str:
    async with service.engine.connect() as connection:
        return "\n".join((await connection.execute(text("SELECT record::text FROM audit_events"))).scalars().all())


async def existing(service: RetentionService, *conversations: str) -> set[str]:
    async with service.engine.connect() as connection:
        found = await connection.execute(
            text("SELECT id FROM conversations WHERE id = ANY(:ids)"), {"ids": list(conversations)}
        )
        return {row.id for row in found}


async def digest_of(service: RetentionService, subject: str) -> bytes:
    async with service.engine.connect() as connection:
        tenant_id = await connection.scalar(text("SELECT id FROM tenants WHERE name = :n"), {"n": service.tenant.name})
    return service.ctx.subject_digest(str(tenant_id), subject)


async def erase(service: RetentionService, subject: str) -> dict[str, Any]:
    response = await service.api.delete(f"/v1/subjects/{subject}", headers=service.tenant.headers())
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_erasure_keeps_held_and_young_conversations_under_one_receipt(
    retention: RetentionService, gemini: RunningSimulator
) -> None:
    """The subject's conversations are erased, provider copies too, except the held one and the one under minimum retention, which the one verifying receipt lists with their reasons."""
    stored = await retention.open("public-faq", ["public"], subject=SUBJECT)
    await retention.turn(stored, "opening hours?")
    copies = [r.response["id"] for r in gemini.app.create_requests()]
    assert copies
    plain = await retention.open("public-faq", ["public"], subject=SUBJECT)
    held = await retention.open("public-faq", ["public"], subject=SUBJECT)
    young = await retention.open("patient-intake", ["phi"], subject=SUBJECT)  # kept at least 60 days
    bystander = await retention.open("public-faq", ["public"], subject="MRN-0043")
    placed = await retention.api.post(
        "/v1/ops/holds",
        json={"scope": "conversation", "conversation_id": held, "reason": "case 42"},
        headers=retention.tenant.headers("ops"),
    )
    hold = placed.json()["id"]

    receipt = await erase(retention, SUBJECT)
    assert receipt_valid(receipt, signer_of(retention.ctx).public_key)
    payload = receipt["payload"]
    assert payload["cause"] == "subject_erasure"
    destroyed = {d["conversation_id"]: d for d in payload["destroyed"]}
    assert set(destroyed) == {stored, plain}
    assert destroyed[stored]["provider_copies_deleted"] == copies
    assert not any(c in gemini.app.store.ids() for c in copies)
    assert [(k["conversation_id"], k["reason"], k["hold_id"]) for k in payload["kept"]] == [
        (held, "legal_hold", hold),
        (young, "minimum_retention", None),
    ]
    assert payload["kept"][1]["deletable_from"].endswith("Z")
    assert await existing(retention, stored, plain, held, young, bystander) == {held, young, bystander}
    async with retention.engine.connect() as connection:
        kept_receipt = await connection.scalar(
            text("SELECT receipt FROM deletion_receipts WHERE id = :i"), {"i": payload["receipt_id"]}
        )
    assert kept_receipt == receipt

    for conversation in (stored, plain):
        [record] = await records(retention, {"action": "conversation.delete", "resource": {"id": conversation}})
        assert (record["outcome"], record["details"]["cause"]) == ("success", "subject_erasure")
        assert record["seq"] in destroyed[conversation]["audit_seqs"]
    refusals = {
        r["resource"]["id"]: r["reason"]
        for r in await records(retention, {"action": "conversation.delete", "outcome": "denied"})
    }
    assert refusals == {held: "legal_hold_active", young: "minimum_retention"}
    [summary] = await records(retention, {"action": "subject.erase"})
    assert summary["details"] == {
        "erased": 2,
        "kept": 2,
        "kept_reasons": {"legal_hold": 1, "minimum_retention": 1},
        "provider_copies_pending": 0,
        "receipt_id": payload["receipt_id"],
    }
    assert summary["resource"] == {"type": "conversation", "id": None}
    digest = await digest_of(retention, SUBJECT)
    audit = await all_records(retention)
    for needle in (SUBJECT, digest.hex(), base64.b64encode(digest).decode()):
        assert needle not in audit


async def test_what_was_kept_goes_once_its_reasons_have(retention: RetentionService) -> None:
    """Once the hold is released and the minimum retention has passed, erasing again takes the rest, and the listing by subject is empty."""
    held = await retention.open("public-faq", ["public"], subject=SUBJECT)
    young = await retention.open("patient-intake", ["phi"], subject=SUBJECT)
    ops = retention.tenant.headers("ops")
    hold = (
        await retention.api.post(
            "/v1/ops/holds", json={"scope": "subject", "subject": SUBJECT, "reason": "case 43"}, headers=ops
        )
    ).json()["id"]
    first = await erase(retention, SUBJECT)
    assert first["payload"]["destroyed"] == []
    assert [(k["conversation_id"], k["hold_id"]) for k in first["payload"]["kept"]] == [(held, hold), (young, hold)]

    assert (await retention.api.delete(f"/v1/ops/holds/{hold}", headers=ops)).status_code == 200
    retention.advance_days(61)
    second = await erase(retention, SUBJECT)
    assert {d["conversation_id"] for d in second["payload"]["destroyed"]} == {held, young}
    assert second["payload"]["kept"] == []
    listed = await retention.api.get(
        "/v1/conversations", params={"subject": SUBJECT}, headers=retention.tenant.headers()
    )
    assert listed.json() == {"conversations": [], "next_cursor": None}
    # A subject with nothing left gets a receipt that lists nothing.
    third = await erase(retention, SUBJECT)
    assert (third["payload"]["destroyed"], third["payload"]["kept"]) == ([], [])


async def test_a_conversation_with_a_turn_waiting_for_the_model_stays(
    retention: RetentionService, gemini: RunningSimulator
) -> None:
    """A conversation whose turn is waiting for the model is kept as turn_in_progress, and goes on an erasure after the turn."""
    busy = await retention.open("public-faq", ["public"], subject=SUBJECT)
    gemini.app.inject(FaultSpec(latency_ms=1500))
    turn = asyncio.create_task(retention.turn(busy, "a slow question"))
    async with retention.engine.connect() as connection:
        for _ in range(200):
            leased = await connection.scalar(
                text("SELECT lease_token IS NOT NULL FROM conversations WHERE id = :c"), {"c": busy}
            )
            await connection.commit()
            if leased:
                break
            await asyncio.sleep(0.01)
    assert leased
    during = await erase(retention, SUBJECT)
    assert during["payload"]["kept"] == [
        {"conversation_id": busy, "reason": "turn_in_progress", "hold_id": None, "deletable_from": None}
    ]
    await turn
    after = await erase(retention, SUBJECT)
    assert [d["conversation_id"] for d in after["payload"]["destroyed"]] == [busy]


async def test_the_subject_in_the_path_is_never_logged_spanned_recorded_or_echoed(
    retention: RetentionService, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """The identifier in the path is in no log line, span, audit record or answer (erased, refused or malformed), and the server span is named by the route template."""
    caplog.set_level(logging.DEBUG)
    conversation = await retention.open("public-faq", ["public"], subject=CANARY)
    spans.clear()
    answers = [
        await retention.api.delete(f"/v1/subjects/{CANARY}", headers=retention.tenant.headers()),
        await retention.api.delete(f"/v1/subjects/{CANARY}", headers=retention.tenant.headers("auditor")),
        await retention.api.delete(f"/v1/subjects/{CANARY}"),
        await retention.api.delete(f"/v1/subjects/{CANARY}%2Fx", headers=retention.tenant.headers()),
        await retention.api.get("/v1/conversations", params={"subject": CANARY}, headers=retention.tenant.headers()),
    ]
    assert [a.status_code for a in answers] == [200, 403, 401, 404, 200]
    assert [d["conversation_id"] for d in answers[0].json()["payload"]["destroyed"]] == [conversation]
    for answer in answers:
        assert CANARY not in answer.text
    finished = spans.get_finished_spans()
    servers = [s for s in finished if s.kind.name == "SERVER"]
    assert "DELETE /v1/subjects/{subject}" in {s.name for s in servers}
    for span in finished:
        assert CANARY not in span.name
        assert CANARY not in json.dumps(dict(span.attributes or {}), default=str)
    # The test's own HTTP client logs the URLs it requests (logger `httpx`), so the capture would
    # see the identifier in a line; none of the service's lines has it.
    assert any(CANARY in r.getMessage() for r in caplog.records if r.name == "httpx")
    assert not [r.name for r in caplog.records if r.name != "httpx" and CANARY in r.getMessage()]
    digest = await digest_of(retention, CANARY)
    audit = await all_records(retention)
    assert "subject.erase" in audit
    for needle in (CANARY, digest.hex(), base64.b64encode(digest).decode()):
        assert needle not in audit


async def test_the_listing_by_subject_shows_metadata_only(retention: RetentionService) -> None:
    """Listing by subject gives exactly that subject's conversations, with route, classes, counts and retention deadlines, and never the subject or metadata."""
    public = await retention.open("public-faq", ["public"], subject=SUBJECT, metadata={"note": CANARY})
    await retention.turn(public, "hello")
    phi = await retention.open("patient-intake", ["phi"], subject=SUBJECT, metadata={"note": CANARY})
    await retention.open("public-faq", ["public"], subject="MRN-0043")
    await retention.open("public-faq", ["public"])
    response = await retention.api.get(
        "/v1/conversations", params={"subject": SUBJECT}, headers=retention.tenant.headers()
    )
    assert response.status_code == 200, response.text
    assert CANARY not in response.text
    assert SUBJECT not in response.text
    page = response.json()
    assert page["next_cursor"] is None
    listed = {c["id"]: c for c in page["conversations"]}
    assert set(listed) == {public, phi}
    assert set(listed[public]) == {
        "id",
        "route",
        "data_classes",
        "policy_version",
        "turn_count",
        "step_count",
        "created_at",
        "updated_at",
        "keep_until",
        "purge_at",
    }
    assert (listed[public]["route"], listed[public]["turn_count"], listed[public]["step_count"]) == ("public-faq", 1, 4)
    assert listed[public]["keep_until"] is None
    assert listed[public]["purge_at"] is not None
    assert listed[phi]["keep_until"] is not None
    assert listed[phi]["data_classes"] == ["phi"]
    [record] = await records(retention, {"action": "conversation.list"})
    assert (record["details"]["by_subject"], record["details"]["returned"]) == (True, 2)
    assert SUBJECT not in json.dumps(record)


async def test_the_listing_pages_through_every_conversation_of_the_tenant(retention: RetentionService) -> None:
    """Without a subject the listing pages through every conversation of the tenant in id order, each once, by cursor and limit."""
    opened = {await retention.open("public-faq", ["public"], subject=f"MRN-{n}") for n in range(5)}
    headers = retention.tenant.headers()
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(10):
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = (await retention.api.get("/v1/conversations", params=params, headers=headers)).json()
        seen += [c["id"] for c in page["conversations"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(opened)
    bad = await retention.api.get("/v1/conversations", params={"cursor": "nope"}, headers=headers)
    assert_problem(bad, 400, "malformed-request")
    empty = await retention.api.get("/v1/conversations", params={"subject": ""}, headers=headers)
    assert_problem(empty, 400, "malformed-request")
    pages = await records(retention, {"action": "conversation.list", "outcome": "success"})
    assert [r["details"]["returned"] for r in pages] == [2, 2, 1]
    assert [r["details"]["by_subject"] for r in pages] == [False, False, False]
