"""The ops API: the policy, the retention preview and runs, legal holds and the provider-copy ledger,
for the ops key's own tenant, every call audited, and never any content."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

from service.retention import run_retention
from service.simulator import FaultSpec, RunningSimulator

from ..conftest import CANARY, Tenant
from ..retention.conftest import RetentionService
from .helpers import assert_problem

DAY = 86400


def key_id(tenant: Tenant, role: str) -> str:
    """The id of the tenant's key of `role` (`cust_<id>_<secret>` -> `key_<id>`)."""
    return "key_" + tenant.keys[role].split("_")[1]


async def records(service: RetentionService, pattern: dict[str, Any]) -> list[dict[str, Any]]:
    async with service.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT record FROM audit_events WHERE record @> CAST(:p AS jsonb) ORDER BY chain, seq"),
            {"p": json.dumps(pattern)},
        )
        return [dict(row.record) for row in rows]


async def tenant_id(service: RetentionService) -> str:
    async with service.engine.connect() as connection:
        found = await connection.scalar(text("SELECT id FROM tenants WHERE name = :n"), {"n": service.tenant.name})
    return str(found)


async def exists(service: RetentionService, conversation: str) -> bool:
    async with service.engine.connect() as connection:
        found = await connection.scalar(text("SELECT count(*) FROM conversations WHERE id = :c"), {"c": conversation})
    return bool(found)


async def test_the_policy_shows_its_classes_routes_and_rules(retention: RetentionService) -> None:
    """The policy answer has the version, each class's provider storage and rule, each route's classes, rule, provider_ttl, settings, blocked classes, media rule, fallback and background, and the detectors; the read is audited."""
    ops = retention.tenant.headers("ops")
    response = await retention.api.get("/v1/ops/policy", headers=ops)
    assert response.status_code == 200, response.text
    policy = response.json()
    assert policy["version"] == retention.ctx.policy.version
    phi = policy["data_classes"]["phi"]
    assert (phi["provider_storage"], phi["retention"]) == (False, {"delete_after": "P1Y", "keep_at_least": "P60D"})
    assert policy["data_classes"]["public"]["provider_storage"] is True
    faq = policy["routes"]["public-faq"]
    assert (faq["provider_storage"], faq["provider_ttl"]) == (True, "PT1H")
    assert faq["retention"] == {"delete_after": "P7D", "keep_at_least": None}
    intake = policy["routes"]["patient-intake"]
    assert intake["data_classes"] == ["phi", "pii"]
    assert intake["provider_ttl"] is None
    assert intake["settings"] == retention.ctx.policy.route("patient-intake").upstream_settings()
    assert intake["blocked_classes"] == ["financial", "pan"]
    assert faq["blocked_classes"] == []
    assert intake["media"] == {
        "allowed": ["application/pdf", "image/jpeg", "image/png"],
        "max_bytes": 5_242_880,
        "max_total_bytes": 5_242_880,
        "uri_prefixes": [],
    }
    assert (faq["media"], faq["fallback"], faq["background"]) == (None, None, True)
    assert policy["detectors"]["card_security_code"] == {
        "data_class": "pan",
        "builtin": "card_security_code",
        "pattern": None,
    }
    assert policy["detectors"]["mrn"] == {
        "data_class": "phi",
        "builtin": None,
        "pattern": next(d.pattern_text for d in retention.ctx.policy.detectors.detectors if d.name == "mrn"),
    }
    [record] = await records(retention, {"action": "policy.read"})
    assert record["actor"]["key_id"] == key_id(retention.tenant, "ops")
    assert record["policy_version"] == policy["version"]
    assert record["outcome"] == "success"


