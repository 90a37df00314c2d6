"""The retention runner's expiry-key pass: destroy the expiry key of every day that has passed.

A day's expiry key seals the data keys of the conversations whose deadline fell on it. Once the
day has passed, those conversations were purged (the runner ran) or are kept on purpose: held,
busy with a turn, or a purge that failed and is retried. So, for each day before today (by the
runner's clock) that still has a key, oldest first:

1. every data key still sealed under it is resealed to the day its deadline now gives (the day
   after today, for a deadline that has passed), in batches, each batch one transaction holding
   the day's advisory lock exclusively (so no data key is sealed under the day meanwhile: see
   service.conversations' data keys) and the rows it moves;
2. a transaction that finds no data key left under the day writes the day's
   `retention.expire_key` record (the day and how many data keys moved; no content), a child
   span of the run's trace;
3. the key is deleted from the key store. From then on, no copy of those data keys, in any backup
   of the service's database, can be opened.

The record is written before the key store's deletion (two databases, no common transaction): a
deletion that fails leaves the key for the next run, which writes another record when it
succeeds, so a destroyed key always has its record. One runner at a time does this pass (an
advisory lock); the others skip it. Runs scoped to one tenant and dry runs skip it too: the
keys are shared by every tenant.
"""

from __future__ import annotations

import logging
from datetime import date
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from ..audit import SYSTEM_CHAIN, AuditEntry
from ..context import ServiceContext
from ..conversations import DAY_LOCK_CLASS, reseal, utc_day, utc_today
from ..models import Conversation, DataKey

if TYPE_CHECKING:
    from ._runner import RunSummary

__all__ = ["destroy_expired_keys"]

logger = logging.getLogger("custody.retention")
_BATCH = 500
# One runner at a time destroys expiry keys (purges need no such lock).
_EXPIRY_PASS_LOCK = 0x6375_7374_6F64_7E


async def destroy_expired_keys(ctx: ServiceContext, summary: RunSummary, tenant_id: str | None) -> None:
    """The pass (see the module docstring); counts go into `summary`. A day that fails is logged
    by its error type, counted, and left for the next run."""
    if summary.dry_run or tenant_id is not None:
        return
    async with ctx.sessions() as guard:
        if not await guard.scalar(select(func.pg_try_advisory_lock(_EXPIRY_PASS_LOCK))):
            return  # another runner is at it
        try:
            async with ctx.sessions() as session:
                today = await session.scalar(select(utc_today(ctx.clock)))
            if not isinstance(today, date):
                raise TypeError(f"the clock answered {type(today).__name__}, not a day")
            for day in await ctx.expiry_keys.days_before(today):
                try:
                    summary.data_keys_moved += await _retire(ctx, summary, day)
                except Exception as exc:  # noqa: BLE001 - one day's failure must not stop the run
                    logger.error("destroying an expiry key failed (%s); the next run retries it", type(exc).__name__)
                    summary.expiry_keys_failed += 1
                    continue
                summary.expiry_keys_destroyed += 1
        finally:
            await guard.scalar(select(func.pg_advisory_unlock(_EXPIRY_PASS_LOCK)))


async def _retire(ctx: ServiceContext, summary: RunSummary, day: date) -> int:
    """Move every data key off `day`, record the destruction, destroy the key; returns how many
    data keys moved."""
    entry = AuditEntry(
        "retention.expire_key",
        None,
        resource_type="expiry_key",
        resource_id=day.isoformat(),
        chain=SYSTEM_CHAIN,
        details={"run_id": summary.run_id, "day": day.isoformat()},
    )
    moved = 0
    while True:
        async with ctx.sessions.begin() as session:
            # Exclusive: waits for every transaction sealing a data key under this day (each
            # holds the lock shared) and keeps new ones out while we look.
            await session.execute(select(func.pg_advisory_xact_lock(DAY_LOCK_CLASS, day.toordinal())))
            rows = (
                await session.execute(
                    select(DataKey, utc_day(Conversation.purge_at), utc_today(ctx.clock))
                    .join(Conversation, Conversation.id == DataKey.conversation_id)
                    .where(DataKey.expiry_day == day)
                    .order_by(DataKey.conversation_id)
                    .limit(_BATCH)
                    .with_for_update(of=DataKey)
                )
            ).all()
            if not rows:
                entry.details["data_keys_moved"] = moved
                await ctx.auditor.append(session, entry)
                break
            held: set[date] = set()
            for row, purge_day, now in rows:
                # Today is after `day`, so the day each one goes to is too.
                moved += await reseal(session, ctx, row, purge_day, now, held)
    await ctx.expiry_keys.destroy(day)
    return moved
