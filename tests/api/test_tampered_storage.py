"""A tampered ciphertext is refused on read with a clear problem and an audit record, never served or a bare 500."""

from __future__ import annotations

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ..conftest import Tenant
from .helpers import assert_problem, open_conversation, take_turn


async def test_a_flipped_bit_in_a_stored_step_is_refused_and_audited(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine
) -> None:
    """One flipped bit in a stored step makes the history read and the next turn answer stored-data-unreadable, each with an error audit record."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    async with engine.begin() as connection:
        await connection.execute(
            text(
                "UPDATE steps SET sealed = set_byte(sealed, 20, get_byte(sealed, 20) # 1) "
                "WHERE conversation_id = :c AND position = 0"
            ),
            {"c": conversation},
        )
    history = await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())
    body = assert_problem(history, 500, "stored-data-unreadable")
    assert "hello" not in history.text
    assert "audited" in body["detail"]
    turn = await api.post(f"/v1/conversations/{conversation}/turns", json={"input": "again"}, headers=tenant.headers())
    assert_problem(turn, 500, "stored-data-unreadable")
    events = (
        await api.get("/v1/audit/events", params={"resource": conversation}, headers=tenant.headers("auditor"))
    ).json()["events"]
    refused = [(e["action"], e["outcome"], e["reason"]) for e in events if e["outcome"] != "success"]
    assert refused == [("history.read", "error", "decryption"), ("turn.start", "error", "decryption")]
