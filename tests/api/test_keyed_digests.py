"""Nothing derived from a client's content or headers can be reversed from the database."""

from __future__ import annotations

import hashlib
import json

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.conversations import encode_json
from service.keyed_digests import canonical_json

from ..conftest import NewTenant, Tenant
from .helpers import assert_problem, open_conversation, take_turn

CARD = "4556735267909704"


async def test_idempotency_records_hold_no_recoverable_key_or_input(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine
) -> None:
    """A turn whose input is a card number leaves an Idempotency-Key record from which neither the key nor the card number can be brute-forced."""
    conversation = await open_conversation(api, tenant.headers(), {"route": "billing-support", "data_classes": ["pan"]})
    key = f"pay-{CARD}"
    await take_turn(api, tenant.headers(), conversation, CARD, **{"Idempotency-Key": key})
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT key, fingerprint, idempotency_records::text AS everything FROM idempotency_records WHERE conversation_id = :c"
                ),
                {"c": conversation},
            )
        ).one()
    assert CARD not in row.everything
    assert key not in row.everything
    steps = [{"type": "user_input", "content": [{"type": "text", "text": CARD}]}]
    # What an attacker with the database would try: the unkeyed digests of each candidate input.
    candidates = {
        hashlib.sha256(encode_json([conversation, steps])).hexdigest(),
        hashlib.sha256(canonical_json([conversation, steps])).hexdigest(),
        hashlib.sha256(key.encode()).hexdigest(),
    }
    assert row.fingerprint not in candidates
    assert row.key not in candidates
    assert len(row.key) == 64
    assert len(row.fingerprint) == 64


async def test_same_input_with_keys_in_another_order_is_the_same_request(
    api: httpx.AsyncClient, tenant: Tenant
) -> None:
    """Repeating a key with the same input spelt differently (key order, `1.0` for `1`) replays the turn instead of a 422."""
    conversation = await open_conversation(api, tenant.headers())
    first_body = '{"input": [{"type": "text", "text": "dose 1.0 mg"}]}'
    again_body = '{"input": [{"text": "dose 1.0 mg", "type": "text"}]}'
    headers = tenant.headers() | {"Idempotency-Key": "reordered", "content-type": "application/json"}
    first = await api.post(f"/v1/conversations/{conversation}/turns", content=first_body, headers=headers)
    again = await api.post(f"/v1/conversations/{conversation}/turns", content=again_body, headers=headers)
    assert first.status_code == again.status_code == 200, again.text
    assert first.json() == again.json()
    other = await api.post(
        f"/v1/conversations/{conversation}/turns", content=json.dumps({"input": "dose 2 mg"}), headers=headers
    )
    assert_problem(other, 422, "idempotency-key-reused")


async def test_a_key_is_scoped_to_its_tenant(api: httpx.AsyncClient, new_tenant: NewTenant) -> None:
    """Two tenants using the same Idempotency-Key never see each other's turns."""
    first: Tenant = await new_tenant()
    second: Tenant = await new_tenant()
    a = await open_conversation(api, first.headers())
    b = await open_conversation(api, second.headers())
    one = await take_turn(api, first.headers(), a, "hello", **{"Idempotency-Key": "shared"})
    two = await take_turn(api, second.headers(), b, "hello", **{"Idempotency-Key": "shared"})
    assert one["conversation_id"] == a
    assert two["conversation_id"] == b


def test_canonical_json_keeps_integers_past_two_to_the_53() -> None:
    """Integers RFC 8785 cannot hold exactly still canonicalise, and two different ones stay different."""
    big = 2**64 + 1
    assert canonical_json({"b": big, "a": 1.0}) == canonical_json({"a": 1, "b": big})
    assert canonical_json([big]) != canonical_json([big + 1])
