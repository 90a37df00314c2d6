"""The OpenAPI document tells the truth: errors are problems, /v1 needs a key, and real answers match it."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from service.api import create_app
from service.api.app import openapi_document
from service.api.problems import PROBLEM_JSON
from service.auth_failures import AuthFailureLimits, AuthFailures
from service.context import ServiceContext
from service.database import make_engine, make_sessions

from ..conftest import Tenant, asgi_transport
from .helpers import open_conversation

DOCUMENT: dict[str, Any] = json.loads(openapi_document())
_REGISTRY = Registry().with_resource("urn:custody:openapi", Resource.from_contents(DOCUMENT, DRAFT202012))
PROBLEM = Draft202012Validator({"$ref": "urn:custody:openapi#/components/schemas/Problem"}, registry=_REGISTRY)
METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method, operation


def documented(path: str, method: str, status: int) -> dict[str, Any]:
    """The response the document promises for this status, or a failed test."""
    responses = DOCUMENT["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} does not document {status}"
    return dict(responses[str(status)])


def assert_documented_problem(response: httpx.Response, status: int, path: str, method: str) -> dict[str, Any]:
    """The answer is this status, as a problem the document lists for the operation, with the
    headers it lists."""
    assert response.status_code == status, response.text
    promised = documented(path, method, status)
    assert response.headers["content-type"].startswith(PROBLEM_JSON), response.headers
    body = dict(response.json())
    PROBLEM.validate(body)
    assert body["status"] == response.status_code
    for name, header in promised.get("headers", {}).items():
        if header.get("required"):
            assert name in response.headers, f"{name} missing from {response.status_code}"
    return body


def test_every_error_response_is_a_problem() -> None:
    """Every 4xx and 5xx the document lists is application/problem+json with the Problem schema, and nothing else."""
    seen = 0
    for path, method, operation in operations():
        for status, response in operation["responses"].items():
            if int(status) < 400:
                continue
            assert response["content"] == {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}}, (
                f"{method.upper()} {path} {status}"
            )
            assert response["description"], f"{method.upper()} {path} {status}"
            seen += 1
    assert seen > 50


def test_the_problem_schema_has_the_members_the_mapping_writes() -> None:
    """The Problem schema requires type, title, status and detail, and allows pointer, fields, code and data_classes."""
    problem = DOCUMENT["components"]["schemas"]["Problem"]
    assert sorted(problem["required"]) == ["detail", "status", "title", "type"]
    assert set(problem["properties"]) == {
        "type",
        "title",
        "status",
        "detail",
        "pointer",
        "fields",
        "code",
        "data_classes",
    }


def test_waiting_and_authentication_headers_are_documented() -> None:
    """Every 429 and 503 documents Retry-After, and every 401 documents WWW-Authenticate."""
    for path, method, operation in operations():
        for status, response in operation["responses"].items():
            headers = response.get("headers", {})
            if status in ("429", "503"):
                assert headers["Retry-After"]["schema"]["type"] == "integer", (path, method, status)
            if status == "401":
                assert "WWW-Authenticate" in headers, (path, method)


def test_every_v1_operation_needs_a_bearer_key() -> None:
    """Every /v1 operation requires the bearerAuth HTTP bearer scheme and answers 401, 403 and 429; the probes need nothing."""
    scheme = DOCUMENT["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http"
    assert scheme["scheme"] == "bearer"
    for path, method, operation in operations():
        if path.startswith("/v1/"):
            assert operation["security"] == [{"bearerAuth": []}], (path, method)
            assert {"401", "403", "429", "503"} <= set(operation["responses"]), (path, method)
        else:
            assert "security" not in operation, (path, method)
    assert "security" not in DOCUMENT


def test_every_operation_is_described() -> None:
    """Every operation has a summary and a description."""
    for path, method, operation in operations():
        assert operation.get("summary"), (path, method)
        assert operation.get("description"), (path, method)


def test_the_export_documents_its_line_formats_and_headers() -> None:
    """The export's 200 is NDJSON or FHIR NDJSON, with the X-Custody-* headers that make it verifiable."""
    ok = documented("/v1/audit/export", "get", 200)
    assert set(ok["content"]) == {"application/x-ndjson", "application/fhir+ndjson"}
    assert {"X-Custody-Chain", "X-Custody-Range", "X-Custody-Range-Head-Hash", "X-Custody-Export-Header"} <= set(
        ok["headers"]
    )


def test_request_bodies_refuse_unknown_members() -> None:
    """The bodies the service refuses unknown members in say so (additionalProperties: false)."""
    schemas = DOCUMENT["components"]["schemas"]
    for name in (
        "ConversationCreate",
        "TurnCreate",
        "TenantHoldCreate",
        "ConversationHoldCreate",
        "SubjectHoldCreate",
        "RetentionRunCreate",
    ):
        assert schemas[name]["additionalProperties"] is False, name


