"""A policy change moves stored deadlines: recomputed in batches, each batch audited, and the runner follows the new rules."""

from __future__ import annotations

import copy
import dataclasses
import json
from typing import Any

from sqlalchemy import text

from service.audit import SYSTEM_CHAIN
from service.context import ServiceContext
from service.conversations import recompute_deadlines
from service.policy import parse_policy
from service.retention import preview, run_retention

from .conftest import RetentionService, retention_policy_document


def changed_policy(retention: RetentionService, change: dict[str, dict[str, Any]]) -> ServiceContext:
    """The service's context under the retention test policy with `change` applied to the data classes' rules."""
    document = copy.deepcopy(retention_policy_document())
    for name, rule in change.items():
        document["data_classes"][name]["retention"] = rule
    policy = parse_policy(document, source="changed policy")
    assert policy.version != retention.ctx.policy.version
    return dataclasses.replace(retention.ctx, policy=policy)


async def deadlines(retention: RetentionService) -> dict[str, tuple[str | None, str | None, bool, str]]:
    """Per conversation: (delete_after, keep_at_least, has a purge_at, the policy version its rule came from)."""
    async with retention.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT id, delete_after, keep_at_least, purge_at, retention_policy_version FROM conversations")
        )
        return {
            r.id: (r.delete_after, r.keep_at_least, r.purge_at is not None, r.retention_policy_version) for r in rows
        }


async def recompute_records(retention: RetentionService) -> list[dict[str, Any]]:
    async with retention.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT record FROM audit_events WHERE record @> CAST(:p AS jsonb) ORDER BY chain, seq"),
            {"p": json.dumps({"action": "retention.recompute"})},
        )
        return [dict(row.record) for row in rows]


async def test_a_policy_change_is_recomputed_in_audited_batches(retention: RetentionService) -> None:
    """Eight conversations recomputed three at a time give three batches, each with its own retention.recompute record naming the new policy."""
    public = [await retention.open("public-faq", ["public"]) for _ in range(7)]
    phi = await retention.open("patient-intake", ["phi"])
    before = await deadlines(retention)
    assert {before[c][:2] for c in public} == {("P7D", None)}
    assert before[phi][:2] == ("P180D", "P60D")
    assert await recompute_records(retention) == []

    changed = changed_policy(retention, {"public": {"delete_after": "P1D"}, "phi": {"keep_at_least": "P60D"}})
    assert await recompute_deadlines(changed, batch=3) == 8
    records = await recompute_records(retention)
    assert [r["details"]["conversations"] for r in records] == [3, 3, 2]
    assert {r["policy_version"] for r in records} == {changed.policy.version}
    assert {r["chain"] for r in records} == {SYSTEM_CHAIN}
    assert {r["outcome"] for r in records} == {"success"}
    after = await deadlines(retention)
    # public-faq's route still says P7D, but the class's P1D is stricter; phi falls back to the
    # route's P180D now that the class states no delete_after of its own.
    assert {after[c] for c in public} == {("P1D", None, True, changed.policy.version)}
    assert after[phi] == ("P180D", "P60D", True, changed.policy.version)

    assert await recompute_deadlines(changed, batch=3) == 0
    assert len(await recompute_records(retention)) == 3


async def test_conversations_move_with_the_new_deadlines(retention: RetentionService) -> None:
    """After a policy shortens public's rule to a day and extends phi's to a keep with no delete_after, the runner purges public early and phi never."""
    public = [await retention.open("public-faq", ["public"]) for _ in range(3)]
    phi = await retention.open("patient-intake", ["phi"])
    document = copy.deepcopy(retention_policy_document())
    document["data_classes"]["public"]["retention"] = {"delete_after": "P1D"}
    document["data_classes"]["phi"]["retention"] = {"keep_at_least": "P60D"}
    del document["routes"]["patient-intake"]["retention"]
    changed = dataclasses.replace(retention.ctx, policy=parse_policy(document, source="changed policy"))

    retention.advance_days(2)
    assert (await run_retention(retention.ctx, started_by="test", dry_run=True)).candidates == []
    run = await run_retention(changed, started_by="test")
    assert run.recomputed == 4
    assert run.purged == 3
    remaining = await deadlines(retention)
    assert set(remaining) == {phi}
    assert not set(public) & set(remaining)
    assert remaining[phi] == (None, "P60D", False, changed.policy.version)
    retention.advance_days(100 * 365)
    assert (await run_retention(changed, started_by="test")).purged == 0
    assert set(await deadlines(retention)) == {phi}


async def test_a_longer_rule_keeps_conversations_past_their_old_deadline(retention: RetentionService) -> None:
    """When the policy extends public's rule from 7 to 30 days, the conversations the old rule would purge on day 8 stay until day 31."""
    public = [await retention.open("public-faq", ["public"]) for _ in range(3)]
    document = copy.deepcopy(retention_policy_document())
    document["data_classes"]["public"]["retention"] = {"delete_after": "P30D"}
    document["routes"]["public-faq"]["retention"] = {"provider_ttl": "PT1H"}
    longer = dataclasses.replace(retention.ctx, policy=parse_policy(document, source="longer policy"))
    retention.advance_days(8)
    assert sorted(c.conversation_id for c in await preview(retention.ctx)) == sorted(public)
    first = await run_retention(longer, started_by="test")
    assert (first.recomputed, first.purged) == (3, 0)
    assert set(await deadlines(retention)) == set(public)
    retention.advance_days(23)
    assert (await run_retention(longer, started_by="test")).purged == 3
    assert await deadlines(retention) == {}
