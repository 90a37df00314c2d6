"""Every audit record names a finished span, every record of one request shares that request's trace, and a caller's traceparent is continued."""

from __future__ import annotations

import json
from typing import Any

import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.simulator import FaultSpec, RunningSimulator

from ..conftest import Tenant

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


async def _records_of(engine: AsyncEngine, request_id: str) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT record FROM audit_events WHERE record @> CAST(:p AS jsonb) ORDER BY chain, seq"),
            {"p": json.dumps({"source": {"request_id": request_id}})},
        )
        return [dict(row.record) for row in rows]


async def test_a_whole_flow_is_traced_request_by_request(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine, spans: InMemorySpanExporter
) -> None:
    """Create, turn, failed turn, delete and export: each request's records share its server span's trace, and each record's span is a finished span of that trace."""
    spans.clear()
    responses: list[httpx.Response] = []
    caller = {"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}
    created = await api.post(
        "/v1/conversations",
        json={"route": "patient-intake", "data_classes": ["phi"]},
        headers=tenant.headers() | caller,
    )
    responses.append(created)
    conversation = created.json()["id"]
    responses.append(
        await api.post(f"/v1/conversations/{conversation}/turns", json={"input": "hello"}, headers=tenant.headers())
    )
    gemini.app.inject(FaultSpec(status=500, retry_after=0, count=3))
    failed = await api.post(f"/v1/conversations/{conversation}/turns", json={"input": "x"}, headers=tenant.headers())
    assert failed.status_code == 502
    responses.append(failed)
    responses.append(await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers()))
    responses.append(await api.get("/v1/audit/export", headers=tenant.headers("auditor")))

    finished = {format(s.context.span_id, "016x"): s for s in spans.get_finished_spans()}
    servers = {
        s.attributes["custody.request_id"]: s
        for s in finished.values()
        if s.attributes and s.attributes.get("custody.request_id") and s.kind.name == "SERVER"
    }
    actions: list[str] = []
    for response in responses:
        request_id = response.headers["x-request-id"]
        server = servers[request_id]
        trace_id = format(server.context.trace_id, "032x")
        records = await _records_of(engine, request_id)
        assert records, request_id
        for record in records:
            assert record["trace_id"] == trace_id, (record["action"], request_id)
            span = finished[record["span_id"]]
            assert format(span.context.trace_id, "032x") == trace_id
            assert span.name == f"custody.{record['action']}"
            actions.append(record["action"])
    assert {"conversation.create", "turn.start", "turn.create", "conversation.delete", "audit.export"} <= set(actions)
    assert actions.count("turn.create") == 2  # the completed turn and the failed one
    # The caller's trace is continued: the first request's server span is a child of its span.
    first = servers[responses[0].headers["x-request-id"]]
    assert format(first.context.trace_id, "032x") == CALLER_TRACE
    assert first.parent is not None
    assert format(first.parent.span_id, "016x") == CALLER_SPAN
    # The others started traces of their own, one per request.
    traces = {format(servers[r.headers["x-request-id"]].context.trace_id, "032x") for r in responses}
    assert len(traces) == len(responses)


async def test_the_server_span_holds_nothing_the_client_typed(
    api: httpx.AsyncClient, tenant: Tenant, spans: InMemorySpanExporter
) -> None:
    """A card number in the path, the query and the user agent reaches no attribute of the request's spans."""
    spans.clear()
    card = "4556735267909704"
    await api.get(
        f"/v1/conversations/conv_{card}/steps?cursor=0&note={card}",
        headers=tenant.headers() | {"user-agent": f"agent {card}"},
    )
    server = [s for s in spans.get_finished_spans() if s.kind.name == "SERVER"]
    assert server
    assert server[0].name == "GET /v1/conversations/{conversation_id}/steps"
    for span in spans.get_finished_spans():
        assert card not in json.dumps(dict(span.attributes or {}))
        assert card not in span.name
