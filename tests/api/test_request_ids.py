"""A client's X-Request-Id is kept only in a shape that cannot carry a card, SSN or phone number."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.security import safe_request_id

from ..conftest import Tenant
from .test_audit_trail import chain_records, tenant_id

PUBLIC = {"route": "public-faq", "data_classes": ["public"]}
REPLACED = "x-custody-request-id-replaced"

# Each of these carries a card number, an SSN or a phone number in some common spelling.
HOSTILE = [
    "CARD-4556735267909704",
    "4556735267909704",
    "4556-7352-6790-9704",
    "4556.7352.6790.9704",
    "4556_7352_6790_9704",
    "4556 7352 6790 9704",
    "acct-4556-735267-909704",
    "ssn-123-45-6789",
    "123456789",
    "tel-555-867-5309",
    "+1-555-867-5309",
    "call5558675309",
    "45567352-6790-9704-abcd-ef0123456789",
    "4556735267909704-trailing\n",
]


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("abc-123.x_y", True),
        ("trace-me-42", True),
        ("run-7-step-12", True),
        # A date has 8 digits: refused with the rest (the rule cannot tell it from an account number).
        ("req-2026.11.30", False),
        (str(uuid.UUID(int=0x0123456789ABCDEF0123456789ABCDEF)), True),
        ("6f1c2b1e-8a4d-4c3e-9b7a-2d5e8f0a1b3c", True),
        # Random, but "165-70867728950" holds 14 digits: as many as a card number.
        ("0f8fad5b-d9cb-469f-a165-70867728950e", False),
        ("A" * 64, True),
        ("A" * 65, False),
        ("", False),
        ("job:42", False),
        ("trace-me-42\n", False),
        ("12345678-1234-1234-1234-123456789abc", False),
        *((value, False) for value in HOSTILE),
    ],
)
def test_request_id_shapes(value: str, kept: bool) -> None:
    """UUIDs and short tokens with at most 6 digits per digit run are safe; anything else is not."""
    assert safe_request_id(value) is kept


@pytest.mark.parametrize("hostile", [value for value in HOSTILE if "\n" not in value])
async def test_a_card_number_request_id_goes_nowhere(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, spans: InMemorySpanExporter, hostile: str
) -> None:
    """A request id holding a card, SSN or phone number reaches no audit record, span or response header."""
    digits = "".join(char for char in hostile if char.isdigit())
    chain = await tenant_id(api, tenant, engine)
    spans.clear()
    response = await api.post("/v1/conversations", json=PUBLIC, headers=tenant.headers() | {"X-Request-Id": hostile})
    assert response.status_code == 201, response.text
    assigned = response.headers["x-request-id"]
    assert assigned.startswith("req_")
    assert response.headers[REPLACED] == "malformed"
    assert digits not in "".join(ch for ch in json.dumps(dict(response.headers)) if ch.isdigit())
    record = (await chain_records(engine, chain))[-1]
    assert record["action"] == "conversation.create"
    assert record["source"]["request_id"] == assigned
    assert digits not in "".join(ch for ch in json.dumps(record) if ch.isdigit())
    finished = spans.get_finished_spans()
    assert finished
    for span in finished:
        assert span.attributes is not None
        assert span.attributes["custody.request_id"] == assigned
        assert digits not in "".join(ch for ch in json.dumps(dict(span.attributes), default=str) if ch.isdigit())


@pytest.mark.parametrize("given", ["abc-123.x_y", "6f1c2b1e-8a4d-4c3e-9b7a-2d5e8f0a1b3c"])
async def test_safe_request_ids_are_kept_and_echoed(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, spans: InMemorySpanExporter, given: str
) -> None:
    """A UUID or a plain token is echoed as sent, recorded and put on the span, with no replaced header."""
    chain = await tenant_id(api, tenant, engine)
    spans.clear()
    response = await api.post("/v1/conversations", json=PUBLIC, headers=tenant.headers() | {"X-Request-Id": given})
    assert response.status_code == 201, response.text
    assert response.headers["x-request-id"] == given
    assert REPLACED not in response.headers
    assert (await chain_records(engine, chain))[-1]["source"]["request_id"] == given
    # The request's server span and its audited action's span both carry it.
    carried = [span.attributes.get("custody.request_id") for span in spans.get_finished_spans() if span.attributes]
    assert carried == [given, given]


async def test_replaced_header_appears_exactly_when_the_clients_id_was_refused(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    """No id: one is assigned quietly; a safe id: kept; a refused or doubled id: assigned and said so."""
    url, headers = "/v1/conversations", tenant.headers()
    none = await api.post(url, json=PUBLIC, headers=headers)
    assert none.headers["x-request-id"].startswith("req_")
    assert REPLACED not in none.headers
    kept = await api.post(url, json=PUBLIC, headers=headers | {"X-Request-Id": "abc-123.x_y"})
    assert kept.headers["x-request-id"] == "abc-123.x_y"
    assert REPLACED not in kept.headers
    refused = await api.post(url, json=PUBLIC, headers=headers | {"X-Request-Id": "CARD-4556735267909704"})
    assert refused.headers["x-request-id"].startswith("req_")
    assert refused.headers[REPLACED] == "malformed"
    doubled = await api.post(
        url, json=PUBLIC, headers=[*headers.items(), ("X-Request-Id", "abc-1"), ("X-Request-Id", "abc-2")]
    )
    assert doubled.headers["x-request-id"].startswith("req_")
    assert doubled.headers[REPLACED] == "malformed"
    # A response no audited action produced says the same.
    health = await api.get("/healthz", headers={"X-Request-Id": "tel-555-867-5309"})
    assert health.headers["x-request-id"].startswith("req_")
    assert health.headers[REPLACED] == "malformed"
    assert "867" not in health.headers["x-request-id"]
