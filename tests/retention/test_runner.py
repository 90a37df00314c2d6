"""The retention runner purges what is past its deadline, exactly once, and nothing held or kept."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sqlalchemy import text

from service.audit import SYSTEM_CHAIN
from service.conversations import receipt_valid
from service.legal_holds import place_hold
from service.retention import preview, run_retention
from service.simulator import FaultSpec, RunningSimulator

from ..api.helpers import assert_problem
from ..conftest import signer_of
from .conftest import RetentionService


async def _exists(retention: RetentionService, conversation: str) -> bool:
    async with retention.engine.connect() as connection:
        found = await connection.scalar(text("SELECT count(*) FROM conversations WHERE id = :c"), {"c": conversation})
    return bool(found)


async def _records(retention: RetentionService, pattern: dict[str, Any]) -> list[dict[str, Any]]:
    async with retention.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT record FROM audit_events WHERE record @> CAST(:p AS jsonb) ORDER BY chain, seq"),
            {"p": json.dumps(pattern)},
        )
        return [dict(row.record) for row in rows]


async def test_conversations_are_purged_when_their_deadline_passes(retention: RetentionService) -> None:
    """A public conversation goes after 7 days of silence, a phi one only after 180: each when its own rule says."""
    public = await retention.open("public-faq", ["public"])
    phi = await retention.open("patient-intake", ["phi"])
    await retention.turn(phi, "a cough")
    retention.advance_days(6)
    assert (await run_retention(retention.ctx, started_by="test")).purged == 0
    retention.advance_days(2)
    first = await run_retention(retention.ctx, started_by="test")
    assert first.purged == 1
    assert not await _exists(retention, public)
    assert await _exists(retention, phi)
    retention.advance_days(180)
    assert (await run_retention(retention.ctx, started_by="test")).purged == 1
    assert not await _exists(retention, phi)


async def test_the_dry_run_lists_why_and_changes_nothing(retention: RetentionService) -> None:
    """A dry run names each conversation it would purge with its rule, classes and deadline, and purges none."""
    public = await retention.open("public-faq", ["public"])
    retention.advance_days(8)
    listed = await preview(retention.ctx)
    assert [(c.conversation_id, c.delete_after, c.data_classes) for c in listed] == [(public, "P7D", ["public"])]
    summary = await run_retention(retention.ctx, started_by="test", dry_run=True)
    assert summary.purged == 0
    assert [c.conversation_id for c in summary.candidates] == [public]
    assert await _exists(retention, public)
    [record] = await _records(retention, {"action": "retention.run", "details": {"dry_run": True}})
    assert record["chain"] == SYSTEM_CHAIN
    assert record["details"]["would_purge"] == 1


async def test_a_held_conversation_is_neither_purged_nor_deleted(retention: RetentionService) -> None:
    """A legal hold keeps a conversation past its deadline, and deleting it is 409 naming the hold, until the hold goes."""
    public = await retention.open("public-faq", ["public"])
    principal = await _principal(retention)
    async with retention.ctx.sessions.begin() as session:
        hold = await place_hold(
            retention.ctx.auditor,
            session,
            principal,
            None,
            scope="conversation",
            conversation_id=public,
            reason="case 42",
        )
    retention.advance_days(8)
    assert (await run_retention(retention.ctx, started_by="test")).purged == 0
    refused = await retention.api.delete(f"/v1/conversations/{public}", headers=retention.tenant.headers())
    assert assert_problem(refused, 409, "legal-hold")["hold_id"] == hold.id
    assert await _exists(retention, public)


async def test_minimum_retention_blocks_deletion_with_the_date(retention: RetentionService) -> None:
    """Deleting a phi conversation before its 60 days is 409 with the date it becomes possible, and works after it."""
    phi = await retention.open("patient-intake", ["phi"])
    refused = await retention.api.delete(f"/v1/conversations/{phi}", headers=retention.tenant.headers())
    body = assert_problem(refused, 409, "minimum-retention")
    assert body["deletable_from"].endswith("Z")
    retention.advance_days(61)
    allowed = await retention.api.delete(f"/v1/conversations/{phi}", headers=retention.tenant.headers())
    assert allowed.status_code == 200, allowed.text


async def test_a_purge_destroys_the_provider_copies_and_signs_a_receipt(
    retention: RetentionService, gemini: RunningSimulator
) -> None:
    """A purged conversation's provider copies are gone from the provider, each deletion audited, and its receipt verifies."""
    public = await retention.open("public-faq", ["public"])
    await retention.turn(public, "opening hours?")
    copies = [r.response["id"] for r in gemini.app.create_requests()]
    assert copies
    assert all(c in gemini.app.store.ids() for c in copies)
    retention.advance_days(8)
    summary = await run_retention(retention.ctx, started_by="test")
    assert summary.purged == 1
    assert summary.provider_deleted == len(copies)
    assert not any(c in gemini.app.store.ids() for c in copies)
    async with retention.engine.connect() as connection:
        receipt = (
            await connection.execute(
                text("SELECT receipt FROM deletion_receipts WHERE id = :i"), {"i": summary.receipts[0]}
            )
        ).scalar_one()
    assert receipt_valid(receipt, signer_of(retention.ctx).public_key)
    [destroyed] = receipt["payload"]["destroyed"]
    assert destroyed["conversation_id"] == public
    assert destroyed["provider_copies_deleted"] == copies
    purge = await _records(retention, {"action": "retention.purge", "resource": {"id": public}})
    assert len(purge) == 1
    assert purge[0]["seq"] in destroyed["audit_seqs"]


