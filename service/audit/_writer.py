"""The one writer of audit records: every record is hash-chained, in a transaction, under a span.

`Auditor` is the only way to write a record, in one of three shapes:

- `action(...)`, an audited unit of work: a span and a database transaction; the action runs
  inside, and its success record is appended in that same transaction, so if the audit write
  fails the action fails with it (fail closed). If the action fails, the transaction rolls back
  and a record of the failure (denied or error, with a reason code) is written on its own;
- `append(session, ...)`, a record inside a transaction the caller already holds (the ledger of
  provider copies, tenant administration, key rotation batches), under a span of its own;
- `record(...)`, a record with no other work attached (an authentication failure, a detector hit).

Every record carries the trace and span ids of the span it was written under, so an auditor can
follow a record to its trace. Records never hold content: ids, codes, counts.

Each tenant has its own chain (and `system` has one for actions with no tenant), so that a
tenant's auditors can export and verify their whole chain offline.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import rfc8785
from opentelemetry.context import Context
from opentelemetry.trace import Span, Status, StatusCode, Tracer
from sqlalchemy import Table, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..auth import Principal
from ..database import run_sql
from ..errors import CustodyError, snake_name
from ..metrics import Metrics
from ..models import AuditChainHead, AuditEvent
from ..telemetry import safe_attributes
from ._chain import GENESIS, AuditSigner, record_hash
from ._keys import TrustedKeys

__all__ = [
    "ACTIONS",
    "SYSTEM_CHAIN",
    "AuditEntry",
    "Auditor",
    "ChainHead",
    "ChainHeadMoved",
    "RequestMeta",
    "advance_head",
    "iso_now",
    "lock_head",
    "outcome_of",
    "utc_instant",
]

SYSTEM_CHAIN = "system"
logger = logging.getLogger("custody.audit")
ACTIONS = frozenset(
    {
        "conversation.create",
        "conversation.read",
        "conversation.delete",
        "conversation.list",
        "subject.erase",
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
        "retention.recompute",
        "retention.expire_key",
        "retention.preview",
        "retention.start",
        "retention.status",
        "policy.read",
        "legal_hold.place",
        "legal_hold.release",
        "legal_hold.list",
        "upstream.list",
        "tenant.create",
        "tenant.list",
        "api_key.issue",
        "api_key.list",
        "api_key.revoke",
        "keyring.rotate",
        "audit.query",
        "audit.export",
        "audit.verify",
        "audit.checkpoint",
        "audit.signing_key_rotate",
    }
)


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
    # Who acted at the console, for actions with no API key (the CLI): the OS user, or the name
    # given with `--as`, in the documented safe shape (see service.operators).
    operator: str | None = None
    # The record once written (its seq, for a deletion receipt); None until then.
    written: dict[str, Any] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"unknown audit action {self.action!r}")

    def resolved_chain(self) -> str:
        return self.chain or (self.actor.tenant_id if self.actor else SYSTEM_CHAIN)


def outcome_of(exc: BaseException) -> tuple[str, str]:
    """(outcome, reason code) for a failed action: Custody's own errors say whether they are a
    refusal (`denied`) or a failure (`error`); anything else is an `error` named by its type."""
    if isinstance(exc, CustodyError):
        return exc.outcome, exc.reason_code
    return "error", snake_name(type(exc).__name__)


class ChainHeadMoved(RuntimeError):
    """The chain head was not where the locked read left it: impossible while its row lock holds,
    so an append that meets it stops rather than fork or skip a seq."""


@dataclass(frozen=True)
class ChainHead:
    """A chain's head as read under its row lock, with the database's clock at that moment."""

    chain: str
    seq: int
    head_hash: str
    clock: str  # the records' fixed-width UTC form


_HEADS = cast(Table, AuditChainHead.__table__)
_EVENTS = cast(Table, AuditEvent.__table__)

# The appends' statements, built once so that SQLAlchemy compiles each once and asyncpg prepares
# each once per connection. Core, not the ORM: no identity map entry, no unit of work, and
# nothing a later flush could write back. Their parameters are named apart from the columns,
# which an INSERT or UPDATE would otherwise take as further values to set.
_LOCK = (
    select(_HEADS.c.seq, _HEADS.c.head_hash, func.clock_timestamp())
    .where(_HEADS.c.chain == bindparam("head_chain"))
    .with_for_update()
)
# Only for a chain's first record: the new row is invisible to other transactions until commit,
# so whoever inserts it holds it; a writer that meets the conflict waits for the inserter to
# finish and then locks the committed row with `_LOCK`.
_CREATE = (
    insert(_HEADS)
    .values(chain=bindparam("head_chain"), seq=0, head_hash=GENESIS)
    .on_conflict_do_nothing(index_elements=[_HEADS.c.chain])
    .returning(_HEADS.c.seq, _HEADS.c.head_hash, func.clock_timestamp())
)
# The record and the head's advance in one statement. The head only moves if it is still at the
# (seq, hash) read under the lock, and the record is only inserted if it moved, so a moved head
# inserts nothing and returns no row.
_MOVED = (
    update(_HEADS)
    .where(
        _HEADS.c.chain == bindparam("head_chain"),
        _HEADS.c.seq == bindparam("old_seq"),
        _HEADS.c.head_hash == bindparam("old_hash"),
    )
    .values(seq=bindparam("new_seq"), head_hash=bindparam("new_hash"))
    .returning(_HEADS.c.chain, _HEADS.c.seq)
    .cte("moved")
)
_ADVANCE = (
    insert(_EVENTS)
    .from_select(
        ["chain", "seq", "record"],
        select(_MOVED.c.chain, _MOVED.c.seq, bindparam("new_record", type_=_EVENTS.c.record.type)),
    )
    .returning(_EVENTS.c.seq)
)


# One append, one statement: lock the chain's head; read the clock once the lock is held (times in
# a chain never go back); hash the previous hash and the canonical record with its place filled
# in, exactly as `record_hash` does; move the head and insert the record. No row: no head yet.
_APPEND = """
WITH head AS (
    SELECT seq, head_hash FROM audit_chain_heads WHERE chain = $1 FOR UPDATE
), placed AS (
    SELECT seq + 1 AS seq,
           head_hash AS prev_hash,
           to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS recorded_at
    FROM head
), hashed AS (
    SELECT seq, prev_hash, recorded_at,
           encode(sha256(decode(prev_hash, 'hex')
                         || convert_to($2 || '"' || prev_hash || '"' || $3 || '"' || recorded_at || '"'
                                       || $4 || seq::text || $5, 'UTF8')), 'hex') AS hash
    FROM placed
), moved AS (
    UPDATE audit_chain_heads SET seq = hashed.seq, head_hash = hashed.hash
    FROM hashed
    WHERE audit_chain_heads.chain = $1
    RETURNING hashed.seq, hashed.prev_hash, hashed.recorded_at, hashed.hash
)
INSERT INTO audit_events (chain, seq, record)
SELECT $1, moved.seq,
       $6::jsonb || jsonb_build_object('seq', moved.seq, 'recorded_at', moved.recorded_at,
                                       'prev_hash', moved.prev_hash, 'hash', moved.hash)
