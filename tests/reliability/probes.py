"""Reading back what the service stored, over HTTP and straight from the database, to check it."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import httpx

__all__ = ["audit_records", "history", "turn_rows", "user_texts"]


async def history(
    http: httpx.AsyncClient, base: str, headers: dict[str, str], conversation: str
) -> list[dict[str, Any]]:
    """A conversation's whole history, page by page, through the API."""
    steps: list[dict[str, Any]] = []
    cursor: int | None = 0
    while cursor is not None:
        response = await http.get(
            f"{base}/v1/conversations/{conversation}/steps", headers=headers, params={"cursor": cursor, "limit": 500}
        )
        assert response.status_code == 200, response.text
        page = response.json()
        steps.extend(page["steps"])
        cursor = page["next_cursor"]
    return steps


def user_texts(steps: list[dict[str, Any]]) -> list[str]:
    """The text of every user input in the history, in order."""
    return [s["step"]["content"][0]["text"] for s in steps if s["step"]["type"] == "user_input"]


async def turn_rows(database_url: str, conversation: str) -> list[dict[str, Any]]:
    """The conversation's turn rows (outcome and accounting only), by number."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT id, number, status, error_code FROM turns WHERE conversation_id = $1 ORDER BY number",
            conversation,
        )
    finally:
        await connection.close()
    return [dict(row) for row in rows]


async def audit_records(database_url: str, pattern: dict[str, Any]) -> list[dict[str, Any]]:
    """Audit records containing `pattern` (JSON containment), oldest first."""
    connection = await asyncpg.connect(database_url)
    try:
        rows = await connection.fetch(
            "SELECT record::text FROM audit_events WHERE record @> $1::jsonb ORDER BY chain, seq", json.dumps(pattern)
        )
    finally:
        await connection.close()
    return [json.loads(row[0]) for row in rows]
