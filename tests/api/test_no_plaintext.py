"""Invariant 2: content never rests in plaintext, and never reaches logs or error bodies."""

from __future__ import annotations

import logging

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from ..conftest import CANARY, Tenant
from .helpers import open_conversation, take_turn


async def _dump_database(engine: AsyncEngine) -> str:
    """Every row of every table in the public schema, as text (bytea shows as hex)."""
    async with engine.connect() as connection:
        tables = (
            (await connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")))
            .scalars()
            .all()
        )
        parts: list[str] = []
        for table in tables:
            rows = (await connection.execute(text(f'SELECT t::text FROM "{table}" t'))).scalars().all()
            parts.extend(rows)
        return "\n".join(parts)


async def test_canary_never_rests_in_plaintext_or_reaches_logs(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    """A canary sent as a message, a subject, metadata and a tool result is in no table, log line or error body."""
    caplog.set_level(logging.DEBUG)
    conversation = await open_conversation(
        api,
        tenant.headers(),
        {
            "route": "billing-support",
            "data_classes": ["pan"],
            "subject": CANARY,
            "metadata": {"note": CANARY},
        },
    )
    await take_turn(api, tenant.headers(), conversation, f"my card is {CANARY}")
    asked = await take_turn(api, tenant.headers(), conversation, f'call open_dispute with {{"reason": "{CANARY}"}}')
    call = next(s for s in asked["steps"] if s["type"] == "function_call")
    assert call["arguments"] == {"reason": CANARY}  # the canary really went through the model
    await take_turn(
        api,
        tenant.headers(),
        conversation,
        [{"type": "function_result", "call_id": call["id"], "name": "open_dispute", "result": CANARY}],
        **{"Idempotency-Key": "canary-key"},
    )
    history = (await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())).text
    assert CANARY in history  # the owner can read it back...

    error_bodies = []
    for payload in (
        {"input": [{"type": "text", "text": CANARY, "unexpected": CANARY}]},
        {"input": [{"type": "function_result", "call_id": CANARY, "result": CANARY}]},
        {"input": [{"type": CANARY}]},
        {"input": CANARY, "unexpected": CANARY},
        {"input": {"type": "user_input", "content": CANARY}},
    ):
        response = await api.post(f"/v1/conversations/{conversation}/turns", json=payload, headers=tenant.headers())
        assert response.status_code >= 400
        error_bodies.append(response.text)
    bad_route = await api.post(
        "/v1/conversations", json={"route": CANARY, "data_classes": [CANARY]}, headers=tenant.headers()
    )
    error_bodies.append(bad_route.text)

    dump = await _dump_database(engine)
    assert dump, "the database dump is empty: the scan would prove nothing"
    assert conversation in dump  # ...but the database holds only ciphertext
    for needle in (CANARY, CANARY.encode().hex()):
        assert needle not in dump
    assert all(CANARY not in body for body in error_bodies)
    assert CANARY not in caplog.text
