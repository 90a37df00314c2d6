"""Bad input, foreign tenants and wrong roles: a clear problem+json, and nothing written."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.context import ServiceContext

from ..conftest import NewTenant, Tenant
from .helpers import assert_problem, open_conversation, row_counts, take_turn


@pytest.mark.parametrize(
    ("body", "status", "slug"),
    [
        ({"route": "no-such-route", "data_classes": ["phi"]}, 422, "unknown-route"),
        ({"route": "patient-intake", "data_classes": ["pan"]}, 422, "data-class-not-allowed"),
        ({"route": "patient-intake", "data_classes": ["phl"]}, 422, "unknown-data-class"),
        ({"route": "patient-intake", "data_classes": []}, 422, "invalid-input"),
        ({"route": "patient-intake"}, 400, "malformed-request"),
        ({"route": "patient-intake", "data_classes": ["phi"], "colour": "red"}, 400, "malformed-request"),
        ({"route": 7, "data_classes": ["phi"]}, 400, "malformed-request"),
    ],
)
async def test_bad_conversation_requests_change_nothing(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, body: dict[str, Any], status: int, slug: str
) -> None:
    """An unknown route, a class the route does not allow, or a malformed body is refused and writes nothing."""
    before = await row_counts(engine)
    assert_problem(await api.post("/v1/conversations", json=body, headers=tenant.headers()), status, slug)
    assert await row_counts(engine) == before


@pytest.mark.parametrize(
    ("payload", "status", "slug"),
    [
        ({"input": ""}, 422, "invalid-input"),
        ({"input": []}, 422, "invalid-input"),
        ({"input": [{"type": "thought", "signature": "forged"}]}, 422, "invalid-input"),
        ({"input": [{"type": "text", "text": "hi", "extra": 1}]}, 422, "invalid-input"),
        ({"input": [{"type": "user_input", "content": [{"type": "text"}]}]}, 422, "invalid-input"),
        (
            {"input": [{"type": "function_result", "call_id": "call_x", "result": "4C"}]},
            422,
            "function-result-mismatch",
        ),
        ({"input": 12}, 400, "malformed-request"),
        ({"text": "hi"}, 400, "malformed-request"),
    ],
)
async def test_bad_turns_change_nothing(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, payload: dict[str, Any], status: int, slug: str
) -> None:
    """Malformed input, client-forged model steps and unanswerable function results are refused before any model call."""
    conversation = await open_conversation(api, tenant.headers())
    before = await row_counts(engine)
    response = await api.post(f"/v1/conversations/{conversation}/turns", json=payload, headers=tenant.headers())
    assert_problem(response, status, slug)
    assert await row_counts(engine) == before


async def test_function_result_must_match_pending_call_name(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine
) -> None:
    """A function_result with the right call_id but another function's name is a 422 and writes nothing."""
    conversation = await open_conversation(
        api, tenant.headers(), {"route": "billing-support", "data_classes": ["financial"]}
    )
    asked = await take_turn(api, tenant.headers(), conversation, "call open_dispute")
    call = next(s for s in asked["steps"] if s["type"] == "function_call")
    before = await row_counts(engine)
    wrong = {"type": "function_result", "call_id": call["id"], "name": "get_recent_transactions", "result": "ok"}
    response = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": [wrong]}, headers=tenant.headers()
    )
    assert_problem(response, 422, "function-result-mismatch")
    chatter = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "never mind"}, headers=tenant.headers()
    )
    assert_problem(chatter, 422, "function-result-mismatch")
    assert await row_counts(engine) == before


async def test_oversized_body_is_413(api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine) -> None:
    """A body over the configured limit is a 413 problem and writes nothing."""
    conversation = await open_conversation(api, tenant.headers())
    before = await row_counts(engine)
    response = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "x" * 70_000}, headers=tenant.headers()
    )
    assert_problem(response, 413, "payload-too-large")
    assert await row_counts(engine) == before