def test_a_hold_body_is_one_of_three_scopes_and_a_run_body_is_optional() -> None:
    """Placing a hold takes exactly one of the three scoped bodies, and starting a run may send no body at all."""
    hold = DOCUMENT["paths"]["/v1/ops/holds"]["post"]["requestBody"]
    arms = hold["content"]["application/json"]["schema"]["oneOf"]
    names = [arm["$ref"].rsplit("/", 1)[1] for arm in arms]
    assert names == ["TenantHoldCreate", "ConversationHoldCreate", "SubjectHoldCreate"]
    scopes = [DOCUMENT["components"]["schemas"][name]["properties"]["scope"]["const"] for name in names]
    assert scopes == ["tenant", "conversation", "subject"]
    assert hold["required"] is True
    assert DOCUMENT["paths"]["/v1/ops/retention/runs"]["post"]["requestBody"]["required"] is False


async def test_real_client_errors_match_the_document(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """401, 403, 404, 400 (not JSON, too deep, a lenient integer, a schema mismatch), 413 and 422 answers validate against the documented problem."""
    conversations, turns = "/v1/conversations", "/v1/conversations/{conversation_id}/turns"
    steps, one = "/v1/conversations/{conversation_id}/steps", "/v1/conversations/{conversation_id}"
    conversation = await open_conversation(api, tenant.headers())

    assert_documented_problem(await api.get("/v1/audit/verify"), 401, "/v1/audit/verify", "get")
    wrong_role = await api.get("/v1/audit/verify", headers=tenant.headers())
    assert_documented_problem(wrong_role, 403, "/v1/audit/verify", "get")
    missing = await api.get(f"{conversations}/conv_0000000000000000", headers=tenant.headers())
    assert_documented_problem(missing, 404, one, "get")

    not_json = await api.post(conversations, content=b"{", headers=tenant.headers())
    assert_documented_problem(not_json, 400, conversations, "post")
    deep: Any = "x"
    for _ in range(100):
        deep = [deep]
    too_deep = await api.post(f"{conversations}/{conversation}/turns", json={"input": deep}, headers=tenant.headers())
    assert_documented_problem(too_deep, 400, turns, "post")
    lenient = await api.get(f"{conversations}/{conversation}/steps?cursor=1e3", headers=tenant.headers())
    assert_documented_problem(lenient, 400, steps, "get")
    mismatch = await api.post(conversations, json={"route": 1, "data_classes": "phi"}, headers=tenant.headers())
    assert assert_documented_problem(mismatch, 400, conversations, "post")["fields"]

    too_big = await api.post(conversations, content=b"x" * 70_000, headers=tenant.headers())
    assert_documented_problem(too_big, 413, conversations, "post")
    unknown = await api.post(
        conversations, json={"route": "nowhere", "data_classes": ["phi"]}, headers=tenant.headers()
    )
    assert_documented_problem(unknown, 422, conversations, "post")
    empty = await api.post(f"{conversations}/{conversation}/turns", json={"input": " "}, headers=tenant.headers())
    assert assert_documented_problem(empty, 422, turns, "post")["pointer"] == "/input"


async def test_ops_and_erasure_errors_match_the_document(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """The ops API's 404s and 409 and 422, a strict run body's 400, and an erasure path with a slash answer documented problems."""
    ops = tenant.headers("ops")
    unknown_hold = await api.delete("/v1/ops/holds/hold_" + "0" * 30, headers=ops)
    assert_documented_problem(unknown_hold, 404, "/v1/ops/holds/{hold_id}", "delete")
    placed = await api.post("/v1/ops/holds", json={"scope": "tenant", "reason": "case 1"}, headers=ops)
    assert placed.status_code == 201, placed.text
    hold = placed.json()["id"]
    assert (await api.delete(f"/v1/ops/holds/{hold}", headers=ops)).status_code == 200
    again = await api.delete(f"/v1/ops/holds/{hold}", headers=ops)
    assert_documented_problem(again, 409, "/v1/ops/holds/{hold_id}", "delete")
    foreign = {"scope": "conversation", "conversation_id": "conv_" + "0" * 30, "reason": "case 2"}
    refused = await api.post("/v1/ops/holds", json=foreign, headers=ops)
    assert assert_documented_problem(refused, 422, "/v1/ops/holds", "post")["pointer"] == "/conversation_id"
    unknown_run = await api.get("/v1/ops/retention/runs/run_" + "0" * 30, headers=ops)
    assert_documented_problem(unknown_run, 404, "/v1/ops/retention/runs/{run_id}", "get")
    for lenient in ({"dry_run": 0}, {"dry_run": "true"}, {"limit": "5"}):
        coerced = await api.post("/v1/ops/retention/runs", json=lenient, headers=ops)
        assert_documented_problem(coerced, 400, "/v1/ops/retention/runs", "post")
    slashed = await api.delete("/v1/subjects/MRN%2F0042", headers=tenant.headers())
    assert_documented_problem(slashed, 404, "/v1/subjects/{subject}", "delete")


async def test_a_steps_cursor_past_any_position_is_a_documented_400(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """A steps cursor past the largest step position (a Postgres integer) is 400, as the document's maximum says, not a 500."""
    conversation = await open_conversation(api, tenant.headers())
    parameters = DOCUMENT["paths"]["/v1/conversations/{conversation_id}/steps"]["get"]["parameters"]
    cursor = next(parameter for parameter in parameters if parameter["name"] == "cursor")
    assert cursor["schema"]["maximum"] == 2**31 - 1
    path = f"/v1/conversations/{conversation}/steps"
    assert (await api.get(path, params={"cursor": 2**31 - 1}, headers=tenant.headers())).status_code == 200
    response = await api.get(path, params={"cursor": 2**31}, headers=tenant.headers())
    assert_documented_problem(response, 400, "/v1/conversations/{conversation_id}/steps", "get")


async def test_too_many_failed_authentications_match_the_document(ctx: ServiceContext) -> None:
    """A source over its failure limit gets the documented 429 problem with Retry-After."""
    limited = dataclasses.replace(ctx, auth_failures=AuthFailures(AuthFailureLimits(per_source=1)))
    transport = asgi_transport(create_app(limited), client=("203.0.113.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
        await client.get("/v1/audit/events", headers={"Authorization": "Bearer cust_nope_nope"})
        refused = await client.get("/v1/audit/events", headers={"Authorization": "Bearer cust_nope_nope"})
    assert_documented_problem(refused, 429, "/v1/audit/events", "get")
    assert int(refused.headers["Retry-After"]) > 0


@pytest.fixture
async def unreachable(ctx: ServiceContext) -> AsyncIterator[httpx.AsyncClient]:
    """The app with a database nothing listens on."""
    engine = make_engine("postgresql://postgres@127.0.0.1:9/custody")
    app = create_app(dataclasses.replace(ctx, sessions=make_sessions(engine)))
    async with httpx.AsyncClient(transport=asgi_transport(app), base_url="http://custody.test") as client:
        yield client
    await engine.dispose()


async def test_an_unreachable_database_matches_the_document(unreachable: httpx.AsyncClient, tenant: Tenant) -> None:
    """With the database gone, /v1 operations and /readyz answer the documented 503 problem with Retry-After."""
    down = await unreachable.get("/v1/audit/verify", headers=tenant.headers("auditor"))
    assert_documented_problem(down, 503, "/v1/audit/verify", "get")
    not_ready = await unreachable.get("/readyz")
    assert_documented_problem(not_ready, 503, "/readyz", "get")


async def test_an_unsupported_method_is_405_with_allow(api: httpx.AsyncClient) -> None:
    """A method the path does not support is a 405 problem whose Allow lists the methods it does."""
    response = await api.patch("/v1/conversations/conv_0000000000000000")
    assert response.status_code == 405, response.text
    assert response.headers["content-type"].startswith(PROBLEM_JSON)
    PROBLEM.validate(response.json())
    assert {method.strip() for method in response.headers["allow"].split(",")} == {"GET", "DELETE", "OPTIONS"}
    refused = await api.put("/v1/conversations")
    assert {method.strip() for method in refused.headers["allow"].split(",")} == {"GET", "POST", "OPTIONS"}


async def test_options_lists_every_method_of_the_path(api: httpx.AsyncClient) -> None:
    """OPTIONS on a path with several operations lists all of them, as the document does."""
    response = await api.options("/v1/conversations/conv_0000000000000000")
    assert response.status_code == 204
    documented_methods = {m.upper() for m in DOCUMENT["paths"]["/v1/conversations/{conversation_id}"]}
    assert {method.strip() for method in response.headers["allow"].split(",")} == documented_methods | {"OPTIONS"}


async def test_an_export_answers_as_documented(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """Both export formats answer with a documented media type and every documented header."""
    ok = documented("/v1/audit/export", "get", 200)
    for export_format in ("ndjson", "fhir"):
        response = await api.get(
            "/v1/audit/export", params={"format": export_format}, headers=tenant.headers("auditor")
        )
        assert response.status_code == 200
        assert response.headers["content-type"].split(";")[0] in ok["content"]
        for name, header in ok["headers"].items():
            if header.get("required"):
                assert name in response.headers, name


async def test_a_time_parameter_is_not_a_number(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """A date-time query parameter spelled as a number is refused as malformed, not read as a Unix time."""
    for value in ("0.5", "1700000000"):
        response = await api.get("/v1/audit/events", params={"until": value}, headers=tenant.headers("auditor"))
        assert response.status_code == 400, value
    accepted = await api.get(
        "/v1/audit/events", params={"until": "2030-01-01T00:00:00Z"}, headers=tenant.headers("auditor")
    )
    assert accepted.status_code == 200
