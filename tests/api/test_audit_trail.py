"""Every access leaves a hash-chained audit record and a span, in the action's own transaction."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.config import REPO_ROOT
from service.context import ServiceContext

from ..conftest import CANARY, OwnService, Tenant
from .helpers import assert_problem, open_conversation, row_counts, take_turn

SCHEMA = json.loads((REPO_ROOT / "schemas" / "audit-event.schema.json").read_text())


async def chain_records(engine: AsyncEngine, chain: str) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        rows = (
            (
                await connection.execute(
                    text("SELECT record FROM audit_events WHERE chain = :c ORDER BY seq"), {"c": chain}
                )
            )
            .scalars()
            .all()
        )
    return [dict(r) for r in rows]


async def tenant_id(api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine) -> str:
    async with engine.connect() as connection:
        return str(
            (await connection.execute(text("SELECT id FROM tenants WHERE name = :n"), {"n": tenant.name})).scalar_one()
        )


async def test_each_access_writes_its_record(api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine) -> None:
    """Create, read, turn, history read and delete each leave their record, with who, what, where and the storage decision."""
    chain = await tenant_id(api, tenant, engine)
    conversation = await open_conversation(api, tenant.headers())
    await api.get(f"/v1/conversations/{conversation}", headers=tenant.headers() | {"X-Request-Id": "req-check-1"})
    await take_turn(api, tenant.headers(), conversation, "hello")
    await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())
    await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())
    records = [
        r
        for r in await chain_records(engine, chain)
        if r["resource"]["id"] in (conversation, None) or r["details"].get("conversation_id") == conversation
    ]
    actions = [r["action"] for r in records]
    assert actions == [
        "conversation.create",
        "conversation.read",
        "turn.start",
        "turn.create",
        "history.read",
        "conversation.delete",
    ]
    read = records[1]
    assert read["source"]["request_id"] == "req-check-1"
    assert read["source"]["address"]
    assert read["actor"]["role"] == "backend"
    assert read["actor"]["key_id"].startswith("key_")
    assert read["data_classes"] == ["phi"]
    assert read["policy_version"].startswith("sha256:")
    turn = records[3]
    assert turn["details"]["store"] is False
    assert turn["details"]["storage_reason"] == "route_denies"
    assert all(r["outcome"] == "success" for r in records)
    for record in await chain_records(engine, chain):
        jsonschema.validate(record, SCHEMA)


async def test_refusals_are_audited_with_reasons(api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine) -> None:
    """A bad key goes to the system chain as auth.failure; a wrong role and a refused turn are denied records in the tenant's chain."""
    chain = await tenant_id(api, tenant, engine)
    before_system = len(await chain_records(engine, "system"))
    await api.get("/v1/conversations/conv_x", headers={"Authorization": "Bearer cust_00_nope"})
    system = (await chain_records(engine, "system"))[before_system:]
    assert [(r["action"], r["outcome"], r["reason"]) for r in system] == [("auth.failure", "denied", "unauthenticated")]
    assert system[0]["details"] == {"operation": "GetConversation"}
    await api.get("/v1/audit/events", headers=tenant.headers("backend"))
    conversation = await open_conversation(api, tenant.headers())
    stray = {"type": "function_result", "call_id": "call_none", "result": "x"}
    await api.post(f"/v1/conversations/{conversation}/turns", json={"input": [stray]}, headers=tenant.headers())
    records = await chain_records(engine, chain)
    denied = [(r["action"], r["outcome"], r["reason"]) for r in records if r["outcome"] != "success"]
    assert ("access.denied", "denied", "forbidden") in denied
    assert ("turn.start", "denied", "function_result_mismatch") in denied


async def test_upstream_failure_is_an_error_record(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, gemini: Any
) -> None:
    """A turn whose model call fails leaves turn.start and an error turn.create with the upstream code."""
    from service.simulator import FaultSpec

    chain = await tenant_id(api, tenant, engine)
    conversation = await open_conversation(api, tenant.headers())
    gemini.app.inject(FaultSpec(status=500, retry_after=0, count=3))
    await api.post(f"/v1/conversations/{conversation}/turns", json={"input": "x"}, headers=tenant.headers())
    last = (await chain_records(engine, chain))[-2:]
    assert [(r["action"], r["outcome"], r["reason"]) for r in last] == [
        ("turn.start", "success", None),
        ("turn.create", "error", "upstream_http_500"),
    ]


