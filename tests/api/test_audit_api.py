"""The auditor API: query, export with proof, offline verification, FHIR, and auditing of auditors."""

from __future__ import annotations

import json
from typing import Any

import httpx
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent

from service.audit import checkpoint_all
from service.audit_export import verify_export

from ..conftest import CANARY, Tenant
from .helpers import assert_problem, open_conversation, take_turn


async def _activity(api: httpx.AsyncClient, tenant: Tenant) -> str:
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, f"my secret is {CANARY}")
    await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())
    return conversation


async def test_events_are_filtered_and_paged(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """Auditors list their tenant's records by action, resource and outcome, page by page, oldest first."""
    conversation = await _activity(api, tenant)
    auditor = tenant.headers("auditor")
    page = (await api.get("/v1/audit/events", params={"resource": conversation}, headers=auditor)).json()
    assert [e["action"] for e in page["events"]] == ["conversation.create", "turn.start", "history.read"]
    reads = (await api.get("/v1/audit/events", params={"action": "history.read"}, headers=auditor)).json()
    assert [e["resource"]["id"] for e in reads["events"]] == [conversation]
    seen, cursor = [], 0
    while cursor is not None:
        batch = (await api.get("/v1/audit/events", params={"cursor": cursor, "limit": 2}, headers=auditor)).json()
        seen.extend(e["seq"] for e in batch["events"])
        cursor = batch["next_cursor"]
    assert seen == sorted(seen) and seen[0] == 1 and len(seen) == len(set(seen))
    assert CANARY not in json.dumps(page)


async def test_bad_filters_are_refused(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """Unknown actions, free-text ids and naive times are 422s (filters are recorded, so they must be codes)."""
    auditor = tenant.headers("auditor")
    for params in (
        {"action": "conversation.steal"},
        {"resource": CANARY},
        {"outcome": "maybe"},
        {"since": "2026-01-01T00:00:00"},
    ):
        assert_problem(await api.get("/v1/audit/events", params=params, headers=auditor), 422, "invalid-input")


async def test_auditors_reads_are_audited(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """Each audit query, export and verification appends its own record."""
    auditor = tenant.headers("auditor")
    await api.get("/v1/audit/events", headers=auditor)
    await api.get("/v1/audit/verify", headers=auditor)
    await api.get("/v1/audit/export", headers=auditor)
    events = (await api.get("/v1/audit/events", params={"limit": 1000}, headers=auditor)).json()["events"]
    assert [e["action"] for e in events[-3:]] == ["audit.query", "audit.verify", "audit.export"]
    assert events[-1]["actor"]["role"] == "auditor"


async def test_export_verifies_offline_and_tampering_is_named(api: httpx.AsyncClient, tenant: Tenant, ctx: Any) -> None:
    """A native export carries range, head and signed checkpoint; it verifies offline, and an edited line is named."""
    await _activity(api, tenant)
    await checkpoint_all(ctx.sessions, ctx.auditor.signer)
    await _activity(api, tenant)
    export = await api.get("/v1/audit/export", headers=tenant.headers("auditor"))
    assert export.status_code == 200 and export.headers["content-type"].startswith("application/x-ndjson")
    lines = export.text.splitlines()
    header = json.loads(lines[0])
    assert header["range"]["first_seq"] == 1 and header["latest_checkpoint"] and header["checkpoints"]
    assert CANARY not in export.text
    pinned = ctx.auditor.signer.public_pem().encode()
    verdict, _ = verify_export(lines, public_key_pem=pinned)
    assert verdict.ok and verdict.checkpoint_seq == header["checkpoints"][-1]["seq"]

    edited = list(lines)
    record = json.loads(edited[3])
    record["outcome"] = "denied"
    edited[3] = json.dumps(record)
    verdict, _ = verify_export(edited, public_key_pem=pinned)
    assert not verdict.ok and verdict.first_bad == record["seq"]

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stranger = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    verdict, _ = verify_export(lines, public_key_pem=stranger)
    assert not verdict.ok and "not signed by the audit key" in (verdict.reason or "")


async def test_forged_and_truncated_exports_fail_with_the_pinned_key(
    api: httpx.AsyncClient, tenant: Tenant, ctx: Any
) -> None:
    """An export re-hashed after an edit and deletions, or cut short, no longer matches its signed attestation."""
    from service.audit_chain import record_hash

    await _activity(api, tenant)
    await _activity(api, tenant)
    lines = (await api.get("/v1/audit/export", headers=tenant.headers("auditor"))).text.splitlines()
    pinned = ctx.auditor.signer.public_pem().encode()
    header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]

    # Edit record 2, drop records 3-5, renumber and re-hash the rest, and restate the header.
    forged = [records[0], dict(records[1]) | {"outcome": "denied"}, *records[5:]]
    prev = forged[0]["hash"]
    for seq, record in enumerate(forged[1:], start=2):
        record |= {"seq": seq, "prev_hash": prev}
        record["hash"] = prev = record_hash(prev, record)
    forged_header = header | {
        "range": header["range"] | {"last_seq": len(forged)},
        "range_head_hash": prev,
        "checkpoints": [],
    }
    forged_lines = [json.dumps(forged_header), *(json.dumps(r) for r in forged)]
    verdict, _ = verify_export(forged_lines, public_key_pem=pinned)
    assert not verdict.ok and "differs from what was signed" in (verdict.reason or "")
    # Without a pinned key the same file is merely self-consistent, and is reported as checked
    # against the embedded key.
    _, source = verify_export(forged_lines)
    assert "embedded" in source

    truncated = [lines[0], *lines[1:3]]
    verdict, _ = verify_export(truncated, public_key_pem=pinned)
    assert not verdict.ok


async def test_fhir_export_is_valid_r4(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """The FHIR export is NDJSON of AuditEvent resources that the R4B model accepts, with the proof in headers."""
    await _activity(api, tenant)
    export = await api.get("/v1/audit/export", params={"format": "fhir"}, headers=tenant.headers("auditor"))
    assert export.headers["content-type"].startswith("application/fhir+ndjson")
    assert export.headers["x-custody-range-head-hash"]
    import base64

    header = json.loads(base64.urlsafe_b64decode(export.headers["x-custody-export-header"]))
    assert header["attestation"]["payload"]["last_hash"] == export.headers["x-custody-range-head-hash"]
    resources = [json.loads(line) for line in export.text.splitlines()]
    assert resources and all(r["resourceType"] == "AuditEvent" for r in resources)
    for resource in resources:
        FhirAuditEvent.model_validate(resource)
    assert CANARY not in export.text


async def test_verify_endpoint_reports_an_intact_chain(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """GET /v1/audit/verify recomputes the tenant's chain."""
    await _activity(api, tenant)
    verdict = (await api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()
    assert verdict["ok"] is True and verdict["first_bad_seq"] is None and verdict["checked"] == 4


async def test_auditors_see_only_their_tenant(api: httpx.AsyncClient, new_tenant: Any) -> None:
    """An auditor's queries and exports cover their own tenant's chain only."""
    first: Tenant = await new_tenant()
    second: Tenant = await new_tenant()
    conversation = await _activity(api, first)
    found = (
        await api.get("/v1/audit/events", params={"resource": conversation}, headers=second.headers("auditor"))
    ).json()
    assert found["events"] == []
    export = await api.get("/v1/audit/export", headers=second.headers("auditor"))
    records = [json.loads(line) for line in export.text.splitlines()[1:]]
    assert {r["chain"] for r in records} == {found["chain"]}
    # The only mention of the other tenant's conversation is this auditor's own search for it.
    assert [r["action"] for r in records if conversation in json.dumps(r)] == ["audit.query"]
