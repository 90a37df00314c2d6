"""A conversation's retention deadlines, computed by the database from the rule that governs it.

The rule (see service.retention_rules) is stored on the conversation with the policy version it
came from, so the runner compares two timestamps per row instead of re-deriving rules; the
deadlines are Postgres interval arithmetic, calendar-correct. A policy change is found by the
version and recomputed in batches, each batch audited (`retention.recompute`).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import String, bindparam, case, cast, func, select, update
from sqlalchemy.dialects.postgresql import INTERVAL
from sqlalchemy.sql.elements import ColumnElement

from ..audit import SYSTEM_CHAIN, AuditEntry
from ..context import ServiceContext
from ..models import Conversation
from ..retention_rules import RetentionRule
from ._data_keys import align_data_keys

__all__ = ["interval", "last_activity_deadline", "recompute_deadlines", "rule_values"]

_BATCH = 1000


def interval(iso: str) -> ColumnElement[Any]:
    """An ISO 8601 duration as a Postgres interval (sent as text: the driver would want a
    timedelta for an interval parameter, and a timedelta cannot hold calendar months)."""
    return cast(bindparam(None, iso, type_=String), INTERVAL)


def rule_values(
    rule: RetentionRule,
    policy_version: str,
    *,
    created: ColumnElement[Any] | None = None,
    last_activity: ColumnElement[Any] | None = None,
) -> dict[str, Any]:
    """Column values for a conversation governed by `rule`, as SQL on its creation and last
    activity: the row's own columns by default (an UPDATE), or given expressions (an INSERT, where
    both are now())."""
    start: Any = Conversation.created_at if created is None else created
    last: Any = Conversation.updated_at if last_activity is None else last_activity
    keep = interval(rule.keep_at_least.iso) if rule.keep_at_least else None
    keep_until = start + keep if keep is not None else None
    delete = interval(rule.delete_after.iso) if rule.delete_after else None
    purge_at: ColumnElement[Any] | None = None
    if delete is not None:
        purge_at = last + delete if keep_until is None else func.greatest(last + delete, keep_until)
    return {
        "delete_after": rule.delete_after.iso if rule.delete_after else None,
        "keep_at_least": rule.keep_at_least.iso if rule.keep_at_least else None,
        "keep_until": keep_until,
        "purge_at": purge_at,
        "retention_policy_version": policy_version,
    }


def last_activity_deadline() -> ColumnElement[Any]:
    """`purge_at` after activity now: the stored rule, counted from now() (NULL: never)."""
    return case(
        (Conversation.delete_after.is_(None), None),
        else_=func.greatest(func.now() + cast(Conversation.delete_after, INTERVAL), Conversation.keep_until),
    )


async def recompute_deadlines(ctx: ServiceContext, *, batch: int = _BATCH) -> int:
    """Bring every conversation derived under another policy version to the current one; returns
    how many changed. Rows locked by a running turn are skipped and caught by the next call."""
    version, total = ctx.policy.version, 0
    while True:
        async with ctx.sessions.begin() as session:
            rows = (
                await session.execute(
                    select(Conversation.id, Conversation.route, Conversation.data_classes)
                    .where(Conversation.retention_policy_version != version)
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return total
            groups: dict[tuple[str, tuple[str, ...]], list[str]] = defaultdict(list)
            for conversation_id, route, data_classes in rows:
                groups[(route, tuple(sorted(data_classes)))].append(conversation_id)
            for (route, classes), ids in groups.items():
                rule = ctx.policy.retention_for(route, classes)
                await session.execute(
                    update(Conversation).where(Conversation.id.in_(ids)).values(**rule_values(rule, version))
                )
            # Deadlines that moved to another day take their data keys with them.
            await align_data_keys(session, ctx, [conversation_id for conversation_id, _, _ in rows])
            await ctx.auditor.append(
                session,
                AuditEntry(
                    "retention.recompute",
                    None,
                    resource_type="retention_policy",
                    chain=SYSTEM_CHAIN,
                    policy_version=version,
                    details={"conversations": len(rows)},
                ),
            )
            total += len(rows)
        if len(rows) < batch:
            return total