FROM moved
RETURNING seq, record ->> 'recorded_at' AS recorded_at, record ->> 'prev_hash' AS prev_hash, record ->> 'hash' AS hash
"""


async def _append(
    session: AsyncSession, entry: AuditEntry, span: Span, outcome: str, reason: str | None
) -> dict[str, Any]:
    """Append one record to its chain, inside the caller's transaction, naming `span`.

    The chain head row is locked FOR UPDATE (READ COMMITTED), so concurrent writers from any
    number of processes queue on it and seq stays gapless; the lock ends with the transaction.
    Every writer of the chain waits while it is held, so the lock is taken as late as possible:
    everything that does not depend on the head is prepared first, and the lock is taken by the
    one statement that also hashes, stores and moves the head (`_APPEND`), then the caller's
    commit. A chain's first record is appended in three statements, its head row made first.
    """
    chain = entry.resolved_chain()
    context = span.get_span_context()
    actor = entry.actor
    who: dict[str, Any] = {
        "tenant_id": actor.tenant_id if actor else None,
        "key_id": actor.key_id if actor else None,
        "role": actor.role if actor else None,
    }
    if entry.operator is not None:
        who["operator"] = entry.operator
    # Everything in the record but its place in the chain (seq, time, previous hash).
    body: dict[str, Any] = _storable(
        {
            "action": entry.action,
            "outcome": outcome,
            "reason": reason,
            "actor": who,
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
        }
    )
    # The caller's own pending changes go to the database now, before the lock, rather than in
    # the commit's flush while every other writer of the chain waits.
    await session.flush()
    record = await _append_in_one_statement(session, _storable(chain), body)
    if record is None:
        # The chain's first record: its head row is made (or met) first.
        record = await _append_under_lock(session, chain, body)
    span.set_attribute("custody.audit_seq", record["seq"])
    entry.written = record
    return record


# The record's place in the chain, as it stands in the canonical JSON that is hashed: the
# database fills these in, under the lock. (A NUL character is removed from every value the
# record holds, so these can only be the placeholders themselves.)
_PLACES = (("prev_hash", "\x00P"), ("recorded_at", "\x00T"), ("seq", "\x00S"))


def _hashed_parts(chain: str, body: dict[str, Any]) -> list[str]:
    """The RFC 8785 canonical JSON of the record, split around the values of its place in the
    chain (previous hash, time, seq): what the database concatenates with them and hashes."""
    template = rfc8785.dumps({**body, "chain": chain, **{name: marker for name, marker in _PLACES}}).decode()
    parts: list[str] = []
    for name, marker in _PLACES:
        placeholder = json.dumps(name) + ":" + json.dumps(marker)
        before, found, template = template.partition(placeholder)
        if not found:
            raise AssertionError(f"the canonical record lost its {name} placeholder")
        parts.append(before + json.dumps(name) + ":")
    parts.append(template)
    return parts


async def _append_in_one_statement(session: AsyncSession, chain: str, body: dict[str, Any]) -> dict[str, Any] | None:
    """Append the record in one statement that locks the head, reads the clock, hashes the
    record and stores it; the lock is held from there to the caller's commit. None when the
    chain has no head row yet (nothing was written)."""
    parts = _hashed_parts(chain, body)
    row = (
        await run_sql(
            session, _APPEND, chain, parts[0], parts[1], parts[2], parts[3], json.dumps({**body, "chain": chain})
        )
    ).first()
    if row is None:
        return None
    record = {"seq": row.seq, "chain": chain, "recorded_at": row.recorded_at, **body, "prev_hash": row.prev_hash}
    record["hash"] = row.hash
    return record


async def _append_under_lock(session: AsyncSession, chain: str, body: dict[str, Any]) -> dict[str, Any]:
    """Append the record with the head locked by a statement of its own, creating the head row
    when the chain has none; the hash is computed here."""
    head = await lock_head(session, chain)
    record: dict[str, Any] = {
        "seq": head.seq + 1,
        "chain": _storable(chain),
        "recorded_at": head.clock,
        **body,
        "prev_hash": head.head_hash,
    }
    record["hash"] = record_hash(head.head_hash, record)
    await advance_head(session, head, record)
    return record


async def advance_head(session: AsyncSession, head: ChainHead, record: dict[str, Any]) -> None:
    """Store `record` (the one after `head`, hash included) and move the chain's head to it, in
    one statement; raises ChainHeadMoved, having stored nothing, if the head is no longer `head`."""
    stored = (
        await session.execute(
            _ADVANCE,
            {
                "head_chain": head.chain,
                "old_seq": head.seq,
                "old_hash": head.head_hash,
                "new_seq": record["seq"],
                "new_hash": record["hash"],
                "new_record": record,
            },
        )
    ).scalar_one_or_none()
    if stored is None:
        raise ChainHeadMoved(f"the head of audit chain {head.chain} moved from seq {head.seq} while locked")


async def lock_head(session: AsyncSession, chain: str) -> ChainHead:
    """The chain's head, locked FOR UPDATE until the caller's transaction ends, read fresh with
    the database's clock (taken once the lock is held, so times within a chain never go back).
    A chain with no head row yet gets one at seq 0."""
    row = (await session.execute(_LOCK, {"head_chain": chain})).first()
    if row is None:
        row = (await session.execute(_CREATE, {"head_chain": chain})).first()
        if row is None:  # another writer created it first: its row is committed now
            row = (await session.execute(_LOCK, {"head_chain": chain})).one()
    seq, head_hash, clock = row
    return ChainHead(chain, seq, head_hash, utc_instant(clock))


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
    """The one writer of audit records; holds the tracer (passed in, never the global one), the
    signer of checkpoints and export attestations, the retired keys verification still trusts, and
    the instruments it times appends with."""

    def __init__(
        self,
        tracer: Tracer,
        signer: AuditSigner | None = None,
        retired_keys: TrustedKeys | None = None,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.tracer = tracer
        self.signer = signer
        # Public keys of signing keys used before this one (CUSTODY_AUDIT_RETIRED_PUBLIC_KEYS):
        # what they signed still verifies, within each one's limit.
        self.retired_keys = retired_keys or TrustedKeys()
        self._metrics = metrics or Metrics.disabled()

    @property
    def trusted_keys(self) -> TrustedKeys | None:
        """The keys verification accepts: the signing key's own, then the retired ones; None
        when there are none (a chain with a checkpoint then fails verification)."""
        if self.signer is None and not len(self.retired_keys):
            return None
        current = TrustedKeys.of(self.signer.public_key) if self.signer is not None else TrustedKeys()
        return current | self.retired_keys

    async def _timed_append(
        self, session: AsyncSession, entry: AuditEntry, span: Span, outcome: str, reason: str | None
    ) -> dict[str, Any]:
        started = time.perf_counter()
        record = await _append(session, entry, span, outcome, reason)
        self._metrics.audit_appended(time.perf_counter() - started)
        return record

    @asynccontextmanager
    async def action(
        self, sessions: async_sessionmaker[AsyncSession], entry: AuditEntry
    ) -> AsyncIterator[tuple[AsyncSession, AuditEntry]]:
        """An audited unit of work: the caller's work and its success record in one transaction,
        or a failure record on its own."""
        with self._span(entry) as span:
            try:
                async with sessions.begin() as session:
                    yield session, entry
                    await self._timed_append(session, entry, span, "success", None)
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

    async def append(
        self, session: AsyncSession, entry: AuditEntry, *, outcome: str = "success", reason: str | None = None
    ) -> dict[str, Any]:
        """A record inside the caller's transaction (it commits or rolls back with it)."""
        with self._span(entry) as span:
            self._annotate(span, entry, outcome, reason)
            return await self._timed_append(session, entry, span, outcome, reason)

    async def record(
        self,
        sessions: async_sessionmaker[AsyncSession],
        entry: AuditEntry,
        *,
        outcome: str = "success",
        reason: str | None = None,
    ) -> dict[str, Any]:
        """A record with no other work attached (an authentication failure, a denial)."""
        with self._span(entry) as span:
            self._annotate(span, entry, outcome, reason)
            async with sessions.begin() as session:
                return await self._timed_append(session, entry, span, outcome, reason)

    @asynccontextmanager
    async def job(self, sessions: async_sessionmaker[AsyncSession], entry: AuditEntry) -> AsyncIterator[AuditEntry]:
        """A long job (a retention run) as one trace of its own: its span is the root, every record
        the job writes meanwhile is a child of it, and the job's own record (what it did, or why
        it failed) is written at the end under that root span, in a transaction of its own."""
        with self.tracer.start_as_current_span(
            f"custody.{entry.action}", context=Context(), record_exception=False, set_status_on_exception=False
        ) as span:
            try:
                yield entry
            except BaseException as exc:
                outcome, reason = outcome_of(exc)
                self._annotate(span, entry, outcome, reason)
                await asyncio.shield(self._record_failure(sessions, entry, outcome, reason, span))
                raise
            self._annotate(span, entry, "success", None)
            async with sessions.begin() as session:
                await self._timed_append(session, entry, span, "success", None)

    async def _record_failure(
        self, sessions: async_sessionmaker[AsyncSession], entry: AuditEntry, outcome: str, reason: str, span: Span
    ) -> None:
        async with sessions.begin() as session:
            await self._timed_append(session, entry, span, outcome, reason)

    def _span(self, entry: AuditEntry) -> AbstractContextManager[Span]:
        return self.tracer.start_as_current_span(
            f"custody.{entry.action}", record_exception=False, set_status_on_exception=False
        )

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
                    "operator": entry.operator,
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
