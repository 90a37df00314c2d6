"""The retention runner: purge every conversation past its deadline, and the provider's stale copies.

A run:

1. brings deadlines up to date with the policy (a changed policy is recomputed in batches);
2. walks the conversations whose `purge_at` has passed and that no legal hold covers, in batches
   ordered by deadline; each is purged in a transaction of its own that locks it with
   `FOR UPDATE SKIP LOCKED` and checks the conditions again, so any number of runners (in any
   number of replicas) can run at once and each conversation is purged exactly once. The purge
   destroys the data key first, then the rows, with its `retention.purge` record in the same
   transaction, which also owes the conversation's receipt; then every copy the provider still
   holds is deleted (each attempt audited), and the receipt is signed;
3. signs the receipts owed by deletions whose process stopped before signing (see
   service.conversations._receipts), after asking for the copies they left; retries the
   deletions of provider copies that failed earlier, and deletes copies older than their
   route's `provider_ttl` even while their conversation goes on;
4. destroys the expiry keys of the days that have passed (see `_expiry_keys`), which makes the
   purges reach backups of the database taken before them;
5. writes the run's `retention.run` record with its counts.

A run is one trace (`custody.retention.run`) whose children are the purges, provider-copy
deletions and expiry-key destructions. Nothing is kept in memory between conversations, so a
runner killed mid-batch loses nothing: the next run finds what is left (a copy whose deletion
never started is on the ledger, pending). A dry run lists what would be purged and why, and changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, false, func, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from ..audit import SYSTEM_CHAIN, AuditEntry, utc_instant
from ..context import ServiceContext
from ..conversations import (
    delete_provider_copies,
    erase,
    holding,
    interval,
    owing_receipt,
    recompute_deadlines,
    recover_receipt,
)
from ..database import database_now
from ..ids import new_id
from ..leases import close_abandoned
from ..legal_holds import held
from ..models import Conversation, ReceiptItem, RetentionRun, UpstreamInteraction
from ._expiry_keys import destroy_expired_keys

__all__ = ["Candidate", "RunSummary", "pending_provider_copies", "preview", "run_retention"]

logger = logging.getLogger("custody.retention")
_BATCH = 200
# One runner at a time deletes provider copies by age or retries failed ones (purges need no
# such lock: each conversation is claimed with SKIP LOCKED).
_PROVIDER_SWEEP_LOCK = 0x6375_7374_6F64_7C


@dataclass(frozen=True)
class Candidate:
    """A conversation a run would purge, and why: its rule, classes and deadline."""

    conversation_id: str
    tenant_id: str
    route: str
    data_classes: list[str]
    delete_after: str | None
    keep_at_least: str | None
    purge_at: str


@dataclass
class RunSummary:
    run_id: str
    dry_run: bool
    policy_version: str
    purged: int = 0
    skipped: int = 0  # purged by another runner meanwhile, held, or busy with a turn
    failed: int = 0
    provider_deleted: int = 0
    provider_failed: int = 0
    provider_pending: int = 0  # still pending after this run
    oldest_pending_seconds: float | None = None
    recomputed: int = 0
    receipts_recovered: int = 0  # owed by a deletion whose process stopped, signed by this run
    # Expiry keys of passed days destroyed (and failed to), and the data keys moved off them first.
    expiry_keys_destroyed: int = 0
    expiry_keys_failed: int = 0
    data_keys_moved: int = 0
    seconds: float = 0.0
    candidates: list[Candidate] = field(default_factory=list)
    receipts: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, Any]:
        """What the run row, the audit record and the ops API show: counts, never content."""
        data = asdict(self)
        for name in ("run_id", "dry_run", "policy_version", "candidates", "receipts"):
            data.pop(name)
        data["would_purge" if self.dry_run else "receipts"] = (
            len(self.candidates) if self.dry_run else len(self.receipts)
        )
        return data


Progress = Callable[[RunSummary], None]


async def run_retention(
    ctx: ServiceContext,
    *,
    started_by: str,
    dry_run: bool = False,
    tenant_id: str | None = None,
    limit: int | None = None,
    progress: Progress | None = None,
    run_id: str | None = None,
) -> RunSummary:
    """One run of the runner (see the module docstring); `limit` caps the conversations purged."""
    summary = RunSummary(run_id or new_id("run"), dry_run, ctx.policy.version)
    started = time.monotonic()
    entry = AuditEntry(
        "retention.run",
        None,
        resource_type="retention_run",
        resource_id=summary.run_id,
        chain=tenant_id or SYSTEM_CHAIN,
        policy_version=ctx.policy.version,
        details={"dry_run": dry_run, "started_by": started_by, "limit": limit},
    )
    async with ctx.auditor.job(ctx.sessions, entry) as entry:
        await _start_run(ctx, summary, tenant_id, started_by)
        try:
            summary.recomputed = await recompute_deadlines(ctx)
            await _purge_due(ctx, summary, tenant_id, limit, progress)
            if not dry_run:
                await _recover_receipts(ctx, summary, tenant_id)
                await _sweep_provider_copies(ctx, summary, tenant_id)
            await destroy_expired_keys(ctx, summary, tenant_id)
            summary.provider_pending, summary.oldest_pending_seconds = await _pending_stats(ctx, tenant_id)
        except BaseException:
            summary.seconds = time.monotonic() - started
            ctx.metrics.retention_run(summary, whole=False)  # what it did before it broke
            await _finish_run(ctx, summary, "failed")
            raise
        summary.seconds = time.monotonic() - started
        await _finish_run(ctx, summary, "completed")
        ctx.metrics.retention_run(summary, whole=tenant_id is None)
        entry.details |= summary.counts()
    return summary


async def preview(ctx: ServiceContext, *, tenant_id: str | None = None, limit: int | None = None) -> list[Candidate]:
    """What a run would purge now, and why (rule, classes, deadline); changes nothing. Deadlines
    are as stored: the service brings them to a changed policy when it starts."""
    candidates: list[Candidate] = []
    async for batch in _due(ctx, tenant_id, limit):
        candidates.extend(batch)
    return candidates


async def _purge_due(
    ctx: ServiceContext, summary: RunSummary, tenant_id: str | None, limit: int | None, progress: Progress | None
) -> None:
    async for batch in _due(ctx, tenant_id, limit):
        for candidate in batch:
            if summary.dry_run:
                summary.candidates.append(candidate)
                continue
            try:
                receipt = await _purge_one(ctx, summary, candidate)
            except Exception as exc:  # noqa: BLE001 - one conversation's failure must not stop the run
                logger.error("purge of a conversation failed (%s); the next run retries it", type(exc).__name__)
                summary.failed += 1
                continue
            if receipt is None:
                summary.skipped += 1
            else:
                summary.purged += 1
                summary.receipts.append(receipt)
            if limit is not None and summary.purged >= limit:
                break
        if progress is not None:
            progress(summary)
        await _save_progress(ctx, summary)
        if limit is not None and summary.purged >= limit:
            return


async def _due(ctx: ServiceContext, tenant_id: str | None, limit: int | None) -> AsyncIterator[list[Candidate]]:
    """Batches of conversations past their deadline and not held, oldest deadline first (keyset
    paging, so a batch purged by another runner meanwhile does not shift the next one)."""
    after: tuple[datetime, str] | None = None
    seen = 0
    while True:
        query = (
            select(
                Conversation.id,
                Conversation.tenant_id,
                Conversation.route,
                Conversation.data_classes,
                Conversation.delete_after,
                Conversation.keep_at_least,
                Conversation.purge_at,
            )
            .where(Conversation.purge_at <= ctx.clock.now(), ~held())
            .order_by(Conversation.purge_at, Conversation.id)
            .limit(_BATCH)
        )
        if tenant_id is not None:
            query = query.where(Conversation.tenant_id == tenant_id)
        if after is not None:
            query = query.where(tuple_(Conversation.purge_at, Conversation.id) > tuple_(*after))
        async with ctx.sessions() as session:
            rows = (await session.execute(query)).all()
        if not rows:
            return
        batch = [
            Candidate(
                row.id,
                row.tenant_id,
                row.route,
                list(row.data_classes),
                row.delete_after,
                row.keep_at_least,
                utc_instant(row.purge_at),
            )
            for row in rows
        ]
        if limit is not None and seen + len(batch) > limit:
            batch = batch[: limit - seen]
        seen += len(batch)
        yield batch
        if len(rows) < _BATCH or (limit is not None and seen >= limit):
            return
        after = (rows[-1].purge_at, rows[-1].id)


async def _purge_one(ctx: ServiceContext, summary: RunSummary, candidate: Candidate) -> str | None:
    """Purge one conversation; None when it is no longer due (another runner purged it, a hold
    was placed, a turn is running, or its deadline moved)."""
    entry = AuditEntry(
        "retention.purge",
        None,
        resource_type="conversation",
        resource_id=candidate.conversation_id,
        chain=candidate.tenant_id,
        policy_version=ctx.policy.version,
        details={
            "run_id": summary.run_id,
            "delete_after": candidate.delete_after,
            "keep_at_least": candidate.keep_at_least,
            "purge_at": candidate.purge_at,
        },
    )
    async with owing_receipt(ctx, tenant_id=candidate.tenant_id, chain=candidate.tenant_id, cause="retention") as owed:
        async with ctx.sessions.begin() as session:
            conversation = await session.scalar(
                select(Conversation)
                .where(
                    Conversation.id == candidate.conversation_id,
                    Conversation.purge_at <= ctx.clock.now(),
                    ~held(),
                )
                .with_for_update(skip_locked=True)
            )
            if conversation is None:
                return None
            now = await database_now(session)
            if conversation.lease_token and conversation.lease_expires_at and conversation.lease_expires_at > now:
                return None  # a turn is waiting for the model: the next run purges it
            if conversation.lease_token:
                await close_abandoned(ctx.auditor, session, conversation, closed_by="retention")
            erased = await erase(session, conversation)
            ctx.data_keys.drop(conversation.id)
            # The purge, its record and the receipt it is owed commit together, or none does.
            await owed.record(session, erased, action=entry.action)
            entry.data_classes = erased.data_classes
            entry.details["provider_copies"] = len(erased.provider_copies)
            await ctx.auditor.append(session, entry)
        _, pending = await delete_provider_copies(
            ctx, None, None, candidate.conversation_id, erased.provider_copies, tenant_id=candidate.tenant_id
        )
        summary.provider_deleted += len(erased.provider_copies) - len(pending)
        summary.provider_failed += len(pending)
        receipt = await owed.sign()
    return receipt["payload"]["receipt_id"] if receipt is not None else None


async def _recover_receipts(ctx: ServiceContext, summary: RunSummary, tenant_id: str | None) -> None:
    """Finish the deletions whose process stopped before their receipt was signed (a killed
    runner, a replica gone mid-DELETE): ask for the provider copies still held, then sign."""
    while (owed := await recover_receipt(ctx, tenant_id)) is not None:
        try:
            async with holding(owed):
                for conversation_id, copies in await owed.provider_copies():
                    _, pending = await delete_provider_copies(
                        ctx, None, None, conversation_id, copies, tenant_id=owed.tenant_id
                    )
                    summary.provider_deleted += len(copies) - len(pending)
                    summary.provider_failed += len(pending)
                receipt = await owed.sign()
        except Exception as exc:  # noqa: BLE001 - one receipt's failure must not stop the run
            logger.error("recovering a deletion receipt failed (%s); the next run retries it", type(exc).__name__)
            summary.failed += 1
            continue
        if receipt is not None:
            summary.receipts.append(receipt["payload"]["receipt_id"])
            summary.receipts_recovered += 1


async def _sweep_provider_copies(ctx: ServiceContext, summary: RunSummary, tenant_id: str | None) -> None:
    """Retry provider copies whose deletion failed or never ran (their conversation is gone, or
    no longer permits provider storage), and delete copies older than their route's
    provider_ttl. One runner at a time."""
    async with ctx.sessions() as session:
        if not await session.scalar(select(func.pg_try_advisory_lock(_PROVIDER_SWEEP_LOCK))):
            return
        try:
            due = await _stale_copies(ctx, session, tenant_id)
        finally:
            await session.scalar(select(func.pg_advisory_unlock(_PROVIDER_SWEEP_LOCK)))
    for conversation_id, tenant, ids in due:
        _, pending = await delete_provider_copies(ctx, None, None, conversation_id, ids, tenant_id=tenant)
        summary.provider_deleted += len(ids) - len(pending)
        summary.provider_failed += len(pending)


async def _stale_copies(
    ctx: ServiceContext, session: AsyncSession, tenant_id: str | None
) -> list[tuple[str, str, list[str]]]:
    """(conversation id, tenant id, interaction ids) of the copies to delete now."""
    gone = ~exists().where(Conversation.id == UpstreamInteraction.conversation_id)
    # A copy whose conversation an owed receipt names is being deleted by the process that holds
    # that receipt (or will be by whoever recovers it): not this sweep's, or two would ask at once.
    owed = exists().where(ReceiptItem.conversation_id == UpstreamInteraction.conversation_id)
    conditions = [and_(or_(UpstreamInteraction.delete_attempts > 0, gone, _storage_not_permitted(ctx)), ~owed)]
    for name, route in ctx.policy.routes.items():
        if route.provider_ttl is not None:
            conditions.append(
                and_(
                    exists().where(Conversation.id == UpstreamInteraction.conversation_id, Conversation.route == name),
                    UpstreamInteraction.created_at < ctx.clock.now() - interval(route.provider_ttl.iso),
                )
            )
    query = select(UpstreamInteraction.conversation_id, UpstreamInteraction.tenant_id, UpstreamInteraction.id).where(
        UpstreamInteraction.stored.is_(True), UpstreamInteraction.deleted_at.is_(None), or_(*conditions)
    )
    if tenant_id is not None:
        query = query.where(UpstreamInteraction.tenant_id == tenant_id)
    grouped: dict[tuple[str, str], list[str]] = {}
    for conversation_id, tenant, interaction_id in await session.execute(
        query.order_by(UpstreamInteraction.created_at)
    ):
        grouped.setdefault((conversation_id, tenant), []).append(interaction_id)
    return [(conversation_id, tenant, ids) for (conversation_id, tenant), ids in grouped.items()]


def _storage_not_permitted(ctx: ServiceContext) -> ColumnElement[bool]:
    """The copy's conversation may not have provider copies (any more): the policy's storage
    decision (service.policy.decide_storage) as SQL. Its classification rose to a class that
    forbids them, or the policy changed; the turn that raised it deletes them at once, and this
    catches a deletion that never ran (the process stopped first)."""
    permitted = []
    for name, route in ctx.policy.routes.items():
        if not route.provider_storage:
            continue
        catalogue = ctx.policy.data_classes
        allowed = sorted(c for c in route.data_classes if c in catalogue and catalogue[c].provider_storage)
        permitted.append(
            and_(
                Conversation.route == name,
                func.cardinality(Conversation.data_classes) > 0,
                Conversation.data_classes.contained_by(allowed),
            )
        )
    return exists().where(Conversation.id == UpstreamInteraction.conversation_id, ~or_(false(), *permitted))


async def pending_provider_copies(ctx: ServiceContext, tenant_id: str | None = None) -> list[dict[str, Any]]:
    """Provider copies whose deletion was asked for and has not succeeded yet, oldest first."""
    query = (
        select(UpstreamInteraction)
        .where(
            UpstreamInteraction.stored.is_(True),
            UpstreamInteraction.deleted_at.is_(None),
            or_(
                UpstreamInteraction.delete_attempts > 0,
                ~exists().where(Conversation.id == UpstreamInteraction.conversation_id),
            ),
        )
        .order_by(UpstreamInteraction.created_at)
    )
    if tenant_id is not None:
        query = query.where(UpstreamInteraction.tenant_id == tenant_id)
    async with ctx.sessions() as session:
        rows = (await session.scalars(query)).all()
    return [
        {
            "interaction_id": row.id,
            "conversation_id": row.conversation_id,
            "created_at": utc_instant(row.created_at),
            "delete_attempts": row.delete_attempts,
            "last_error": row.last_error,
        }
        for row in rows
    ]


async def _pending_stats(ctx: ServiceContext, tenant_id: str | None) -> tuple[int, float | None]:
    pending = await pending_provider_copies(ctx, tenant_id)
    if not pending:
        return 0, None
    async with ctx.sessions() as session:
        oldest = await session.scalar(
            select(func.extract("epoch", ctx.clock.now() - func.min(UpstreamInteraction.created_at))).where(
                UpstreamInteraction.id.in_([p["interaction_id"] for p in pending])
            )
        )
    return len(pending), float(oldest) if oldest is not None else None


async def _start_run(ctx: ServiceContext, summary: RunSummary, tenant_id: str | None, started_by: str) -> None:
    async with ctx.sessions.begin() as session:
        session.add(
            RetentionRun(
                id=summary.run_id,
                tenant_id=tenant_id,
                dry_run=summary.dry_run,
                status="running",
                started_by=started_by[:80],
                policy_version=summary.policy_version,
                counts=summary.counts(),
            )
        )


async def _save_progress(ctx: ServiceContext, summary: RunSummary) -> None:
    async with ctx.sessions.begin() as session:
        await session.execute(
            update(RetentionRun).where(RetentionRun.id == summary.run_id).values(counts=summary.counts())
        )


async def _finish_run(ctx: ServiceContext, summary: RunSummary, status: str) -> None:
    async with ctx.sessions.begin() as session:
        await session.execute(
            update(RetentionRun)
            .where(RetentionRun.id == summary.run_id)
            .values(status=status, counts=summary.counts(), finished_at=func.now())
        )
