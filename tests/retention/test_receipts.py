"""Deleting a conversation answers with a receipt signed by the audit key, which verifies offline and fails when one byte changes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.audit import load_public_key
from service.context import ServiceContext
from service.conversations import receipt_valid

from ..api.helpers import open_conversation, take_turn
from ..conftest import Tenant, signer_of


async def test_a_deletion_answers_with_a_receipt_that_names_what_was_destroyed(
    api: httpx.AsyncClient, tenant: Tenant, engine: AsyncEngine, ctx: ServiceContext
) -> None:
    """The receipt names the conversation, its step count, its data key's KEK version and the audit record of the deletion, and is kept."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    response = await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())
    assert response.status_code == 200, response.text
    receipt = response.json()
    payload = receipt["payload"]
    assert payload["cause"] == "deletion"
    [destroyed] = payload["destroyed"]
    assert destroyed["conversation_id"] == conversation
    assert destroyed["step_count"] == 4  # the input, then the thought, the trace step and the answer
    assert destroyed["data_key_version"] == 1
    events = (
        await api.get(
            "/v1/audit/events",
            params={"resource": conversation, "action": "conversation.delete"},
            headers=tenant.headers("auditor"),
        )
    ).json()["events"]
    assert destroyed["audit_seqs"] == [events[0]["seq"]]
    assert receipt_valid(receipt, signer_of(ctx).public_key)
    async with engine.connect() as connection:
        kept = (
            await connection.execute(
                text("SELECT receipt FROM deletion_receipts WHERE id = :i"), {"i": payload["receipt_id"]}
            )
        ).scalar_one()
    assert kept == receipt


async def test_a_receipt_verifies_offline_and_one_changed_byte_fails(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext, tmp_path: Path
) -> None:
    """`custody receipts verify` accepts the receipt as answered and refuses it after one byte of it changes."""
    conversation = await open_conversation(api, tenant.headers())
    receipt = (await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())).json()
    key = tmp_path / "audit.pub.pem"
    key.write_text(signer_of(ctx).public_pem())
    good = tmp_path / "receipt.json"
    good.write_text(json.dumps(receipt))
    edited = tmp_path / "edited.json"
    edited.write_text(
        json.dumps(receipt).replace(conversation, conversation[:-1] + ("0" if conversation[-1] != "0" else "1"))
    )

    def verify(path: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service", "receipts", "verify", str(path), "--public-key", str(key)],
            capture_output=True,
            text=True,
            timeout=60,
        )

    accepted = verify(good)
    assert accepted.returncode == 0, accepted.stderr
    assert "valid receipt" in accepted.stdout
    refused = verify(edited)
    assert refused.returncode == 1
    assert "NOT VALID" in refused.stdout
    assert not receipt_valid(json.loads(edited.read_text()), load_public_key(key.read_bytes()))
