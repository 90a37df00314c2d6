"""Deletion receipts: what was destroyed, when, and where it is on record, signed with the audit key.

A receipt is proof a backend (or an auditor, or a data subject's lawyer) can keep and check
offline: for each conversation, its id, how many steps it held, the KEK version its data key was
wrapped under, when its data key was destroyed, which copies the provider held were deleted and
which are still pending, and the seqs of the audit records of all of it. The audit signing key
(Ed25519, never in the database) signs the receipt's RFC 8785 form; `custody receipts verify`
checks one against the public key.

A receipt is owed before it is signed. The transaction that destroys a conversation writes the
receipt's row (unsigned) and an item naming what it destroyed, so no conversation is ever destroyed
without a receipt owed for it. The provider's copies are then asked for, outside that transaction
(they are remote calls), and the receipt is signed from what the database records: which copies
the ledger shows deleted, and the seqs of the audit records of the destruction and of every
deletion attempt. While it works, the deleting process holds the owed receipt as a turn holds its
conversation: `held_until`, on the database's clock, renewed every third of the turn lease. A
process that stops in between (killed, its host gone) stops renewing; once the hold has lapsed, the
next retention run claims the receipt, asks for the copies still held and signs it, marked
`recovered`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import attestation_valid, iso_now
from ..context import ServiceContext
from ..database_errors import database_unreachable
from ..ids import new_id
from ..models import AuditEvent, DeletionReceipt, ReceiptItem, UpstreamInteraction

__all__ = [
    "RECEIPT_FORMAT",
    "Destroyed",
    "Erased",
    "Kept",
    "OwedReceipt",
    "holding",
    "owing_receipt",
    "receipt_valid",
    "recover_receipt",
]

RECEIPT_FORMAT = "custody-deletion-receipt-v1"
logger = logging.getLogger("custody.receipts")


@dataclass(frozen=True)
class Destroyed:
    """One conversation destroyed: its data key first, then its rows, then the provider's copies."""

    conversation_id: str
    step_count: int
    data_key_version: int | None  # the KEK version its data key was wrapped under
    destroyed_at: str
    provider_copies_deleted: list[str] = field(default_factory=list)
    provider_copies_pending: list[str] = field(default_factory=list)
    audit_seqs: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Kept:
    """A conversation a request asked to erase that had to stay, and why."""

    conversation_id: str
    reason: str  # legal_hold | minimum_retention | turn_in_progress
    hold_id: str | None = None
    deletable_from: str | None = None


@dataclass(frozen=True)
class Erased:
    """What destroying one conversation destroyed, for its audit record and its receipt."""

    conversation_id: str
    data_classes: list[str]
    step_count: int
    data_key_version: int | None  # the KEK version its data key was wrapped under
    destroyed_at: str
    provider_copies: list[str]  # interaction ids the provider may still hold


