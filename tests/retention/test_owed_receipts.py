"""A deletion whose process stops between destroying a conversation and signing its receipt leaves the receipt owed; a retention run signs it once the dead process's hold lapses, never before."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from sqlalchemy import text

from service.auth import authenticate
from service.conversations import erase_owned, owing_receipt, receipt_valid
from service.retention import run_retention
from service.simulator import RunningSimulator

from ..conftest import signer_of
from .conftest import RetentionService

LEASE_SECONDS = 3.0  # the shortest lease the settings allow: the dead process's hold lapses soon


async def owed_receipts(retention: RetentionService) -> list[tuple[str, bool]]:
    async with retention.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT id, held_until < now() FROM deletion_receipts WHERE receipt IS NULL")
        )
        return [(row[0], bool(row[1])) for row in rows]


async def test_a_deletion_stopped_before_its_receipt_is_signed_by_a_run_once_its_hold_lapses(
    retention: RetentionService, gemini: RunningSimulator
) -> None:
    """A backend deletion that stopped after the erase owes its receipt; a run while the hold is live leaves it alone, a run after it lapsed deletes the provider copy left behind and signs the receipt, marked recovered, naming the erase record and the deletion."""
    ctx = dataclasses.replace(retention.ctx, turn_lease_seconds=LEASE_SECONDS)
    conversation = await retention.open("public-faq", ["public"])
    await retention.turn(conversation, "opening hours?")
    [copy] = [r.response["id"] for r in gemini.app.create_requests()]
    async with ctx.sessions() as session:
        principal = await authenticate(session, ctx.pepper, retention.tenant.headers()["Authorization"])

    # What a deleting process does up to its crash: the erase (and the owed receipt) commit, and
    # it stops before asking for the provider copy or signing; nothing renews its hold after that.
    async with owing_receipt(ctx, tenant_id=principal.tenant_id, chain=principal.tenant_id, cause="deletion") as owed:
        erased = await erase_owned(ctx, principal, None, conversation, owed)
    assert erased.provider_copies == [copy]
    [(receipt_id, lapsed)] = await owed_receipts(retention)
    assert not lapsed

    early = await run_retention(ctx, started_by="test")
    assert early.receipts_recovered == 0
    assert await owed_receipts(retention) == [(receipt_id, False)]

    deadline = time.monotonic() + 30
    while not (await owed_receipts(retention))[0][1]:
        assert time.monotonic() < deadline, "the hold never lapsed"
        await asyncio.sleep(0.2)
    gemini.app.reset()
    late = await run_retention(ctx, started_by="test")
    assert (late.receipts_recovered, late.receipts) == (1, [receipt_id])
    assert await owed_receipts(retention) == []
    assert copy not in gemini.app.store.ids()
    async with retention.engine.connect() as connection:
        receipt = (
            await connection.execute(text("SELECT receipt FROM deletion_receipts WHERE id = :i"), {"i": receipt_id})
        ).scalar_one()
        items = (await connection.execute(text("SELECT count(*) FROM receipt_items"))).scalar_one()
        seqs: dict[str, int] = dict(
            (
                await connection.execute(
                    text(
                        "SELECT record->>'action', seq FROM audit_events WHERE chain = :t AND"
                        " record->>'action' IN ('conversation.delete', 'upstream.delete')"
                    ),
                    {"t": principal.tenant_id},
                )
            ).all()
        )
    assert receipt_valid(receipt, signer_of(ctx).public_key)
    payload = receipt["payload"]
    assert (payload["cause"], payload["recovered"]) == ("deletion", True)
    [destroyed] = payload["destroyed"]
    assert (destroyed["conversation_id"], destroyed["provider_copies_deleted"]) == (conversation, [copy])
    assert destroyed["provider_copies_pending"] == []
    assert destroyed["audit_seqs"] == [seqs["conversation.delete"], seqs["upstream.delete"]]
    assert items == 0  # the signed receipt replaces its items
