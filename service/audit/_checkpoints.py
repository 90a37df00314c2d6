"""Signed checkpoints: the chains' heads signed with a key the database never holds."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..models import AuditCheckpoint
from ._chain import AuditSigner, Checkpoint
from ._queries import chains
from ._writer import AuditEntry, Auditor, lock_head

__all__ = ["CHECKPOINT_LOCK", "checkpoint_all", "checkpoint_entry", "sign_at", "sign_checkpoint"]


async def sign_checkpoint(session: AsyncSession, signer: AuditSigner, chain: str) -> Checkpoint | None:
    """Sign the chain's current head (inside the caller's transaction); None for an empty chain."""
    head = await lock_head(session, chain)
    if head.seq == 0:
        return None
    return await sign_at(session, signer, chain, head.seq, head.head_hash, head.clock)


async def sign_at(
    session: AsyncSession, signer: AuditSigner, chain: str, seq: int, head_hash: str, signed_at: str
) -> Checkpoint:
    """A checkpoint over the record at `seq` (an earlier one, for an export's end, or the head)."""
    existing = await session.get(AuditCheckpoint, (chain, seq))
    if existing is not None:
        return Checkpoint(
            existing.chain, existing.seq, existing.head_hash, existing.signed_at, existing.key_id, existing.signature
        )
    checkpoint = signer.sign(chain, seq, head_hash, signed_at)
    session.add(AuditCheckpoint(**checkpoint.as_json()))
    await session.flush()
    return checkpoint


CHECKPOINT_LOCK = 0x6375_7374_6F64_7A  # one signer at a time across replicas


async def checkpoint_all(auditor: Auditor, sessions: async_sessionmaker[AsyncSession]) -> list[Checkpoint]:
    """Sign (with the auditor's signer) the head of every chain that moved since its last checkpoint; each checkpoint is
    itself recorded in its chain. Replicas may all call this: an advisory lock lets one sign.
    Each chain is its own transaction, so one busy chain never holds back the others."""
    signer = auditor.signer
    if signer is None:
        return []
    signed: list[Checkpoint] = []
    async with sessions() as session:
        names = list(await chains(session))
    for chain in names:
        async with sessions.begin() as session:
            if not await session.scalar(select(func.pg_try_advisory_xact_lock(CHECKPOINT_LOCK))):
                return signed
            latest = await session.scalar(select(func.max(AuditCheckpoint.seq)).where(AuditCheckpoint.chain == chain))
            head = await lock_head(session, chain)
            # The only record since the last checkpoint is that checkpoint's own record: nothing new.
            if head.seq == 0 or (latest is not None and head.seq <= latest + 1):
                continue
            checkpoint = await sign_at(session, signer, chain, head.seq, head.head_hash, head.clock)
            await auditor.append(session, checkpoint_entry(checkpoint))
            signed.append(checkpoint)
    return signed


def checkpoint_entry(checkpoint: Checkpoint, *, operator: str | None = None) -> AuditEntry:
    """The `audit.checkpoint` record of a checkpoint just signed, on its own chain."""
    return AuditEntry(
        "audit.checkpoint",
        None,
        resource_type="audit_log",
        resource_id=checkpoint.chain,
        chain=checkpoint.chain,
        details={"seq": checkpoint.seq, "key_id": checkpoint.key_id},
        operator=operator,
    )