async def test_the_preview_lists_what_a_run_would_purge_and_why(retention: RetentionService) -> None:
    """The preview names each due conversation with its route, classes, rule and deadline, honours limit, leaves held ones out and changes nothing."""
    first = await retention.open("public-faq", ["public"])
    second = await retention.open("public-faq", ["public"])
    await retention.open("patient-intake", ["phi"])  # not due for 180 days
    retention.advance_days(8)
    ops = retention.tenant.headers("ops")
    listed = (await retention.api.get("/v1/ops/retention/preview", headers=ops)).json()
    assert listed["more"] is False
    assert [c["conversation_id"] for c in listed["candidates"]] == [first, second]
    candidate = listed["candidates"][0]
    assert (candidate["route"], candidate["data_classes"]) == ("public-faq", ["public"])
    assert (candidate["delete_after"], candidate["keep_at_least"]) == ("P7D", None)
    assert candidate["purge_at"].endswith("Z")
    limited = (await retention.api.get("/v1/ops/retention/preview", params={"limit": 1}, headers=ops)).json()
    assert ([c["conversation_id"] for c in limited["candidates"]], limited["more"]) == ([first], True)
    hold = {"scope": "conversation", "conversation_id": second, "reason": "case 7"}
    assert (await retention.api.post("/v1/ops/holds", json=hold, headers=ops)).status_code == 201
    held = (await retention.api.get("/v1/ops/retention/preview", headers=ops)).json()
    assert [c["conversation_id"] for c in held["candidates"]] == [first]
    assert await exists(retention, first)
    assert await exists(retention, second)
    previews = await records(retention, {"action": "retention.preview"})
    assert [r["details"]["returned"] for r in previews] == [2, 1, 1]
    assert [r["details"]["limit"] for r in previews] == [100, 1, 100]


def _hold_body(scope: str, conversation: str, subject: str) -> dict[str, Any]:
    body: dict[str, Any] = {"scope": scope, "reason": "litigation, case 42"}
    if scope == "conversation":
        body["conversation_id"] = conversation
    if scope == "subject":
        body["subject"] = subject
    return body


@pytest.mark.parametrize("scope", ["tenant", "conversation", "subject"])
async def test_a_hold_blocks_purge_and_deletion_until_released(retention: RetentionService, scope: str) -> None:
    """A tenant, conversation or subject hold placed through the API keeps a due conversation from the runner and its deletion answers 409 naming the hold; once released, both go ahead."""
    held = await retention.open("public-faq", ["public"], subject="MRN-0007")
    bystander = await retention.open("public-faq", ["public"], subject="MRN-0008")
    ops = retention.tenant.headers("ops")
    placed = await retention.api.post("/v1/ops/holds", json=_hold_body(scope, held, "MRN-0007"), headers=ops)
    assert placed.status_code == 201, placed.text
    hold = placed.json()
    assert (hold["scope"], hold["active"], hold["created_by"]) == (scope, True, key_id(retention.tenant, "ops"))
    assert "MRN-0007" not in placed.text
    retention.advance_days(8)

    first = await run_retention(retention.ctx, started_by="test")
    assert await exists(retention, held)
    # Only a tenant hold covers the bystander too.
    assert first.purged == (0 if scope == "tenant" else 1)
    assert await exists(retention, bystander) == (scope == "tenant")
    refused = await retention.api.delete(f"/v1/conversations/{held}", headers=retention.tenant.headers())
    assert assert_problem(refused, 409, "legal-hold")["hold_id"] == hold["id"]

    released = await retention.api.delete(f"/v1/ops/holds/{hold['id']}", headers=ops)
    assert released.status_code == 200, released.text
    assert (released.json()["active"], released.json()["released_by"]) == (False, key_id(retention.tenant, "ops"))
    second = await run_retention(retention.ctx, started_by="test")
    assert second.purged == (2 if scope == "tenant" else 1)
    assert not await exists(retention, held)
    [place] = await records(retention, {"action": "legal_hold.place", "resource": {"id": hold["id"]}})
    [release] = await records(retention, {"action": "legal_hold.release", "resource": {"id": hold["id"]}})
    assert place["details"]["scope"] == release["details"]["scope"] == scope
    assert "litigation" not in json.dumps([place, release])


