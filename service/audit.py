"""The audit trail: every audited action writes one hash-chained record in its own transaction.

`Auditor.action(...)` is the one way to run an audited unit of work. It opens a span and a
database transaction; the action runs inside; the success record is appended in that same
transaction, so if the audit write fails the action fails with it (fail closed). If the action
fails, the transaction rolls back and a record of the failure (denied or error, with a reason
code) is written in a transaction of its own. Records never hold content: ids, codes, counts.

Each tenant has its own chain (and `system` has one for actions with no tenant), so that a
tenant's auditors can export and verify their whole chain offline.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .audit_chain import GENESIS, AuditSigner, ChainVerdict, ChainWalk, Checkpoint, record_hash
from .auth import Principal
from .errors import CustodyError, UpstreamFailed
from .models import AuditChainHead, AuditCheckpoint, AuditEvent
from .policy import PolicyViolation
from .telemetry import safe_attributes

__all__ = [
    "ACTIONS",
    "SYSTEM_CHAIN",
    "AuditEntry",
    "Auditor",
    "RequestMeta",
    "append",
    "chains",
    "iso_now",
    "utc_instant",
    "checkpoint_all",
    "outcome_of",
    "query_events",
    "read_checkpoints",
    "sign_checkpoint",
    "stream_records",
    "verify_chain",
]

SYSTEM_CHAIN = "system"
logger = logging.getLogger("custody.audit")
ACTIONS = frozenset(
    {
        "conversation.create",
        "conversation.read",
        "conversation.delete",
        "turn.start",
        "turn.create",
        "history.read",
        "auth.failure",
        "access.denied",
        "detector.hit",
        "upstream.store",
        "upstream.delete",
        "retention.run",
        "retention.purge",
        "legal_hold.place",
        "legal_hold.release",
        "tenant.create",
        "api_key.issue",
        "api_key.revoke",
        "keyring.rotate",
        "audit.query",
        "audit.export",
        "audit.verify",
        "audit.checkpoint",
    }
)
_BATCH = 1000


def utc_instant(value: datetime) -> str:
    """A time in the records' own fixed-width UTC form, so that comparing strings compares times."""
    if value.tzinfo is None:
        raise ValueError("a time needs a timezone (e.g. 2026-11-24T10:00:00Z)")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_now() -> str:
    """UTC, fixed width, so that records' times also sort as strings."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class RequestMeta:
    """Where a request came from: client address and request id (None for the CLI)."""

    address: str | None
    request_id: str | None


@dataclass
class AuditEntry:
    """What an action says about itself; filled in as the action learns it."""

    action: str
    actor: Principal | None
    meta: RequestMeta | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    data_classes: list[str] = field(default_factory=list)
    policy_version: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    chain: str | None = None  # defaults to the actor's tenant, or the system chain

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown audit action {self.action!r}")

    def resolved_chain(self) -> str:
        return self.chain or (self.actor.tenant_id if self.actor else SYSTEM_CHAIN)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().removesuffix("_error")


def outcome_of(exc: BaseException) -> tuple[str, str]:
    """(outcome, reason code) for a failed action: refusals are `denied`, failures `error`."""
    if isinstance(exc, UpstreamFailed):
        return "error", exc.code
    if isinstance(exc, (CustodyError, PolicyViolation)):
        return "denied", _snake(type(exc).__name__)
    return "error", _snake(type(exc).__name__)


async def append(
    session: AsyncSession,
    entry: AuditEntry,
    *,
    outcome: str = "success",
    reason: str | None = None,
    span: Span | None = None,
) -> dict[str, Any]:
    """Append one record to its chain, inside the caller's transaction.

    The chain head row is locked FOR UPDATE (READ COMMITTED), so concurrent writers from any
    number of processes queue on it and seq stays gapless; the lock ends with the transaction.
    """
    chain = entry.resolved_chain()
    head, recorded_at = await _lock_head(session, chain)
    context = (span or trace.get_current_span()).get_span_context()
    actor = entry.actor
    record: dict[str, Any] = {
        "seq": head.seq + 1,
        "chain": chain,
        "recorded_at": recorded_at,
        "action": entry.action,
        "outcome": outcome,
        "reason": reason,
        "actor": {
            "tenant_id": actor.tenant_id if actor else None,
            "key_id": actor.key_id if actor else None,
            "role": actor.role if actor else None,
        },
        "resource": {"type": entry.resource_type, "id": entry.resource_id},
        "source": {
            "address": entry.meta.address if entry.meta else None,
            "request_id": entry.meta.request_id if entry.meta else None,
        },
        "data_classes": sorted(entry.data_classes),
        "policy_version": entry.policy_version,
        "trace_id": format(context.trace_id, "032x") if context.is_valid else None,
        "span_id": format(context.span_id, "016x") if context.is_valid else None,
        "details": dict(entry.details),
        "prev_hash": head.head_hash,
    }
    record = _storable(record)
    record["hash"] = record_hash(head.head_hash, record)
    session.add(AuditEvent(chain=chain, seq=record["seq"], record=record))
    head.seq, head.head_hash = record["seq"], record["hash"]
    await session.flush()
    if span is not None:
        span.set_attribute("custody.audit_seq", record["seq"])
    return record


async def _lock_head(session: AsyncSession, chain: str) -> tuple[AuditChainHead, str]:
    """The chain's head row, locked FOR UPDATE, read fresh (never a stale object from the
    session's identity map), with the database's clock, so times within a chain never go back."""
    await session.execute(
        insert(AuditChainHead)
        .values(chain=chain, seq=0, head_hash=GENESIS)
        .on_conflict_do_nothing(index_elements=["chain"])
    )
    row = (
        await session.execute(
            select(AuditChainHead, func.clock_timestamp())
            .where(AuditChainHead.chain == chain)
            .with_for_update(of=AuditChainHead)
            .execution_options(populate_existing=True)
        )
    ).one()
    head, clock = row
    return head, clock.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


_SAFE_INT = 2**53 - 1


def _storable(value: Any) -> Any:
    """A value that survives JSONB and RFC 8785 unchanged, so an honest chain always verifies:
    integers past 2**53 and non-finite or huge floats become strings, NUL characters (which
    JSONB refuses) are dropped, and anything else that is not JSON becomes its string."""
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        return value if -_SAFE_INT <= value <= _SAFE_INT else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) and abs(value) < _SAFE_INT else repr(value)
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {str(k).replace("\x00", ""): _storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_storable(v) for v in value]
    return str(value).replace("\x00", "")


class Auditor:
    """Runs audited units of work; holds the tracer (passed in, never the global one)."""

    def __init__(self, tracer: Tracer, signer: AuditSigner | None = None) -> None:
        self.tracer = tracer
        self.signer = signer

    @asynccontextmanager
    async def action(
        self, sessions: async_sessionmaker[AsyncSession], entry: AuditEntry
    ) -> AsyncIterator[tuple[AsyncSession, AuditEntry]]:
        with self.tracer.start_as_current_span(
            f"custody.{entry.action}", record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                async with sessions.begin() as session:
                    yield session, entry
                    await append(session, entry, span=span)
                self._annotate(span, entry, "success", None)
            except BaseException as exc:
                outcome, reason = outcome_of(exc)
                self._annotate(span, entry, outcome, reason)
                try:
                    # Shielded: a second cancellation must not lose the record of the failure.
                    await asyncio.shield(self._record_failure(sessions, entry, outcome, reason, span))
                except Exception as audit_error:  # noqa: BLE001 - the action's own error is the one to raise
                    # The audit log itself is failing: a critical control (PCI DSS 10.7.2), so
                    # say so loudly; the action has failed already, so nothing went unrecorded.
                    logger.error(
                        "audit: the failure record of %s could not be written (%s)",
                        entry.action,
                        type(audit_error).__name__,
                    )
                raise

    async def _record_failure(
        self, sessions: async_sessionmaker[AsyncSession], entry: AuditEntry, outcome: str, reason: str, span: Span
    ) -> None:
        async with sessions.begin() as session:
            await append(session, entry, outcome=outcome, reason=reason, span=span)

    async def record(
        self,
        sessions: async_sessionmaker[AsyncSession],
        entry: AuditEntry,
        *,
        outcome: str = "success",
        reason: str | None = None,
    ) -> dict[str, Any]:
        """A record with no other work attached (an authentication failure, a denial)."""
        with self.tracer.start_as_current_span(f"custody.{entry.action}") as span:
            self._annotate(span, entry, outcome, reason)
            async with sessions.begin() as session:
                return await append(session, entry, outcome=outcome, reason=reason, span=span)

    def _annotate(self, span: Span, entry: AuditEntry, outcome: str, reason: str | None) -> None:
        actor = entry.actor
        span.set_attributes(
            safe_attributes(
                {
                    "action": entry.action,
                    "outcome": outcome,
                    "reason": reason,
                    "chain": entry.resolved_chain(),
                    "tenant_id": actor.tenant_id if actor else None,
                    "key_id": actor.key_id if actor else None,
                    "role": actor.role if actor else None,
                    "resource_type": entry.resource_type,
                    "resource_id": entry.resource_id,
                    "data_classes": sorted(entry.data_classes) or None,
                    "policy_version": entry.policy_version,
                    "request_id": entry.meta.request_id if entry.meta else None,
                }
            )
        )
        if outcome != "success":
            span.set_status(Status(StatusCode.ERROR, reason))


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
    session: AsyncSession, chain: str, signer: AuditSigner | None, *, extra_checkpoints: Iterable[Checkpoint] = ()
) -> ChainVerdict:
    """Recompute a chain from the database up to its head as read now; name the first bad record.

    Records up to that head cannot change under us (append-only), so no snapshot isolation is
    needed, and the caller's audit record can join this same READ COMMITTED transaction.
    Checkpoints are read before the head, so none can legitimately lie beyond it: one that does
    means records were cut from the end. `extra_checkpoints` are copies kept outside the
    database (`custody audit checkpoint --out`), which whoever rewrites the tables cannot delete.
    """
    checkpoints = [*await read_checkpoints(session, chain), *(c for c in extra_checkpoints if c.chain == chain)]
    head = await session.scalar(
        select(AuditChainHead).where(AuditChainHead.chain == chain).execution_options(populate_existing=True)
    )
    head_seq, head_hash = (head.seq, head.head_hash) if head else (0, GENESIS)
    walk = ChainWalk(chain, checkpoints=checkpoints)
    async for seq, record in stream_records(session, chain, last=head_seq):
        if not walk.add(seq, record):
            break
    verdict = walk.verdict(expected_head=(head_seq, head_hash), public_key=signer.public_key if signer else None)
    if verdict.ok:
        # A record past the head is either a concurrent append (the head has moved on since we
        # read it) or one written without going through the chain head: a forgery.
        beyond = await session.scalar(
            select(func.min(AuditEvent.seq)).where(AuditEvent.chain == chain, AuditEvent.seq > head_seq)
        )
        if beyond is not None:
            now = await session.scalar(
                select(AuditChainHead.seq)
                .where(AuditChainHead.chain == chain)
                .execution_options(populate_existing=True)
            )
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


async def sign_checkpoint(session: AsyncSession, signer: AuditSigner, chain: str) -> Checkpoint | None:
    """Sign the chain's current head (inside the caller's transaction); None for an empty chain."""
    head, signed_at = await _lock_head(session, chain)
    if head.seq == 0:
        return None
    return await sign_at(session, signer, chain, head.seq, head.head_hash, signed_at)


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


_CHECKPOINT_LOCK = 0x6375_7374_6F64_7A  # one signer at a time across replicas


async def checkpoint_all(sessions: async_sessionmaker[AsyncSession], signer: AuditSigner) -> list[Checkpoint]:
    """Sign the head of every chain that moved since its last checkpoint; each checkpoint is
    itself recorded in its chain. Replicas may all call this: an advisory lock lets one sign.
    Each chain is its own transaction, so one busy chain never holds back the others."""
    signed: list[Checkpoint] = []
    async with sessions() as session:
        names = list(await chains(session))
    for chain in names:
        async with sessions.begin() as session:
            if not await session.scalar(select(func.pg_try_advisory_xact_lock(_CHECKPOINT_LOCK))):
                return signed
            latest = await session.scalar(select(func.max(AuditCheckpoint.seq)).where(AuditCheckpoint.chain == chain))
            head, _ = await _lock_head(session, chain)
            # The only record since the last checkpoint is that checkpoint's own record: nothing new.
            if head.seq == 0 or (latest is not None and head.seq <= latest + 1):
                continue
            checkpoint = await sign_checkpoint(session, signer, chain)
            if checkpoint is not None:
                await append(
                    session,
                    AuditEntry(
                        "audit.checkpoint",
                        None,
                        resource_type="audit_log",
                        resource_id=chain,
                        chain=chain,
                        details={"seq": checkpoint.seq, "key_id": checkpoint.key_id},
                    ),
                )
                signed.append(checkpoint)
    return signed
