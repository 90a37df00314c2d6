"""Small helpers shared by the API tests."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

PHI_ROUTE = {"route": "patient-intake", "data_classes": ["phi"]}


async def open_conversation(api: httpx.AsyncClient, headers: dict[str, str], body: dict[str, Any] | None = None) -> str:
    response = await api.post("/v1/conversations", json=body or PHI_ROUTE, headers=headers)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


async def take_turn(
    api: httpx.AsyncClient,
    headers: dict[str, str],
    conversation_id: str,
    data: Any,
    **extra_headers: str,
) -> dict[str, Any]:
    response = await api.post(
        f"/v1/conversations/{conversation_id}/turns", json={"input": data}, headers=headers | extra_headers
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


async def row_counts(engine: AsyncEngine) -> dict[str, int]:
    """Rows per table, to show that a refused request changed nothing."""
    async with engine.connect() as connection:
        counts = {}
        for table in (
            "tenants",
            "api_keys",
            "conversations",
            "data_keys",
            "turns",
            "steps",
            "idempotency_records",
            "upstream_interactions",
        ):
            counts[table] = int((await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one())
        return counts


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = dict(response.json())
    assert body["type"] == f"urn:custody:problem:{slug}", body
    assert body["status"] == status
    assert body["title"]
    assert body["detail"]
    return body