async def test_failed_provider_deletions_stay_pending_and_are_retried(
    retention: RetentionService, gemini: RunningSimulator
) -> None:
    """A copy whose deletion keeps failing stays pending (counted, with its age) and the next run deletes it."""
    doomed = await retention.open("public-faq", ["public"])
    await retention.turn(doomed, "first")
    doomed_copy = gemini.app.create_requests()[-1].response["id"]
    retention.advance_days(8)
    gemini.app.inject(FaultSpec(status=500, count=2))  # at the purge, and at the same run's retry
    first = await run_retention(retention.ctx, started_by="test")
    assert (first.purged, first.provider_failed, first.provider_pending) == (1, 2, 1)
    assert first.oldest_pending_seconds is not None
    assert first.oldest_pending_seconds > 7 * 86400
    assert doomed_copy in gemini.app.store.ids()
    second = await run_retention(retention.ctx, started_by="test")
    assert (second.provider_deleted, second.provider_pending) == (1, 0)
    assert doomed_copy not in gemini.app.store.ids()


async def test_copies_past_the_provider_ttl_go_while_the_conversation_lives(
    retention: RetentionService, gemini: RunningSimulator
) -> None:
    """A provider copy older than its route's provider_ttl (one hour) is deleted although its conversation stays."""
    living = await retention.open("public-faq", ["public"])
    await retention.turn(living, "second")
    living_copy = gemini.app.create_requests()[-1].response["id"]
    retention.advance_days(0.5 / 24)
    assert (await run_retention(retention.ctx, started_by="test")).provider_deleted == 0
    retention.advance_days(1 / 24)
    summary = await run_retention(retention.ctx, started_by="test")
    assert (summary.purged, summary.provider_deleted) == (0, 1)
    assert living_copy not in gemini.app.store.ids()
    assert await _exists(retention, living)


async def test_two_runners_purge_each_conversation_exactly_once(retention: RetentionService) -> None:
    """Two runners started together over 120 due conversations purge each exactly once (one retention.purge record each)."""
    opened = [await retention.open("public-faq", ["public"]) for _ in range(120)]
    retention.advance_days(8)
    first, second = await asyncio.gather(
        run_retention(retention.ctx, started_by="runner-a"), run_retention(retention.ctx, started_by="runner-b")
    )
    assert first.purged + second.purged == len(opened)
    purges = await _records(retention, {"action": "retention.purge"})
    assert sorted(r["resource"]["id"] for r in purges) == sorted(opened)


async def test_a_run_is_one_trace_with_one_child_per_purge(retention: RetentionService, spans: Any) -> None:
    """The run's spans form one trace: the custody.retention.run root, and a child per purge and per provider-copy deletion."""
    for _ in range(3):
        await retention.turn(await retention.open("public-faq", ["public"]), "hi")
    retention.advance_days(8)
    spans.clear()
    await run_retention(retention.ctx, started_by="test")
    finished = spans.get_finished_spans()
    [root] = [s for s in finished if s.name == "custody.retention.run"]
    assert root.parent is None
    in_trace = [s for s in finished if s.context.trace_id == root.context.trace_id and s is not root]
    purges = [s for s in in_trace if s.name == "custody.retention.purge"]
    deletions = [s for s in in_trace if s.name == "custody.upstream.delete"]
    assert len(purges) == 3
    assert len(deletions) == 3
    assert all(s.parent is not None and s.parent.span_id == root.context.span_id for s in purges + deletions)
    assert all(key.startswith("custody.") for s in [root, *purges] for key in (s.attributes or {}))


async def _principal(retention: RetentionService) -> Any:
    from service.auth import authenticate

    async with retention.ctx.sessions() as session:
        return await authenticate(session, retention.ctx.pepper, retention.tenant.headers("ops")["Authorization"])