@dataclass
class OwedReceipt:
    """A receipt this process owes and holds (see the module docstring) until it is signed."""

    ctx: ServiceContext
    receipt_id: str
    tenant_id: str
    chain: str
    cause: str
    recovered: bool = False
    document: dict[str, Any] | None = None  # the signed receipt, once it is

    async def record(self, session: AsyncSession, erased: Erased | None = None, *, action: str = "") -> None:
        """Write the owed row (if not yet written) and, if given, what was destroyed, in the
        caller's transaction: the one that destroys it, so the two commit together. `action` is
        the audit action that records the destruction (the receipt names that record)."""
        await session.execute(
            insert(DeletionReceipt)
            .values(
                id=self.receipt_id,
                tenant_id=self.tenant_id,
                chain=self.chain,
                cause=self.cause,
                held_until=_hold_expiry(self.ctx),
            )
            .on_conflict_do_nothing(index_elements=[DeletionReceipt.id])
        )
        if erased is not None:
            item = {
                "step_count": erased.step_count,
                "data_key_version": erased.data_key_version,
                "destroyed_at": erased.destroyed_at,
                "action": action,
                "provider_copies": erased.provider_copies,
            }
            session.add(ReceiptItem(receipt_id=self.receipt_id, conversation_id=erased.conversation_id, item=item))
        await session.flush()

    async def provider_copies(self) -> list[tuple[str, list[str]]]:
        """(conversation id, copies the ledger shows still held) for each conversation covered."""
        async with self.ctx.sessions() as session:
            held: list[tuple[str, list[str]]] = []
            for item in await self._items(session):
                copies = list(item.item["provider_copies"])
                still = await _still_held(session, copies)
                if still:
                    held.append((item.conversation_id, [c for c in copies if c in still]))
            return held

    async def sign(self, kept: Iterable[Kept] = (), *, session: AsyncSession | None = None) -> dict[str, Any] | None:
        """Sign the receipt from what the database records now and keep it, in `session`'s
        transaction if given (so that a record about the receipt commits with it), else in one of
        its own; None when nothing was recorded (the deletion was refused before it destroyed
        anything)."""
        if session is not None:
            return await self._sign_in(session, kept)
        async with self.ctx.sessions.begin() as own:
            return await self._sign_in(own, kept)

    async def _sign_in(self, session: AsyncSession, kept: Iterable[Kept]) -> dict[str, Any] | None:
        row = await session.scalar(
            select(DeletionReceipt).where(DeletionReceipt.id == self.receipt_id).with_for_update()
        )
        if row is None:
            return None
        if row.receipt is None:
            row.receipt = await self._signed(session, row, kept)
            row.issued_at = await session.scalar(select(func.now()))
            # The signed receipt now says all the items did.
            await session.execute(delete(ReceiptItem).where(ReceiptItem.receipt_id == self.receipt_id))
        self.document = row.receipt
        return row.receipt

    async def keep_held(self) -> None:
        """Extend the hold every third of the lease while the work goes on (cancel to stop)."""
        while True:
            await asyncio.sleep(self.ctx.turn_lease_seconds / 3)
            try:
                async with self.ctx.sessions.begin() as session:
                    await session.execute(
                        update(DeletionReceipt)
                        .where(DeletionReceipt.id == self.receipt_id, DeletionReceipt.receipt.is_(None))
                        .values(held_until=_hold_expiry(self.ctx))
                    )
            except Exception as exc:
                if not database_unreachable(exc):
                    raise
                logger.warning("receipt hold renewal failed (%s); retrying", type(exc).__name__)

    async def _signed(self, session: AsyncSession, row: DeletionReceipt, kept: Iterable[Kept]) -> dict[str, Any]:
        signer = self.ctx.auditor.signer
        if signer is None:
            raise RuntimeError("deletion receipts need the audit signing key")
        destroyed = [await self._destroyed(session, item) for item in await self._items(session)]
        payload: dict[str, Any] = {
            "format": RECEIPT_FORMAT,
            "receipt_id": row.id,
            "tenant_id": row.tenant_id,
            "audit_chain": row.chain,
            "cause": row.cause,
            "issued_at": iso_now(),
            "destroyed": [asdict(d) for d in destroyed],
            "kept": [asdict(k) for k in kept],
        }
        if self.recovered:
            # Signed by a retention run because the process that began the deletion stopped:
            # the copies it did not get to were asked for by the run, and a subject erasure
            # covers what was erased before it stopped (what it would have kept is not known).
            payload["recovered"] = True
        return signer.sign_payload(payload) | {"public_key": signer.public_pem()}

    async def _items(self, session: AsyncSession) -> list[ReceiptItem]:
        return list(
            await session.scalars(
                select(ReceiptItem)
                .where(ReceiptItem.receipt_id == self.receipt_id)
                .order_by(ReceiptItem.created_at, ReceiptItem.conversation_id)
            )
        )

    async def _destroyed(self, session: AsyncSession, item: ReceiptItem) -> Destroyed:
        copies = list(item.item["provider_copies"])
        pending = await _still_held(session, copies)
        # The seqs come from the chain itself, so a receipt signed after a crash names the
        # records of the attempts the stopped process made, as one signed at once does.
        matches = [
            AuditEvent.record.contains({"action": item.item["action"], "resource": {"id": item.conversation_id}}),
            *(AuditEvent.record.contains({"action": "upstream.delete", "resource": {"id": c}}) for c in copies),
        ]
        seqs = await session.scalars(
            select(AuditEvent.seq).where(AuditEvent.chain == self.chain, or_(*matches)).order_by(AuditEvent.seq)
        )
        return Destroyed(
            conversation_id=item.conversation_id,
            step_count=item.item["step_count"],
            data_key_version=item.item["data_key_version"],
            destroyed_at=item.item["destroyed_at"],
            provider_copies_deleted=[c for c in copies if c not in pending],
            provider_copies_pending=[c for c in copies if c in pending],
            audit_seqs=[int(seq) for seq in seqs],
        )