async def test_malformed_json_is_400(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """A body that is not JSON is a 400 problem."""
    response = await api.post(
        "/v1/conversations", content=b"{nope", headers=tenant.headers() | {"content-type": "application/json"}
    )
    assert_problem(response, 400, "malformed-request")


async def test_other_tenants_conversations_do_not_exist(api: httpx.AsyncClient, new_tenant: NewTenant) -> None:
    """Every endpoint answers 404 for another tenant's conversation, and the conversation is untouched."""
    owner: Tenant = await new_tenant()
    intruder: Tenant = await new_tenant()
    conversation = await open_conversation(api, owner.headers())
    await take_turn(api, owner.headers(), conversation, "owner only")
    path = f"/v1/conversations/{conversation}"
    attempts = [
        api.get(path, headers=intruder.headers()),
        api.get(f"{path}/steps", headers=intruder.headers()),
        api.post(f"{path}/turns", json={"input": "let me in"}, headers=intruder.headers()),
        api.delete(path, headers=intruder.headers()),
    ]
    for attempt in attempts:
        assert_problem(await attempt, 404, "conversation-not-found")
    view = (await api.get(path, headers=owner.headers())).json()
    assert view["turn_count"] == 1
    assert view["step_count"] == 4


@pytest.mark.parametrize("role", ["auditor", "ops"])
async def test_other_roles_cannot_touch_conversations(api: httpx.AsyncClient, tenant: Tenant, role: str) -> None:
    """Auditor and ops keys get 403 on every conversation endpoint, even for their own tenant."""
    conversation = await open_conversation(api, tenant.headers())
    path = f"/v1/conversations/{conversation}"
    for response in (
        await api.get(path, headers=tenant.headers(role)),
        await api.get(f"{path}/steps", headers=tenant.headers(role)),
        await api.post(f"{path}/turns", json={"input": "hi"}, headers=tenant.headers(role)),
        await api.delete(path, headers=tenant.headers(role)),
        await api.post(
            "/v1/conversations", json={"route": "public-faq", "data_classes": ["public"]}, headers=tenant.headers(role)
        ),
    ):
        assert_problem(response, 403, "forbidden")


@pytest.mark.parametrize(
    "header",
    [None, "Basic abc", "Bearer nope", "Bearer cust_0000000000000000_secret", "Bearer cust_"],
)
async def test_missing_or_bad_keys_are_401(api: httpx.AsyncClient, header: str | None) -> None:
    """No key, a malformed key or an unknown key is a 401 problem with a WWW-Authenticate header."""
    headers = {"Authorization": header} if header else {}
    response = await api.get("/v1/conversations/conv_x", headers=headers)
    assert_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"].startswith("Bearer")


async def test_revoked_key_is_401(api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext) -> None:
    """A revoked key stops working at once."""
    from service.auth import parse_bearer
    from service.tenants import revoke_key

    key_id, _ = parse_bearer(tenant.headers()["Authorization"])
    async with ctx.sessions.begin() as session:
        await revoke_key(ctx.auditor, session, f"key_{key_id}", operator="test-suite", via="test")
    assert_problem(
        await api.post(
            "/v1/conversations", json={"route": "public-faq", "data_classes": ["public"]}, headers=tenant.headers()
        ),
        401,
        "unauthenticated",
    )


async def test_cursor_past_what_audit_records_can_hold_is_400(api: httpx.AsyncClient, tenant: Tenant) -> None:
    """A cursor beyond 2**53 - 1 is a 400 (it would otherwise break the audit record of the read)."""
    conversation = await open_conversation(api, tenant.headers())
    response = await api.get(
        f"/v1/conversations/{conversation}/steps", params={"cursor": 2**53 + 1}, headers=tenant.headers()
    )
    assert_problem(response, 400, "malformed-request")
    audit = await api.get("/v1/audit/events", params={"cursor": 2**63}, headers=tenant.headers("auditor"))
    assert_problem(audit, 400, "malformed-request")