async def test_a_subject_hold_keeps_only_the_digest(retention: RetentionService) -> None:
    """A subject hold stores the keyed digest the conversations carry, never the identifier, and answers without it."""
    conversation = await retention.open("public-faq", ["public"], subject="MRN-4711")
    ops = retention.tenant.headers("ops")
    placed = await retention.api.post(
        "/v1/ops/holds", json={"scope": "subject", "subject": "MRN-4711", "reason": "case 9"}, headers=ops
    )
    assert placed.status_code == 201, placed.text
    async with retention.engine.connect() as connection:
        row = (
            await connection.execute(
                text("SELECT h.subject_digest, h::text AS whole FROM legal_holds h WHERE id = :i"),
                {"i": placed.json()["id"]},
            )
        ).one()
        carried = await connection.scalar(
            text("SELECT subject_digest FROM conversations WHERE id = :c"), {"c": conversation}
        )
    assert bytes(row.subject_digest) == bytes(carried)
    assert "MRN-4711" not in row.whole
    assert "MRN-4711" not in placed.text


async def test_hold_requests_are_checked_and_refusals_audited(retention: RetentionService) -> None:
    """A hold on a conversation the tenant lacks is 422, a malformed body 400, an unknown hold 404 and a released one 409, each refusal audited; the listing filters by active."""
    ops = retention.tenant.headers("ops")
    api = retention.api
    missing = {"scope": "conversation", "conversation_id": "conv_" + "0" * 30, "reason": "case 1"}
    assert_problem(await api.post("/v1/ops/holds", json=missing, headers=ops), 422, "invalid-input")
    for malformed in (
        {"scope": "subject", "reason": "case 1"},
        {"scope": "tenant", "reason": "case 1", "subject": "MRN-1"},
        {"scope": "tenant", "reason": "   "},
        {"scope": "everything", "reason": "case 1"},
        {"reason": "case 1"},
    ):
        assert_problem(await api.post("/v1/ops/holds", json=malformed, headers=ops), 400, "malformed-request")
    assert_problem(await api.delete("/v1/ops/holds/hold_" + "0" * 30, headers=ops), 404, "hold-not-found")
    assert_problem(await api.delete("/v1/ops/holds/not-a-hold", headers=ops), 404, "hold-not-found")

    hold = (await api.post("/v1/ops/holds", json={"scope": "tenant", "reason": "case 2"}, headers=ops)).json()
    assert (await api.delete(f"/v1/ops/holds/{hold['id']}", headers=ops)).status_code == 200
    assert_problem(await api.delete(f"/v1/ops/holds/{hold['id']}", headers=ops), 409, "hold-released")
    assert (await api.get("/v1/ops/holds", params={"active": "true"}, headers=ops)).json()["holds"] == []
    [released] = (await api.get("/v1/ops/holds", params={"active": "false"}, headers=ops)).json()["holds"]
    assert (released["id"], released["active"], released["reason"]) == (hold["id"], False, "case 2")
    assert [h["id"] for h in (await api.get("/v1/ops/holds", headers=ops)).json()["holds"]] == [hold["id"]]

    denied_place = await records(retention, {"action": "legal_hold.place", "outcome": "denied"})
    assert [r["reason"] for r in denied_place] == ["invalid_input"]
    denied_release = await records(retention, {"action": "legal_hold.release", "outcome": "denied"})
    assert [(r["reason"], r["resource"]["id"]) for r in denied_release] == [
        ("hold_not_found", "hold_" + "0" * 30),
        ("hold_not_found", None),
        ("hold_released", hold["id"]),
    ]
    listings = await records(retention, {"action": "legal_hold.list"})
    assert [(r["details"]["active"], r["details"]["returned"]) for r in listings] == [(True, 0), (False, 1), (None, 1)]