async def test_spans_carry_audit_ids_and_never_content(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, spans: InMemorySpanExporter
) -> None:
    """One span per audited action with custody.* attributes, under the request's server span; its ids are in the record; the canary is in no span."""
    spans.clear()
    chain = await tenant_id(api, tenant, engine)
    conversation = await open_conversation(
        api,
        tenant.headers(),
        {"route": "billing-support", "data_classes": ["pan"], "subject": CANARY, "metadata": {"n": CANARY}},
    )
    await take_turn(api, tenant.headers(), conversation, f"card {CANARY}")
    await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())
    every = spans.get_finished_spans()
    servers = [s for s in every if s.kind.name == "SERVER"]
    assert len(servers) == 3
    assert all(CANARY not in json.dumps(dict(s.attributes or {})) for s in servers)
    finished = [s for s in every if s.kind.name != "SERVER"]
    names = [s.name for s in finished]
    assert names == ["custody.conversation.create", "custody.turn.start", "custody.turn.create", "custody.history.read"]
    for span in finished:
        assert span.parent is not None
        assert span.parent.span_id in {s.context.span_id for s in servers}
        assert span.attributes
        assert span.attributes["custody.outcome"] == "success"
        assert all(key.startswith("custody.") for key in span.attributes)
        assert CANARY not in json.dumps(dict(span.attributes), default=str)
        assert CANARY not in span.name
    records = {r["span_id"]: r for r in await chain_records(engine, chain)}
    for span in finished:
        assert span.attributes is not None
        record = records[format(span.context.span_id, "016x")]
        assert record["trace_id"] == format(span.context.trace_id, "032x")
        assert record["action"] == span.attributes["custody.action"]
        assert record["seq"] == span.attributes["custody.audit_seq"]


async def test_audit_failure_fails_the_action(own_service: OwnService) -> None:
    """When the audit insert fails, the action fails and writes nothing else (fail closed)."""
    # A database of its own: the failing constraint below must not reach other tests' writes.
    api, tenant, engine = own_service.api, own_service.tenant, own_service.engine
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "before")
    before = await row_counts(engine)
    async with engine.begin() as connection:
        await connection.execute(
            text("ALTER TABLE audit_events ADD CONSTRAINT test_fail_closed CHECK (false) NOT VALID")
        )
    try:
        created = await api.post(
            "/v1/conversations", json={"route": "public-faq", "data_classes": ["public"]}, headers=tenant.headers()
        )
        assert_problem(created, 500, "internal-error")
        read = await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())
        assert_problem(read, 500, "internal-error")
        assert "before" not in read.text
        turn = await api.post(
            f"/v1/conversations/{conversation}/turns", json={"input": "during"}, headers=tenant.headers()
        )
        assert turn.status_code == 500
        assert await row_counts(engine) == before
    finally:
        async with engine.begin() as connection:
            await connection.execute(text("ALTER TABLE audit_events DROP CONSTRAINT test_fail_closed"))
    after = await take_turn(api, tenant.headers(), conversation, "what did I say first?")
    assert after["output_text"] == 'You first said: "before".'


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_events SET record = record WHERE seq = 1",
        "DELETE FROM audit_events WHERE seq = 1",
        "TRUNCATE audit_events",
        "DELETE FROM audit_checkpoints",
    ],
)
async def test_audit_rows_cannot_be_changed(
    engine: AsyncEngine, api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext, statement: str
) -> None:
    """UPDATE, DELETE and TRUNCATE of audit rows and checkpoints are refused, even for the table's owner."""
    from service.audit import checkpoint_all

    await open_conversation(api, tenant.headers())
    await checkpoint_all(ctx.auditor, ctx.sessions)
    async with engine.connect() as connection:
        with pytest.raises(Exception, match="append-only"):
            await connection.execute(text(statement))
        await connection.rollback()


async def test_service_role_may_insert_but_not_rewrite(database_url: str) -> None:
    """A login role in custody_app (the service's role) can read and insert audit rows but not update or delete them."""
    import asyncpg

    admin = await asyncpg.connect(database_url)
    await admin.execute("""DO $$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'custody_test_service') THEN
            CREATE ROLE custody_test_service LOGIN IN ROLE custody_app;
        END IF; END $$""")
    await admin.close()
    service = await asyncpg.connect(database_url.replace("postgres@", "custody_test_service@"))
    try:
        assert await service.fetchval("SELECT count(*) FROM audit_events") >= 0
        for statement in (
            "UPDATE audit_events SET seq = seq",
            "DELETE FROM audit_events",
            "UPDATE audit_checkpoints SET seq = seq",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await service.execute(statement)
    finally:
        await service.close()


async def test_request_id_is_echoed_and_recorded(api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine) -> None:
    """A well-formed X-Request-Id is echoed and recorded; a malformed one is replaced by an assigned id."""
    chain = await tenant_id(api, tenant, engine)
    given = await api.post(
        "/v1/conversations",
        json={"route": "public-faq", "data_classes": ["public"]},
        headers=tenant.headers() | {"X-Request-Id": "trace-me-42"},
    )
    assert given.headers["x-request-id"] == "trace-me-42"
    odd = await api.post(
        "/v1/conversations",
        json={"route": "public-faq", "data_classes": ["public"]},
        headers=tenant.headers() | {"X-Request-Id": f"{CANARY} with spaces"},
    )
    assigned = odd.headers["x-request-id"]
    assert assigned.startswith("req_")
    assert CANARY not in assigned
    sources = [r["source"]["request_id"] for r in await chain_records(engine, chain)]
    assert sources[-2:] == ["trace-me-42", assigned]
