"""Reading the audit trail: records in a chain, checkpoints, and the verification of a chain."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..models import AuditChainHead, AuditCheckpoint, AuditEvent
from ._chain import GENESIS, ChainVerdict, ChainWalk, Checkpoint
from ._keys import TrustedKeys

__all__ = ["chains", "query_events", "read_checkpoints", "stream_records", "verify_chain"]

_BATCH = 1000


async def query_events(
    session: AsyncSession,
    chain: str,
    *,
    after_seq: int = 0,
    limit: int = 100,
    since: str | None = None,
    until: str | None = None,
    filters: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Records of one chain in seq order; `filters` is a JSON containment pattern."""
    query = (
        select(AuditEvent.record)
        .where(AuditEvent.chain == chain, AuditEvent.seq > after_seq)
        .order_by(AuditEvent.seq)
        .limit(limit)
    )
    if filters:
        query = query.where(AuditEvent.record.contains(dict(filters)))
    if since is not None:
        query = query.where(AuditEvent.record["recorded_at"].astext >= since)
    if until is not None:
        query = query.where(AuditEvent.record["recorded_at"].astext < until)
    return [dict(row) for row in (await session.scalars(query)).all()]


async def read_checkpoints(session: AsyncSession, chain: str) -> list[Checkpoint]:
    rows = (
        await session.scalars(
            select(AuditCheckpoint).where(AuditCheckpoint.chain == chain).order_by(AuditCheckpoint.seq)
        )
    ).all()
    return [Checkpoint(r.chain, r.seq, r.head_hash, r.signed_at, r.key_id, r.signature) for r in rows]


async def stream_records(
    session: AsyncSession, chain: str, *, first: int = 1, last: int
) -> AsyncIterator[tuple[int, dict[str, Any]]]:
    """`(seq, record)` of one chain from `first` to `last`, in batches."""
    after = first - 1
    while after < last:
        rows = (
            await session.execute(
                select(AuditEvent.seq, AuditEvent.record)
                .where(AuditEvent.chain == chain, AuditEvent.seq > after, AuditEvent.seq <= last)
                .order_by(AuditEvent.seq)
                .limit(_BATCH)
            )
        ).all()
        for seq, record in rows:
            yield int(seq), dict(record)
        if len(rows) < _BATCH:
            return
        after = int(rows[-1][0])


async def verify_chain(
    session: AsyncSession, chain: str, keys: TrustedKeys | None, *, extra_checkpoints: Iterable[Checkpoint] = ()
) -> ChainVerdict:
    """Recompute a chain from the database up to its head as read now; name the first bad record.

    Records up to that head cannot change under us (append-only), so no snapshot isolation is
    needed, and the caller's audit record can join this same READ COMMITTED transaction.
    Checkpoints are read before the head, so none can legitimately lie beyond it: one that does
    means records were cut from the end. `extra_checkpoints` are copies kept outside the
    database (`custody audit checkpoint --out`), which whoever rewrites the tables cannot delete.
    Each checkpoint is checked with the key of `keys` (`Auditor.trusted_keys`: the signing key's
    and the retired ones) that its key id names.
    """
    checkpoints = [*await read_checkpoints(session, chain), *(c for c in extra_checkpoints if c.chain == chain)]
    # Columns, not the mapped object: nothing of the head stays in the session's identity map.
    head = (
        await session.execute(select(AuditChainHead.seq, AuditChainHead.head_hash).where(AuditChainHead.chain == chain))
    ).first()
    head_seq, head_hash = (head.seq, head.head_hash) if head else (0, GENESIS)
    walk = ChainWalk(chain, checkpoints=checkpoints)
    async for seq, record in stream_records(session, chain, last=head_seq):
        if not walk.add(seq, record):
            break
    verdict = walk.verdict(expected_head=(head_seq, head_hash), keys=keys)
    if verdict.ok:
        # A record past the head is either a concurrent append (the head has moved on since we
        # read it) or one written without going through the chain head: a forgery.
        beyond = await session.scalar(
            select(func.min(AuditEvent.seq)).where(AuditEvent.chain == chain, AuditEvent.seq > head_seq)
        )
        if beyond is not None:
            now = await session.scalar(select(AuditChainHead.seq).where(AuditChainHead.chain == chain))
            if now is None or now < beyond:
                return ChainVerdict(
                    chain,
                    verdict.checked,
                    head_seq,
                    head_hash,
                    head_seq + 1,
                    f"records continue past the chain head (seq {head_seq})",
                )
    return verdict


async def chains(session: AsyncSession) -> Iterable[str]:
    return list((await session.scalars(select(AuditChainHead.chain).order_by(AuditChainHead.chain))).all())
