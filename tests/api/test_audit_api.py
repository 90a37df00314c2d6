"""The auditor API: query, export with proof, offline verification, FHIR, and auditing of auditors."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

import h11
import httpx
import pytest
from fhir.resources.R4B.auditevent import AuditEvent as FhirAuditEvent
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from service.audit import (
    AuditEntry,
    checkpoint_all,
    export_header,
    export_lines,
    export_range,
    record_hash,
    sign_checkpoint,
    to_fhir_audit_event,
    verify_export,
)
from service.context import ServiceContext

from ..conftest import CANARY, NewTenant, Tenant, signer_of
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
    seen: list[int] = []
    cursor: int | None = 0
    while cursor is not None:
        batch = (await api.get("/v1/audit/events", params={"cursor": cursor, "limit": 2}, headers=auditor)).json()
        seen.extend(e["seq"] for e in batch["events"])
        cursor = batch["next_cursor"]
    assert seen == sorted(seen)
    assert seen[0] == 1
    assert len(seen) == len(set(seen))
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


async def test_export_verifies_offline_and_tampering_is_named(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext
) -> None:
    """A native export carries range, head and signed checkpoint; it verifies offline, and an edited line is named."""
    await _activity(api, tenant)
    await checkpoint_all(ctx.auditor, ctx.sessions)
    await _activity(api, tenant)
    export = await api.get("/v1/audit/export", headers=tenant.headers("auditor"))
    assert export.status_code == 200
    assert export.headers["content-type"].startswith("application/x-ndjson")
    lines = export.text.splitlines()
    header = json.loads(lines[0])
    assert header["range"]["first_seq"] == 1
    assert header["latest_checkpoint"]
    assert header["checkpoints"]
    assert CANARY not in export.text
    pinned = signer_of(ctx).public_pem().encode()
    verdict, _ = verify_export(lines, public_key_pem=pinned)
    assert verdict.ok
    assert verdict.checkpoint_seq == header["checkpoints"][-1]["seq"]

    edited = list(lines)
    record = json.loads(edited[3])
    record["outcome"] = "denied"
    edited[3] = json.dumps(record)
    verdict, _ = verify_export(edited, public_key_pem=pinned)
    assert not verdict.ok
    assert verdict.first_bad == record["seq"]

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    stranger = (
        Ed25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    verdict, _ = verify_export(lines, public_key_pem=stranger)
    assert not verdict.ok
    assert "not signed by the audit key" in (verdict.reason or "")


async def test_forged_and_truncated_exports_fail_with_the_pinned_key(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext
) -> None:
    """An export re-hashed after an edit and deletions, or cut short, no longer matches its signed attestation."""
    from service.audit import record_hash

    await _activity(api, tenant)
    await _activity(api, tenant)
    lines = (await api.get("/v1/audit/export", headers=tenant.headers("auditor"))).text.splitlines()
    pinned = signer_of(ctx).public_pem().encode()
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
    assert not verdict.ok
    assert "differs from what was signed" in (verdict.reason or "")
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
    assert resources
    assert all(r["resourceType"] == "AuditEvent" for r in resources)
    for resource in resources:
        FhirAuditEvent.model_validate(resource)
    assert CANARY not in export.text


async def test_verify_endpoint_reports_an_intact_chain(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """GET /v1/audit/verify recomputes the tenant's chain."""
    await _activity(api, tenant)
    verdict = (await api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()
    # The tenant's creation and its three keys, then four accesses.
    assert verdict["ok"] is True
    assert verdict["first_bad_seq"] is None
    assert verdict["checked"] == 8


async def test_auditors_see_only_their_tenant(api: httpx.AsyncClient, new_tenant: NewTenant) -> None:
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


async def _chain_of(api: httpx.AsyncClient, tenant: Tenant) -> str:
    chain: str = (await api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()["chain"]
    return chain


async def _signed_records(ctx: ServiceContext, chain: str, count: int, *, every: int = 1) -> list[int]:
    """Append `count` records to `chain`, signing a checkpoint after every `every`th; their seqs."""
    signed: list[int] = []
    async with ctx.sessions.begin() as session:
        for n in range(1, count + 1):
            entry = AuditEntry("audit.query", None, resource_type="audit_log", resource_id=chain, chain=chain)
            await ctx.auditor.append(session, entry)
            if n % every == 0:
                checkpoint = await sign_checkpoint(session, signer_of(ctx), chain)
                assert checkpoint is not None
                signed.append(checkpoint.seq)
    return signed


def _h11_reads_head(response: httpx.Response) -> None:
    """Feed the response head to an h11 client (httpx's HTTP/1.1 parser, default limits) in
    network-sized pieces, as a real socket would deliver it; h11 refuses an oversized head."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/v1/audit/export", headers=[("Host", "custody.test")]))
    client.send(h11.EndOfMessage())
    head = b"HTTP/1.1 200 OK\r\n" + b"".join(name + b": " + value + b"\r\n" for name, value in response.headers.raw)
    head += b"\r\n"
    event: Any = h11.NEED_DATA
    for start in range(0, len(head), 1024):
        client.receive_data(head[start : start + 1024])
        event = client.next_event()
        if event is not h11.NEED_DATA:
            break
    assert isinstance(event, h11.Response)
    assert event.status_code == 200


async def test_export_header_stays_small_with_hundreds_of_checkpoints(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext
) -> None:
    """With 400 signed checkpoints in range the export header carries only the last one, stays as small as with one, passes h11, and verifies."""
    auditor = tenant.headers("auditor")
    chain = await _chain_of(api, tenant)
    await _signed_records(ctx, chain, 1)
    small = await api.get("/v1/audit/export", params={"format": "fhir"}, headers=auditor)
    signed = await _signed_records(ctx, chain, 400)
    await _activity(api, tenant)
    for format in ("ndjson", "fhir"):
        export = await api.get("/v1/audit/export", params={"format": format}, headers=auditor)
        assert export.status_code == 200
        _h11_reads_head(export)
        token = export.headers["x-custody-export-header"]
        # Only the digits of the grown seqs may differ from the one-checkpoint export.
        assert len(token) < 4096, len(token)
        assert len(token) <= len(small.headers["x-custody-export-header"]) + 64, len(token)
        header = json.loads(base64.urlsafe_b64decode(token))
        assert [c["seq"] for c in header["checkpoints"]] == [signed[-1]]
        assert header["latest_checkpoint"]["seq"] == signed[-1]
        pinned = signer_of(ctx).public_pem().encode()
        lines = export.text.splitlines()
        if format == "ndjson":
            assert json.loads(lines[0]) == header
            verdict, _ = verify_export(lines, public_key_pem=pinned)
        else:
            verdict, _ = verify_export(lines, public_key_pem=pinned, fhir_header=token)
        assert verdict.ok, verdict
        assert verdict.checkpoint_seq == signed[-1], verdict


async def test_a_rewrite_before_the_carried_checkpoint_fails_offline(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext, engine: AsyncEngine
) -> None:
    """A record rewritten in the database after one checkpoint and before the range's last, with every later hash and the head recomputed, fails at the one checkpoint the export carries."""
    chain = await _chain_of(api, tenant)
    signed = await _signed_records(ctx, chain, 9, every=3)
    await _signed_records(ctx, chain, 2, every=99)
    rewritten = signed[-2] + 1
    async with engine.connect() as connection:
        transaction = await connection.begin()
        try:
            for table in ("audit_events", "audit_checkpoints"):
                await connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            rows = await connection.execute(
                text("SELECT seq, record FROM audit_events WHERE chain = :c ORDER BY seq"), {"c": chain}
            )
            stored = {int(seq): dict(record) for seq, record in rows}
            prev = stored[rewritten - 1]["hash"]
            for seq in range(rewritten, max(stored) + 1):
                record = stored[seq] | {"prev_hash": prev}
                if seq == rewritten:
                    record["outcome"] = "denied"
                record["hash"] = prev = record_hash(prev, record)
                await connection.execute(
                    text("UPDATE audit_events SET record = CAST(:r AS jsonb) WHERE chain = :c AND seq = :s"),
                    {"r": json.dumps(record), "c": chain, "s": seq},
                )
            await connection.execute(
                text("UPDATE audit_chain_heads SET head_hash = :h WHERE chain = :c"), {"h": prev, "c": chain}
            )
            # The export is made from the rewritten tables, so its attestation signs the forgery.
            session = AsyncSession(bind=connection)
            span = await export_range(session, chain, None, None)
            header = await export_header(session, span, signer_of(ctx))
            lines = [line async for line in export_lines(session, header)]
        finally:
            await transaction.rollback()
    assert [c["seq"] for c in header["checkpoints"]] == [signed[-1]]
    verdict, _ = verify_export(lines, public_key_pem=signer_of(ctx).public_pem().encode())
    assert not verdict.ok, verdict
    assert verdict.first_bad == signed[-1], verdict
    assert "checkpoint" in (verdict.reason or ""), verdict


def _reencoded(event: dict[str, Any], change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """The event rebuilt from its carried record after `change`, so the two agree with each other."""
    detail = next(d for d in event["entity"][0]["detail"] if d["type"] == "record")
    record = json.loads(base64.b64decode(detail["valueBase64Binary"]))
    change(record)
    return to_fhir_audit_event(record)


EVENT_EDITS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "id": lambda e: e.update(id=e["id"] + "0"),
    "action": lambda e: e.update(action="D"),
    "outcome": lambda e: e.update(outcome="4"),
    "outcomeDesc": lambda e: e.update(outcomeDesc="forbidden"),
    "recorded": lambda e: e.update(recorded="2020-01-01T00:00:00.000000Z"),
    "type": lambda e: e["type"].update(code="110113"),
    "agent.who": lambda e: e["agent"][0].update(who={"display": "unauthenticated"}),
    "agent.role": lambda e: e["agent"][0].update(role=[{"text": "ops"}]),
    "entity.what": lambda e: e["entity"][0].update(what={"identifier": {"system": "urn:custody:turn", "value": "x"}}),
    "entity.detail": lambda e: e["entity"][0]["detail"][0].update(valueString="history.read"),
    "entity.added": lambda e: e["entity"].append({"what": {"identifier": {"value": "ten_other"}}}),
    "record.outcome": lambda e: _reencoded(e, lambda r: r.update(outcome="denied", reason="forbidden")),
    "record.details": lambda e: _reencoded(e, lambda r: r["details"].update(extra=1)),
}


async def test_fhir_export_verifies_offline_with_its_header(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext
) -> None:
    """A FHIR export verifies offline with its header; an edited event, a dropped or reordered line, or another export's or an edited header fails."""
    await _activity(api, tenant)
    await checkpoint_all(ctx.auditor, ctx.sessions)
    await _activity(api, tenant)
    auditor = tenant.headers("auditor")
    export = await api.get("/v1/audit/export", params={"format": "fhir"}, headers=auditor)
    token = export.headers["x-custody-export-header"]
    lines = export.text.splitlines()
    pinned = signer_of(ctx).public_pem().encode()

    def verify(lines: list[str], token: str = token) -> Any:
        verdict, _ = verify_export(lines, public_key_pem=pinned, fhir_header=token)
        return verdict

    intact = verify(lines)
    assert intact.ok, intact
    assert intact.checked == len(lines), intact
    assert intact.checkpoint_seq, intact
    for resource in map(json.loads, lines):
        FhirAuditEvent.model_validate(resource)

    target = 6  # after the tenant's creation and its three keys: a record of the first activity
    seq = int(json.loads(lines[target])["id"].rsplit("-", 1)[1])
    for name, edit in EVENT_EDITS.items():
        event = json.loads(lines[target])
        replaced = edit(event)
        edited = list(lines)
        edited[target] = json.dumps(replaced if isinstance(replaced, dict) else event)
        verdict = verify(edited)
        assert not verdict.ok, (name, verdict)
        assert verdict.first_bad == seq, (name, verdict)

    dropped = verify(lines[:target] + lines[target + 1 :])
    assert not dropped.ok, dropped
    assert dropped.first_bad == seq, dropped
    swapped = list(lines)
    swapped[target], swapped[target + 1] = swapped[target + 1], swapped[target]
    reordered = verify(swapped)
    assert not reordered.ok, reordered
    assert reordered.first_bad == seq, reordered

    later = await api.get("/v1/audit/export", params={"format": "fhir"}, headers=auditor)
    assert not verify(lines, later.headers["x-custody-export-header"]).ok
    header = json.loads(base64.urlsafe_b64decode(token))
    for restated in (
        header | {"range_head_hash": "0" * 64},
        header | {"range": header["range"] | {"last_seq": header["range"]["last_seq"] - 1}},
    ):
        forged = base64.urlsafe_b64encode(json.dumps(restated).encode()).decode()
        verdict = verify(lines, forged)
        assert not verdict.ok, verdict
        assert "signed" in (verdict.reason or ""), verdict
        assert not verify(lines[:-1], forged).ok


@pytest.mark.parametrize("edit", ["drop the record", "garble the record"])
async def test_a_fhir_event_without_a_readable_record_fails(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext, edit: str
) -> None:
    """An AuditEvent whose carried record is removed or is not base64 JSON fails verification at its seq."""
    await _activity(api, tenant)
    export = await api.get("/v1/audit/export", params={"format": "fhir"}, headers=tenant.headers("auditor"))
    lines = export.text.splitlines()
    event = json.loads(lines[1])
    details = event["entity"][0]["detail"]
    if edit == "drop the record":
        details[:] = [d for d in details if d["type"] != "record"]
    else:
        next(d for d in details if d["type"] == "record")["valueBase64Binary"] = "bm90IGpzb24="
    lines[1] = json.dumps(event)
    verdict, _ = verify_export(
        lines,
        public_key_pem=signer_of(ctx).public_pem().encode(),
        fhir_header=export.headers["x-custody-export-header"],
    )
    assert not verdict.ok, verdict
    assert verdict.first_bad == 2, verdict
