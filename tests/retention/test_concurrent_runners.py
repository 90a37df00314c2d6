"""Runners started together share the due conversations: each is purged exactly once, with one record and one receipt."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from typing import Any

from sqlalchemy import text

from service.audit import RequestMeta
from service.auth import Principal, authenticate
from service.conversations import open_conversation
from service.retention import run_retention
from service.simulator import FaultSpec, RunningSimulator

from .conftest import RetentionService

CONVERSATIONS = 1000


async def backend_principal(retention: RetentionService) -> Principal:
    async with retention.ctx.sessions() as session:
        return await authenticate(session, retention.ctx.pepper, retention.tenant.headers()["Authorization"])


async def open_many(
    retention: RetentionService, count: int, route: str = "public-faq", classes: tuple[str, ...] = ("public",)
) -> list[str]:
    """`count` conversations opened through the service's own open path (audited, a data key each), without HTTP."""
    principal = await backend_principal(retention)
    meta = RequestMeta(address=None, request_id=None)
    opened = []
    for _ in range(count):
        view = await open_conversation(
            retention.ctx, principal, meta, route=route, data_classes=list(classes), subject=None, metadata=None
        )
        opened.append(view.id)
    return opened


async def records(retention: RetentionService, action: str) -> list[dict[str, Any]]:
    async with retention.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT record FROM audit_events WHERE record @> CAST(:p AS jsonb) ORDER BY chain, seq"),
            {"p": json.dumps({"action": action})},
        )
        return [dict(row.record) for row in rows]


async def test_two_runners_over_a_thousand_conversations_purge_each_exactly_once(retention: RetentionService) -> None:
    """Two runners started at once over 1,000 due conversations write exactly one retention.purge record and one receipt per conversation, and leave none of them."""
    started = time.monotonic()
    opened = await open_many(retention, CONVERSATIONS)
    seeded = time.monotonic() - started
    retention.advance_days(8)
    first, second = await asyncio.gather(
        run_retention(retention.ctx, started_by="runner-a"), run_retention(retention.ctx, started_by="runner-b")
    )
    print(
        f"seeded {CONVERSATIONS} in {seeded:.1f} s; runner a purged {first.purged} (skipped {first.skipped}), "
        f"runner b purged {second.purged} (skipped {second.skipped})"
    )
    assert first.failed == second.failed == 0
    assert first.purged + second.purged == CONVERSATIONS

    purges = await records(retention, "retention.purge")
    per_conversation = Counter(r["resource"]["id"] for r in purges)
    assert set(per_conversation) == set(opened)
    assert set(per_conversation.values()) == {1}
    assert {r["outcome"] for r in purges} == {"success"}
    assert {r["details"]["run_id"] for r in purges} <= {first.run_id, second.run_id}

    async with retention.engine.connect() as connection:
        receipts = (await connection.execute(text("SELECT receipt FROM deletion_receipts"))).scalars().all()
        left = {
            table: (await connection.execute(text(f"SELECT count(*) FROM {table}"))).scalar_one()
            for table in ("conversations", "data_keys", "steps", "turns")
        }
    receipted = Counter(d["conversation_id"] for r in receipts for d in r["payload"]["destroyed"])
    assert set(receipted) == set(opened)
    assert set(receipted.values()) == {1}
    assert sorted([*first.receipts, *second.receipts]) == sorted(r["payload"]["receipt_id"] for r in receipts)
    assert left == {"conversations": 0, "data_keys": 0, "steps": 0, "turns": 0}

    runs = await records(retention, "retention.run")
    assert sorted(r["details"]["started_by"] for r in runs) == ["runner-a", "runner-b"]
    assert sum(r["details"]["purged"] for r in runs) == CONVERSATIONS


async def test_two_runners_ask_the_provider_to_delete_each_copy_once(
    retention: RetentionService, gemini: RunningSimulator
) -> None:
    """Two runners started at once over forty due conversations with a provider copy each send one DELETE per copy between them, each with one upstream.delete record: neither sweeps up the copies the other is deleting."""
    opened = []
    for index in range(40):
        conversation = await retention.open("public-faq", ["public"])
        await retention.turn(conversation, f"opening hours, question {index}?")
        opened.append(conversation)
    copies = [r.response["id"] for r in gemini.app.create_requests()]
    assert len(copies) == len(opened)
    gemini.app.reset()
    # Slow deletions, so that one runner reaches its sweep while the other's are still in flight.
    gemini.app.inject(FaultSpec(latency_ms=100, count=len(copies)))
    retention.advance_days(8)
    first, second = await asyncio.gather(
        run_retention(retention.ctx, started_by="runner-a"), run_retention(retention.ctx, started_by="runner-b")
    )
    assert first.purged + second.purged == len(opened)
    deletes = Counter(r.path.rsplit("/", 1)[-1] for r in gemini.app.requests if r.method == "DELETE")
    assert deletes == Counter(copies)
    recorded = Counter(r["resource"]["id"] for r in await records(retention, "upstream.delete"))
    assert recorded == Counter(copies)
    assert first.provider_deleted + second.provider_deleted == len(copies)
