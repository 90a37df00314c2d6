"""Log lines under the real logging configuration: one access line per request, tied to its span, with no content or query."""

from __future__ import annotations

import json
import re

import httpx
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.simulator import FaultSpec, RunningSimulator

from ..conftest import CANARY, Tenant
from ..observability import captured_logging
from .helpers import open_conversation, take_turn

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CARD = "4556735267909704"
FIELDS = {"time", "level", "logger", "message", "request_id", "trace_id", "span_id"}


def _server_spans(spans: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    """The finished server spans, by the request id they carry."""
    return {
        str(span.attributes["custody.request_id"]): span
        for span in spans.get_finished_spans()
        if span.kind.name == "SERVER" and span.attributes and "custody.request_id" in span.attributes
    }


async def test_every_request_has_one_access_line_naming_its_span(
    api: httpx.AsyncClient, tenant: Tenant, spans: InMemorySpanExporter
) -> None:
    """Each request, a 404 or 405 no handler took included, writes exactly one JSON access line with its method, route template, status, duration and request id, and the trace and span ids of its server span."""
    spans.clear()
    with captured_logging("json") as log:
        responses = [
            await api.post(
                "/v1/conversations",
                json={"route": "patient-intake", "data_classes": ["phi"]},
                headers=tenant.headers() | {"traceparent": f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"},
            )
        ]
        conversation = responses[0].json()["id"]
        responses.append(
            await api.post(f"/v1/conversations/{conversation}/turns", json={"input": "hi"}, headers=tenant.headers())
        )
        responses.append(
            await api.get(f"/v1/conversations/{conversation}/steps?cursor=0&limit=5", headers=tenant.headers())
        )
        responses.append(await api.get("/no/such/path?x=1"))
        responses.append(await api.put(f"/v1/conversations/{conversation}", headers=tenant.headers()))
        responses.append(await api.get("/healthz", headers={"X-Request-Id": "probe-7"}))
        access = log.access()
    servers = _server_spans(spans)
    expected = [
        ("POST", "/v1/conversations", 201),
        ("POST", "/v1/conversations/{conversation_id}/turns", 200),
        ("GET", "/v1/conversations/{conversation_id}/steps", 200),
        ("GET", "unrouted", 404),
        ("PUT", "unrouted", 405),  # refused by the router, before any handler: no route is chosen
        ("GET", "/healthz", 200),
    ]
    assert len(access) == len(responses)
    for response, (method, route, status) in zip(responses, expected, strict=True):
        request_id = response.headers["x-request-id"]
        [line] = [line for line in access if line["request_id"] == request_id]
        assert FIELDS <= line.keys()
        assert (line["method"], line["route"], line["status"]) == (method, route, status)
        assert line["status"] == response.status_code
        assert line["level"] == "INFO"
        assert line["duration_ms"] > 0
        assert line["message"].startswith(f"{method} {route} {status} ")
        span = servers[request_id]
        assert line["trace_id"] == format(span.context.trace_id, "032x")
        assert line["span_id"] == format(span.context.span_id, "016x")
        assert span.name == f"{method} {route}"
    assert access[0]["trace_id"] == CALLER_TRACE
    assert access[-1]["request_id"] == "probe-7"


async def test_a_line_written_while_serving_a_request_carries_its_ids(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, spans: InMemorySpanExporter
) -> None:
    """A warning written inside a request (a provider copy that could not be deleted) carries that request's id and its trace."""
    conversation = await open_conversation(api, tenant.headers(), {"route": "public-faq", "data_classes": ["public"]})
    await take_turn(api, tenant.headers(), conversation, "opening hours?")
    spans.clear()
    gemini.app.inject(FaultSpec(status=500, retry_after=0, count=1))
    with captured_logging("json") as log:
        deleted = await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())
        records = log.records()
    assert deleted.status_code == 200, deleted.text
    request_id = deleted.headers["x-request-id"]
    [warning] = [r for r in records if r["logger"] == "custody.provider_copies"]
    assert warning["level"] == "WARNING"
    assert warning["request_id"] == request_id
    assert warning["trace_id"] == format(_server_spans(spans)[request_id].context.trace_id, "032x")
    assert warning["span_id"] is not None


async def test_no_log_line_holds_content_a_query_string_or_a_raw_path(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator
) -> None:
    """The canary (and a card number) sent as input, in paths, query strings and headers, and through failing and refused turns, reaches no log line; access lines hold route templates only."""
    headers = tenant.headers()
    with captured_logging("json") as log:
        conversation = await open_conversation(api, headers)
        await take_turn(api, headers, conversation, f"{CANARY} jane@example.org", **{"Idempotency-Key": CANARY})
        await api.post(
            f"/v1/conversations/{conversation}/turns?note={CANARY}",
            json={"input": f"my card is {CARD} {CANARY}"},
            # The canary itself has the shape of a safe request id, which is kept on purpose; a
            # card number is not, and is replaced.
            headers=headers | {"X-Request-Id": f"id-{CARD}", "User-Agent": CANARY, "Referer": CANARY},
        )
        gemini.app.inject(FaultSpec(status=500, retry_after=0, count=3))
        await api.post(f"/v1/conversations/{conversation}/turns", json={"input": CANARY}, headers=headers)
        await api.post(f"/v1/conversations/{conversation}/turns", json={"input": "sim:fail " + CANARY}, headers=headers)
        await api.get(f"/v1/{CANARY}?{CANARY}={CANARY}", headers=headers)
        await api.get(f"/v1/conversations/conv_{CANARY}/steps?cursor=0&q={CANARY}", headers=headers)
        await api.post("/v1/conversations", json={"route": CANARY, "data_classes": [CANARY]}, headers=headers)
        await api.post("/v1/conversations", content=b'{"route": "' + CANARY.encode() + b'"', headers=headers)
        await api.get("/v1/conversations", headers={"Authorization": f"Bearer cust_{CANARY}"})
        lines, access = log.lines(), log.access()
    assert len(access) == 10
    for line in lines:
        assert CANARY not in line, line
        assert CARD not in line, line
        assert "cursor=" not in line, line
        assert "note=" not in line, line
    for record in access:
        assert record["route"] == "unrouted" or re.fullmatch(r"/[a-z0-9/_{}-]*", record["route"]), record
        assert "?" not in record["message"]
    assert "conv_" not in json.dumps([record["route"] for record in access])


async def test_the_text_format_is_one_readable_line_with_the_ids(api: httpx.AsyncClient) -> None:
    """In the text format an access line reads `time level logger: METHOD route status duration` followed by its request and trace ids."""
    with captured_logging("text") as log:
        response = await api.get("/healthz")
        lines = log.lines()
    [line] = [line for line in lines if "custody.access" in line]
    assert re.search(
        r"INFO +custody\.access: GET /healthz 200 [0-9.]+ms \[request_id=req_[0-9a-f]+ trace_id=[0-9a-f]{32}\]$", line
    )
    assert response.headers["x-request-id"] in line


async def test_the_access_log_can_be_switched_off(api: httpx.AsyncClient) -> None:
    """With the access log off, requests write no line."""
    with captured_logging("json", access_log=False) as log:
        await api.get("/healthz")
        assert log.access() == []