async def test_a_run_started_through_the_api_shows_progress_and_its_summary(
    retention: RetentionService, gemini: RunningSimulator
) -> None:
    """A run started with POST answers 202 with its id once it has started, reads as running while it works and then as completed with its counts and times."""
    opened = [await retention.open("public-faq", ["public"]) for _ in range(3)]
    for conversation in opened:
        await retention.turn(conversation, "opening hours?")
    retention.advance_days(8)
    # Each provider copy's deletion takes a while, so the run is still at work when it is read.
    gemini.app.inject(FaultSpec(latency_ms=400, count=3))
    ops = retention.tenant.headers("ops")
    started = await retention.api.post("/v1/ops/retention/runs", headers=ops)
    assert started.status_code == 202, started.text
    run = started.json()
    assert (run["status"], run["dry_run"], run["finished_at"]) == ("running", False, None)
    assert run["started_by"] == key_id(retention.tenant, "ops")
    during = await retention.api.get(f"/v1/ops/retention/runs/{run['id']}", headers=ops)
    assert during.status_code == 200, during.text
    assert (during.json()["status"], during.json()["counts"]["purged"]) == ("running", 0)

    await retention.ctx.tasks.drain(timeout=30)
    done = (await retention.api.get(f"/v1/ops/retention/runs/{run['id']}", headers=ops)).json()
    assert done["status"] == "completed"
    assert done["finished_at"] is not None
    counts = done["counts"]
    assert (counts["purged"], counts["provider_deleted"], counts["receipts"], counts["failed"]) == (3, 3, 3, 0)
    assert not any([await exists(retention, c) for c in opened])

    [start] = await records(retention, {"action": "retention.start"})
    assert start["resource"] == {"type": "retention_run", "id": run["id"]}
    assert start["details"] == {"dry_run": False, "limit": None}
    [job] = await records(retention, {"action": "retention.run", "resource": {"id": run["id"]}})
    assert job["chain"] == start["chain"]  # the tenant's, as its purges
    assert job["details"]["started_by"] == key_id(retention.tenant, "ops")
    statuses = await records(retention, {"action": "retention.status"})
    assert [r["details"]["status"] for r in statuses] == ["running", "completed"]


async def test_a_dry_run_with_a_limit_purges_nothing(retention: RetentionService) -> None:
    """A dry run started with a body counts what it would purge, within its limit, and purges nothing."""
    opened = [await retention.open("public-faq", ["public"]) for _ in range(3)]
    retention.advance_days(8)
    ops = retention.tenant.headers("ops")
    started = await retention.api.post("/v1/ops/retention/runs", json={"dry_run": True, "limit": 2}, headers=ops)
    assert started.status_code == 202, started.text
    await retention.ctx.tasks.drain(timeout=30)
    done = (await retention.api.get(f"/v1/ops/retention/runs/{started.json()['id']}", headers=ops)).json()
    assert (done["status"], done["dry_run"], done["counts"]["would_purge"], done["counts"]["purged"]) == (
        "completed",
        True,
        2,
        0,
    )
    assert all([await exists(retention, c) for c in opened])
    bad = await retention.api.post("/v1/ops/retention/runs", json={"limit": 0}, headers=ops)
    assert_problem(bad, 400, "malformed-request")
    assert_problem(
        await retention.api.get("/v1/ops/retention/runs/run_" + "0" * 30, headers=ops), 404, "retention-run-not-found"
    )


async def test_pending_provider_copies_are_listed_with_their_age(
    retention: RetentionService, gemini: RunningSimulator
) -> None:
    """A provider copy whose deletion failed is listed with its attempts and error type, counted with the oldest's age, until a run deletes it."""
    doomed = await retention.open("public-faq", ["public"])
    await retention.turn(doomed, "first")
    copy = gemini.app.create_requests()[-1].response["id"]
    ops = retention.tenant.headers("ops")
    assert (await retention.api.get("/v1/ops/provider-copies", headers=ops)).json() == {
        "count": 0,
        "oldest_seconds": None,
        "copies": [],
    }
    retention.advance_days(8)
    gemini.app.inject(FaultSpec(status=500, count=2))  # at the purge, and at the same run's retry
    await run_retention(retention.ctx, started_by="test")
    pending = (await retention.api.get("/v1/ops/provider-copies", headers=ops)).json()
    assert pending["count"] == 1
    assert pending["oldest_seconds"] > 7 * DAY
    [listed] = pending["copies"]
    assert (listed["interaction_id"], listed["conversation_id"], listed["delete_attempts"]) == (copy, doomed, 2)
    assert isinstance(listed["last_error"], str)
    await run_retention(retention.ctx, started_by="test")
    assert (await retention.api.get("/v1/ops/provider-copies", headers=ops)).json()["count"] == 0
    listings = await records(retention, {"action": "upstream.list"})
    assert [r["details"]["pending"] for r in listings] == [0, 1, 0]


