"""Hostile requests get a clear 4xx, in bounded time, and change nothing."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.request_guards import MAX_JSON_DEPTH, json_depth_exceeds

from ..conftest import Tenant
from .helpers import assert_problem, open_conversation, row_counts, take_turn


def _nested(depth: int) -> Any:
    """A JSON value with `depth` levels of arrays and objects."""
    value: Any = "leaf"
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def _deep_body(depth: int) -> str:
    # Written by hand: json.dumps itself recurses and would fail on the deepest bodies.
    return '{"input":' + "[" * depth + '"x"' + "]" * depth + "}"


def test_depth_counts_every_object_and_array() -> None:
    """The depth check counts nested objects and arrays and accepts anything up to the limit."""
    assert not json_depth_exceeds(_nested(MAX_JSON_DEPTH), MAX_JSON_DEPTH)
    assert json_depth_exceeds(_nested(MAX_JSON_DEPTH + 1), MAX_JSON_DEPTH)
    assert not json_depth_exceeds("text", 1)
    assert json_depth_exceeds(_nested(100_000), MAX_JSON_DEPTH)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH + 1, 1_000, 30_000])
async def test_deeply_nested_turn_input_is_400(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, depth: int
) -> None:
    """A turn whose input nests past the limit (even 30,000 deep) is a 400, not a 500, and stores nothing."""
    conversation = await open_conversation(api, tenant.headers())
    before = await row_counts(engine)
    response = await api.post(
        f"/v1/conversations/{conversation}/turns",
        content=_deep_body(depth),
        headers=tenant.headers() | {"content-type": "application/json"},
    )
    body = assert_problem(response, 400, "malformed-request")
    assert str(MAX_JSON_DEPTH) in body["detail"]
    assert await row_counts(engine) == before


async def test_deep_function_result_is_400(api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine) -> None:
    """A function result nested 1,000 deep is refused with 400 before the model is called."""
    conversation = await open_conversation(api, tenant.headers())
    result = "[" * 1_000 + "1" + "]" * 1_000
    body = '{"input":[{"type":"function_result","call_id":"c1","name":"f","result":' + result + "}]}"
    before = await row_counts(engine)
    response = await api.post(
        f"/v1/conversations/{conversation}/turns",
        content=body,
        headers=tenant.headers() | {"content-type": "application/json"},
    )
    assert_problem(response, 400, "malformed-request")
    assert await row_counts(engine) == before


async def test_deep_metadata_is_400_and_shallow_metadata_is_kept(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """Conversation metadata past the depth limit is a 400; metadata within it is stored and read back."""
    deep = '{"route":"patient-intake","data_classes":["phi"],"metadata":' + "[" * 1_000 + "]" * 1_000 + "}"
    response = await api.post(
        "/v1/conversations", content=deep, headers=tenant.headers() | {"content-type": "application/json"}
    )
    assert_problem(response, 400, "malformed-request")
    shallow = _nested(MAX_JSON_DEPTH - 3)  # an object, within the limit with its wrapper
    created = await api.post(
        "/v1/conversations",
        content=json.dumps({"route": "patient-intake", "data_classes": ["phi"], "metadata": shallow}),
        headers=tenant.headers() | {"content-type": "application/json"},
    )
    assert created.status_code == 201, created.text
    assert created.json()["metadata"] == shallow


async def test_body_that_is_not_json_is_400(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """A body that is not JSON at all is a 400 malformed-request."""
    response = await api.post(
        "/v1/conversations", content=b"{not json", headers=tenant.headers() | {"content-type": "application/json"}
    )
    assert_problem(response, 400, "malformed-request")


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("GET", "/steps"), ("POST", "/turns"), ("DELETE", "")])
@pytest.mark.parametrize("bad_id", ["conv_%00", "%00", "conv_" + "0" * 29 + "%00", "conv_" + "a" * 30 + "%0A"])
async def test_malformed_conversation_ids_are_404_on_every_endpoint(
    api: httpx.AsyncClient, tenant: Tenant, method: str, suffix: str, bad_id: str
) -> None:
    """An id with a NUL byte or a trailing newline is a 404 on every id endpoint, checked before any query."""
    response = await api.request(
        method, f"/v1/conversations/{bad_id}{suffix}", json={"input": "hello"}, headers=tenant.headers()
    )
    assert_problem(response, 404, "conversation-not-found")


@pytest.mark.parametrize("query", ["cursor=1e3", "limit=1e2", "limit=1.0", "cursor=+1", "limit=0x10", "cursor=1_0"])
async def test_integer_parameters_in_other_spellings_are_400(
    api: httpx.AsyncClient, tenant: Tenant, query: str
) -> None:
    """`cursor` and `limit` accept only plain decimal integers, on the history and on the audit log."""
    conversation = await open_conversation(api, tenant.headers())
    steps = await api.get(f"/v1/conversations/{conversation}/steps?{query}", headers=tenant.headers())
    assert_problem(steps, 400, "malformed-request")
    events = await api.get(f"/v1/audit/events?{query}", headers=tenant.headers("auditor"))
    assert_problem(events, 400, "malformed-request")


async def test_plain_integer_parameters_still_work(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """A plain decimal cursor and limit are accepted as before."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    page = await api.get(f"/v1/conversations/{conversation}/steps?cursor=0&limit=1", headers=tenant.headers())
    assert page.status_code == 200, page.text
    assert len(page.json()["steps"]) == 1


async def test_encoded_slash_does_not_change_the_route(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """`{id}%2Fsteps` is a 404, not the steps listing, and leaves no history.read record."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    for path in (f"/v1/conversations/{conversation}%2Fsteps", f"/v1/conversations/{conversation}%2fsteps"):
        response = await api.get(path, headers=tenant.headers())
        assert response.status_code == 404, response.text
        assert response.headers["content-type"].startswith("application/problem+json")
        assert "steps" not in response.json()
    events = await api.get("/v1/audit/events?action=history.read", headers=tenant.headers("auditor"))
    assert [e for e in events.json()["events"] if e["resource"]["id"] == conversation] == []
