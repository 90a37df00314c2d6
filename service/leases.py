"""A turn's claim on its conversation: renewed while its holder lives, taken over when it dies.

A turn holds a lease (a token and an expiry on the conversation row, on the database's clock) from
its claim until its reply is stored. The lease is short; the holder renews it every third of its
length while the model works, so a dead holder blocks the conversation for seconds, not minutes.
When a lease has expired, its turn was abandoned (the process died, or lost the database for
longer than the lease): the next turn on the conversation, or the reaper that runs in every
replica, closes the abandoned turn (status failed, error `abandoned`), records its outcome as a
`turn.create` record against the key that started it, frees its Idempotency-Key so a retry can
run the turn again, and clears the lease.

A background turn (one whose model runs on after the request, see service/turns/_background.py)
is not abandoned when its holder dies: the interaction goes on at the provider, and a poller in
any replica takes the lease over and resumes it. So the reaper and a new turn's takeover leave
it, and its lease, alone; deletion and retention, which erase the conversation, close it.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .audit import AuditEntry, Auditor
from .auth import Principal
from .context import ServiceContext
from .database_errors import database_unreachable
from .models import Conversation, IdempotencyRecord, Turn

__all__ = ["background_turn_running", "close_abandoned", "reap_expired_leases", "renew_lease"]

logger = logging.getLogger("custody.leases")
_REAP_BATCH = 100


async def renew_lease(ctx: ServiceContext, conversation_id: str, lease_token: str) -> None:
    """Keep extending the lease while the turn runs (cancel the task to stop); stops by itself
    once the lease is no longer ours (taken over, or the conversation deleted)."""
    interval = ctx.turn_lease_seconds / 3
    while True:
        await asyncio.sleep(interval)
        try:
            async with ctx.sessions.begin() as session:
                renewed = await session.execute(
                    update(Conversation)
                    .where(Conversation.id == conversation_id, Conversation.lease_token == lease_token)
                    .values(lease_expires_at=func.now() + timedelta(seconds=ctx.turn_lease_seconds))
                )
        except Exception as exc:
            if not database_unreachable(exc):
                raise
            # Nobody can take the lease over while the database is down either; keep trying, a
            # little faster, so the lease is ours again as soon as it is back.
            logger.warning("lease renewal failed (%s); retrying", type(exc).__name__)
            interval = min(interval, 1.0)
            continue
        if renewed.rowcount == 0:  # type: ignore[attr-defined]
            return
        interval = ctx.turn_lease_seconds / 3


# Closers that leave a running background turn to its poller; the others erase the conversation.
_RESUMABLE_BY = frozenset({"takeover", "reaper"})


def _background_running(conversation_id: str) -> Any:
    return (
        Turn.conversation_id == conversation_id,
        Turn.status == "in_progress",
        Turn.background_interaction_id.is_not(None),
    )


async def background_turn_running(session: AsyncSession, conversation_id: str) -> bool:
    """Whether a background turn of the conversation is still waiting for the model: its lease,
    expired or not, is not to be taken by another turn (a poller resumes it)."""
    found = await session.scalar(select(Turn.id).where(*_background_running(conversation_id)).limit(1))
    return found is not None


async def close_abandoned(
    auditor: Auditor, session: AsyncSession, conversation: Conversation, *, closed_by: str
) -> int:
    """Close the turns of `conversation` whose holder is gone, in the caller's transaction (which
    holds the conversation row locked); returns how many were closed. The reaper and a takeover
    leave a running background turn and its lease to the pollers."""
    query = select(Turn).where(Turn.conversation_id == conversation.id, Turn.status == "in_progress")
    if closed_by in _RESUMABLE_BY:
        if await background_turn_running(session, conversation.id):
            return 0
    abandoned = (await session.scalars(query.order_by(Turn.number))).all()
    for turn in abandoned:
        turn.status, turn.error_code, turn.finished_at = "failed", "abandoned", func.now()
        # A background turn that died before its model started keeps no sealed input either.
        turn.pending_input = turn.pending_input_key_version = None
        # The abandoned turn stored nothing, so its Idempotency-Key may run the turn again.
        await session.execute(
            delete(IdempotencyRecord).where(IdempotencyRecord.turn_id == turn.id, IdempotencyRecord.response.is_(None))
        )
        actor = Principal(conversation.tenant_id, turn.key_id, "backend") if turn.key_id else None
        await auditor.append(
            session,
            AuditEntry(
                "turn.create",
                actor,
                resource_type="turn",
                resource_id=turn.id,
                data_classes=list(conversation.data_classes),
                policy_version=turn.policy_version,
                details={
                    "conversation_id": conversation.id,
                    "store": turn.provider_storage,
                    "closed_by": closed_by,
                    "upstream_attempts": turn.upstream_attempts,
                },
                chain=conversation.tenant_id,
            ),
            outcome="error",
            reason="abandoned",
        )
    conversation.lease_token = conversation.lease_expires_at = None
    return len(abandoned)


async def reap_expired_leases(ctx: ServiceContext, *, grace_seconds: float | None = None) -> int:
    """Close the abandoned turns of conversations nobody has come back to; returns how many.

    Leases must have been expired for `grace_seconds` (one lease length by default): a holder that
    just got its database back renews before that, and keeps its turn. Replicas may all run this:
    rows another one is working on are skipped, so each abandoned turn is closed once.
    """
    grace = ctx.turn_lease_seconds if grace_seconds is None else grace_seconds
    closed = 0
    while True:
        async with ctx.sessions.begin() as session:
            conversations = (
                await session.scalars(
                    select(Conversation)
                    .where(
                        Conversation.lease_token.is_not(None),
                        Conversation.lease_expires_at < func.now() - timedelta(seconds=grace),
                    )
                    .limit(_REAP_BATCH)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            for conversation in conversations:
                closed += await close_abandoned(ctx.auditor, session, conversation, closed_by="reaper")
        if len(conversations) < _REAP_BATCH:
            ctx.metrics.abandoned_turns(closed, "reaper")
            return closed