async def test_the_ops_key_reads_no_content_anywhere(
    retention: RetentionService, gemini: RunningSimulator, spans: InMemorySpanExporter
) -> None:
    """With the canary in turns, subjects and metadata (and as a subject hold's subject), no ops answer, audit record or span holds it."""
    spans.clear()
    backend, ops = retention.tenant.headers(), retention.tenant.headers("ops")
    public = await retention.open("public-faq", ["public"], subject=CANARY, metadata={"note": CANARY})
    await retention.turn(public, f"what about {CANARY}?")
    phi = await retention.open("patient-intake", ["phi"], subject=CANARY, metadata={"note": CANARY})
    await retention.turn(phi, f"my name is {CANARY}")
    # The canary is really there, for the backend to read.
    assert CANARY in (await retention.api.get(f"/v1/conversations/{public}", headers=backend)).text
    retention.advance_days(8)

    api = retention.api
    answers = []
    hold = await api.post(
        "/v1/ops/holds", json={"scope": "subject", "subject": CANARY, "reason": "case 5"}, headers=ops
    )
    assert hold.status_code == 201, hold.text
    answers.append(hold)
    answers.append(
        await api.post("/v1/ops/holds", json={"scope": "conversation", "conversation_id": CANARY}, headers=ops)
    )
    answers.append(await api.get("/v1/ops/policy", headers=ops))
    preview = await api.get("/v1/ops/retention/preview", headers=ops)
    assert preview.json()["candidates"] == []  # the subject hold covers both
    answers.append(preview)
    answers.append(await api.get("/v1/ops/holds", headers=ops))
    answers.append(await api.delete(f"/v1/ops/holds/{hold.json()['id']}", headers=ops))
    answers.append(await api.get("/v1/ops/retention/preview", headers=ops))
    assert public in answers[-1].text  # the preview did list the conversation
    for body in ({"dry_run": True}, {}):
        started = await api.post("/v1/ops/retention/runs", json=body, headers=ops)
        answers.append(started)
        await retention.ctx.tasks.drain(timeout=30)
        answers.append(await api.get(f"/v1/ops/retention/runs/{started.json()['id']}", headers=ops))
    assert answers[-1].json()["counts"]["purged"] == 1  # public went; phi stays for its 180 days
    answers.append(await api.get("/v1/ops/provider-copies", headers=ops))
    answers.append(await api.get(f"/v1/ops/retention/runs/{CANARY}", headers=ops))
    answers.append(await api.delete(f"/v1/ops/holds/{CANARY}", headers=ops))
    assert [a.status_code for a in answers[-2:]] == [404, 404]

    for answer in answers:
        assert CANARY not in answer.text, answer.request.url
    digest = retention.ctx.subject_digest(await tenant_id(retention), CANARY)
    async with retention.engine.connect() as connection:
        audit = "\n".join((await connection.execute(text("SELECT record::text FROM audit_events"))).scalars().all())
    assert "policy.read" in audit  # the dump is of the records the calls wrote
    for needle in (CANARY, digest.hex(), base64.b64encode(digest).decode()):
        assert needle not in audit
    finished = spans.get_finished_spans()
    assert finished
    for span in finished:
        assert CANARY not in span.name
        assert CANARY not in json.dumps(dict(span.attributes or {}), default=str)
