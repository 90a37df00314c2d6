"""Helpers for the tests that interrupt a turn while its model call is in flight."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.simulator import RunningSimulator

from ..conftest import Tenant

FAQ = {"route": "public-faq", "data_classes": ["public"]}  # provider storage allowed
PHI = {"route": "patient-intake", "data_classes": ["phi"]}  # store=false
IDEMPOTENCY_KEY = "Idempotency-Key"


async def wait_until(check: Callable[[], Any], *, what: str, within: float = 15.0) -> None:
    """Poll `check` (sync or async) until it is true; fail naming `what` after `within` seconds.
    A bounded wait for a state, never an assertion about how long something took."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() >= deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(0.02)


async def model_called(gemini: RunningSimulator, creates: int) -> None:
    """Until the simulator has received `creates` create requests: the turn that sent the last
    one has claimed its conversation (the claim commits before the model call) and now waits."""
    await wait_until(lambda: len(gemini.app.creates()) >= creates, what=f"{creates} model call(s) arrived")


async def post_turn(
    api: httpx.AsyncClient, tenant: Tenant, conversation: str, data: Any, key: str | None = None
) -> httpx.Response:
    """A turn request, answered however it is (take_turn insists on 200)."""
    headers = tenant.headers() | ({IDEMPOTENCY_KEY: key} if key else {})
    return await api.post(f"/v1/conversations/{conversation}/turns", json={"input": data}, headers=headers)


async def expire_lease(engine: AsyncEngine, conversation: str) -> str:
    """Make the running turn's lease run out, as it does when its holder stops renewing it (a
    replica that died or lost the database): the token stays, its expiry moves into the past."""
    async with engine.begin() as connection:
        token = (
            await connection.execute(
                text(
                    "UPDATE conversations SET lease_expires_at = now() - interval '1 second' "
                    "WHERE id = :c AND lease_token IS NOT NULL RETURNING lease_token"
                ),
                {"c": conversation},
            )
        ).scalar_one()
    return str(token)


async def turns(engine: AsyncEngine, conversation: str) -> list[tuple[Any, ...]]:
    """(number, status, error_code) of each turn, in order."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT number, status, error_code FROM turns WHERE conversation_id = :c ORDER BY number"),
            {"c": conversation},
        )
        return [tuple(row) for row in rows]


async def turn_ids(engine: AsyncEngine, conversation: str) -> dict[int, str]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT number, id FROM turns WHERE conversation_id = :c"), {"c": conversation}
        )
        return {row.number: row.id for row in rows}


async def conversation_row(engine: AsyncEngine, conversation: str) -> dict[str, Any] | None:
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text("SELECT lease_token, lease_expires_at, turn_count, step_count FROM conversations WHERE id = :c"),
                {"c": conversation},
            )
        ).first()
    return None if row is None else dict(row._mapping)


async def ledger(engine: AsyncEngine, conversation: str) -> list[dict[str, Any]]:
    """The conversation's rows in the ledger of provider copies, oldest first."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT id, turn_id, stored, deleted_at, delete_attempts, last_error FROM upstream_interactions "
                "WHERE conversation_id = :c ORDER BY created_at, id"
            ),
            {"c": conversation},
        )
        return [dict(row._mapping) for row in rows]


async def idempotency_rows(engine: AsyncEngine, *conversations: str) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT conversation_id, turn_id, response IS NOT NULL AS answered FROM idempotency_records "
                "WHERE conversation_id = ANY(:c)"
            ),
            {"c": list(conversations)},
        )
        return [dict(row._mapping) for row in rows]


async def audit(api: httpx.AsyncClient, tenant: Tenant, **params: str) -> list[dict[str, Any]]:
    """The tenant's audit records matching `params`, oldest first."""
    response = await api.get("/v1/audit/events", params=params | {"limit": "1000"}, headers=tenant.headers("auditor"))
    assert response.status_code == 200, response.text
    return list(response.json()["events"])


def outcomes(events: list[dict[str, Any]]) -> list[tuple[str, str, str | None]]:
    return [(e["action"], e["outcome"], e["reason"]) for e in events]


async def history(api: httpx.AsyncClient, tenant: Tenant, conversation: str) -> list[dict[str, Any]]:
    """Every stored step, as the API returns them (position, turn_id, step)."""
    response = await api.get(
        f"/v1/conversations/{conversation}/steps", params={"limit": "500"}, headers=tenant.headers()
    )
    assert response.status_code == 200, response.text
    return list(response.json()["steps"])


def user_texts(steps: list[dict[str, Any]]) -> list[str]:
    """The text of each stored user_input step, in order."""
    return [
        "".join(block.get("text", "") for block in s["step"]["content"])
        for s in steps
        if s["step"]["type"] == "user_input"
    ]
