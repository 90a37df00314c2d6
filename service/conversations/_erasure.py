"""Erasing a data subject (GDPR Art. 17): every conversation of the subject, under one receipt.

The subject is named by its identifier, which is only ever turned into its keyed digest (the one
each conversation keeps) to find the conversations; neither the identifier nor the digest goes
into any record, span, log line or answer. Each conversation is erased as a deletion is (data key
first, then rows, in its own audited `conversation.delete` transaction whose record says it was a
subject erasure; then the provider's copies), unless a legal hold covers it, its minimum
retention has not passed or a turn is waiting for the model: those stay, and the receipt lists
each with its reason. One receipt, signed with the audit key, covers them all; it is owed from the
start (a stopped erasure is signed by the next retention run, covering what went before it
stopped), and a `subject.erase` record, naming it and committed with it, counts what went and
what stayed.
"""

from __future__ import annotations

from collections import Counter

from sqlalchemy import select

from ..audit import AuditEntry, RequestMeta
from ..auth import Principal
from ..context import ServiceContext
from ..errors import ConversationNotFound, LegalHoldActive, MinimumRetention, TurnInProgress
from ..models import Conversation
from ._lifecycle import Deleted, erase_owned
from ._provider_copies import delete_provider_copies
from ._receipts import Kept, owing_receipt

__all__ = ["erase_subject"]

CAUSE = "subject_erasure"


async def erase_subject(ctx: ServiceContext, principal: Principal, meta: RequestMeta | None, subject: str) -> Deleted:
    """Erase every conversation of `subject` in the caller's tenant that may go now; returns what
    was destroyed, with the one signed receipt (its `kept` lists the conversations that stay).

    A conversation opened for the subject while this runs may be left out; erasing again finds
    it. A failure part-way (the database gone) is raised: what was erased before it has its
    `conversation.delete` records, and erasing again erases the rest under a receipt of its own.
    """
    digest = ctx.subject_digest(principal.tenant_id, subject)
    async with ctx.sessions() as session:
        found = list(
            await session.scalars(
                select(Conversation.id)
                .where(Conversation.tenant_id == principal.tenant_id, Conversation.subject_digest == digest)
                .order_by(Conversation.created_at, Conversation.id)
            )
        )
    kept: list[Kept] = []
    classes: set[str] = set()
    copies: list[str] = []
    async with owing_receipt(ctx, tenant_id=principal.tenant_id, chain=principal.tenant_id, cause=CAUSE) as owed:
        async with ctx.sessions.begin() as session:
            await owed.record(session)  # owed even when nothing can go: it then lists what stays
        for conversation_id in found:
            try:
                erased = await erase_owned(ctx, principal, meta, conversation_id, owed, details={"cause": CAUSE})
            except LegalHoldActive as exc:
                kept.append(Kept(conversation_id, "legal_hold", hold_id=exc.hold_id))
                continue
            except MinimumRetention as exc:
                kept.append(Kept(conversation_id, "minimum_retention", deletable_from=exc.deletable_from))
                continue
            except TurnInProgress:
                kept.append(Kept(conversation_id, "turn_in_progress"))
                continue
            except ConversationNotFound:
                continue  # deleted meanwhile (by its owner, or purged): nothing of it is left to erase
            await delete_provider_copies(ctx, principal, meta, conversation_id, erased.provider_copies)
            classes.update(erased.data_classes)
            copies.extend(erased.provider_copies)
        reasons = Counter(k.reason for k in kept)
        summary = AuditEntry(
            "subject.erase",
            principal,
            meta,
            resource_type="conversation",
            data_classes=sorted(classes),
            policy_version=ctx.policy.version,
            details={"kept": len(kept), "kept_reasons": dict(sorted(reasons.items()))},
        )
        # The receipt and the record that counts what it covers commit together.
        async with ctx.auditor.action(ctx.sessions, summary) as (session, summary):
            receipt = await owed.sign(kept, session=session)
            assert receipt is not None  # noqa: S101 - the owed row was recorded above
            destroyed = receipt["payload"]["destroyed"]
            summary.details |= {
                "erased": len(destroyed),
                "provider_copies_pending": sum(len(d["provider_copies_pending"]) for d in destroyed),
                "receipt_id": receipt["payload"]["receipt_id"],
            }
    return Deleted(sorted(classes), copies, receipt)