def _hold_expiry(ctx: ServiceContext) -> Any:
    # The database's own clock, as leases use: every replica agrees on when a hold lapsed.
    return func.now() + timedelta(seconds=ctx.turn_lease_seconds)


async def _still_held(session: AsyncSession, copies: list[str]) -> set[str]:
    if not copies:
        return set()
    return set(
        await session.scalars(
            select(UpstreamInteraction.id).where(
                UpstreamInteraction.id.in_(copies), UpstreamInteraction.deleted_at.is_(None)
            )
        )
    )


@asynccontextmanager
async def owing_receipt(ctx: ServiceContext, *, tenant_id: str, chain: str, cause: str) -> AsyncIterator[OwedReceipt]:
    """Owe a new receipt and hold it while the block runs; nothing is written until `record`."""
    owed = OwedReceipt(ctx, new_id("rcpt"), tenant_id, chain, cause)
    async with _held(owed):
        yield owed


async def recover_receipt(ctx: ServiceContext, tenant_id: str | None = None) -> OwedReceipt | None:
    """Claim the oldest owed receipt whose hold has lapsed (its process stopped), or None."""
    lapsed = (
        select(DeletionReceipt.id)
        .where(DeletionReceipt.receipt.is_(None), DeletionReceipt.held_until < func.now())
        .order_by(DeletionReceipt.created_at)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    if tenant_id is not None:
        lapsed = lapsed.where(DeletionReceipt.tenant_id == tenant_id)
    async with ctx.sessions.begin() as session:
        # Claimed by extending the hold: the subquery's SKIP LOCKED keeps two runs apart.
        claimed = (
            await session.execute(
                update(DeletionReceipt)
                .where(DeletionReceipt.id == lapsed.scalar_subquery())
                .values(held_until=_hold_expiry(ctx))
                .returning(DeletionReceipt.id, DeletionReceipt.tenant_id, DeletionReceipt.chain, DeletionReceipt.cause)
            )
        ).first()
    if claimed is None:
        return None
    return OwedReceipt(ctx, claimed.id, claimed.tenant_id, claimed.chain, claimed.cause, recovered=True)


@asynccontextmanager
async def holding(owed: OwedReceipt) -> AsyncIterator[OwedReceipt]:
    """Keep a claimed receipt held while the block runs."""
    async with _held(owed):
        yield owed


@asynccontextmanager
async def _held(owed: OwedReceipt) -> AsyncIterator[None]:
    renewal = asyncio.create_task(owed.keep_held())
    try:
        yield
    finally:
        renewal.cancel()
        try:
            await renewal
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # noqa: BLE001 - the deletion itself is done; a lapsed hold only lets a run sign it
            logger.warning("renewing a receipt's hold failed (%s)", type(exc).__name__)


def receipt_valid(document: Any, public_key: Ed25519PublicKey) -> bool:
    """Whether `document` is a receipt signed by `public_key`, unaltered."""
    if not isinstance(document, dict) or not isinstance(document.get("payload"), dict):
        return False
    if document["payload"].get("format") != RECEIPT_FORMAT:
        return False
    # The signature covers the payload as it was signed: a re-encoded file (keys reordered,
    # spacing changed) still verifies, any changed value does not.
    return bool(attestation_valid(json.loads(json.dumps(document)), public_key))
