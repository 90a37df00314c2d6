"""Legal holds: while one is active on a tenant, a conversation or a data subject, nothing it
covers is purged or deleted, by anyone.

A hold names its scope by id (the tenant's, the conversation's) or, for a data subject, by the
keyed digest of the subject's identifier that Custody already keeps for each conversation: the
identifier itself is never stored. Placing and releasing a hold are audited in the transaction
that makes them (`legal_hold.place`, `legal_hold.release`); the reason is kept with the hold for
ops and never copied into audit records or spans.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, exists, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from .audit import AuditEntry, Auditor, RequestMeta
from .auth import Principal
from .errors import HoldNotFound, HoldReleased, InvalidInput
from .ids import is_conversation_id, is_id_of, new_id
from .models import Conversation, LegalHold

__all__ = ["HoldView", "active_hold", "held", "list_holds", "place_hold", "release_hold"]

SCOPES = ("tenant", "conversation", "subject")
_MAX_REASON = 500


@dataclass(frozen=True)
class HoldView:
    id: str
    scope: str
    conversation_id: str | None
    reason: str
    created_by: str
    created_at: datetime
    released_at: datetime | None
    released_by: str | None


def held(conversation: type[Conversation] = Conversation) -> ColumnElement[bool]:
    """A SQL condition: an active hold covers this conversation (its tenant, itself, or its subject)."""
    return exists().where(
        LegalHold.tenant_id == conversation.tenant_id,
        LegalHold.released_at.is_(None),
        or_(
            LegalHold.scope == "tenant",
            and_(LegalHold.scope == "conversation", LegalHold.conversation_id == conversation.id),
            and_(LegalHold.scope == "subject", LegalHold.subject_digest == conversation.subject_digest),
        ),
    )


async def active_hold(session: AsyncSession, conversation: Conversation) -> str | None:
    """The id of an active hold covering `conversation`, if any (the oldest)."""
    conditions = [
        LegalHold.scope == "tenant",
        and_(LegalHold.scope == "conversation", LegalHold.conversation_id == conversation.id),
    ]
    if conversation.subject_digest is not None:
        conditions.append(and_(LegalHold.scope == "subject", LegalHold.subject_digest == conversation.subject_digest))
    hold_id = await session.scalar(
        select(LegalHold.id)
        .where(LegalHold.tenant_id == conversation.tenant_id, LegalHold.released_at.is_(None), or_(*conditions))
        .order_by(LegalHold.created_at)
        .limit(1)
    )
    return hold_id


async def place_hold(
    auditor: Auditor,
    session: AsyncSession,
    principal: Principal,
    meta: RequestMeta | None,
    *,
    scope: str,
    reason: str,
    conversation_id: str | None = None,
    subject_digest: bytes | None = None,
    operator: str | None = None,
) -> HoldView:
    """Place a hold for the principal's tenant, audited in the caller's transaction."""
    if scope not in SCOPES:
        raise InvalidInput(f"scope must be one of {', '.join(SCOPES)}", pointer="/scope")
    reason = reason.strip()
    if not reason or len(reason) > _MAX_REASON:
        raise InvalidInput(f"a hold needs a reason of 1 to {_MAX_REASON} characters", pointer="/reason")
    if "\x00" in reason:
        # Postgres text cannot hold NUL; refused here rather than failing the insert.
        raise InvalidInput("a hold's reason cannot hold NUL characters", pointer="/reason")
    if scope == "conversation":
        if conversation_id is None or not is_conversation_id(conversation_id):
            raise InvalidInput("a conversation hold names a conversation id", pointer="/conversation_id")
        owned = await session.scalar(
            select(Conversation.id).where(
                Conversation.id == conversation_id, Conversation.tenant_id == principal.tenant_id
            )
        )
        if owned is None:
            raise InvalidInput("no such conversation for this tenant", pointer="/conversation_id")
    elif conversation_id is not None:
        raise InvalidInput("only a conversation hold names a conversation", pointer="/conversation_id")
    if scope == "subject" and subject_digest is None:
        raise InvalidInput("a subject hold names the subject", pointer="/subject")
    if scope != "subject" and subject_digest is not None:
        raise InvalidInput("only a subject hold names a subject", pointer="/subject")
    hold = LegalHold(
        id=new_id("hold"),
        tenant_id=principal.tenant_id,
        scope=scope,
        conversation_id=conversation_id if scope == "conversation" else None,
        subject_digest=subject_digest if scope == "subject" else None,
        reason=reason,
        created_by=operator or principal.key_id,
    )
    session.add(hold)
    await session.flush()
    await session.refresh(hold)
    await auditor.append(
        session,
        AuditEntry(
            "legal_hold.place",
            principal,
            meta,
            resource_type="legal_hold",
            resource_id=hold.id,
            details={"scope": scope, "conversation_id": hold.conversation_id},
            operator=operator,
        ),
    )
    return _view(hold)


async def release_hold(
    auditor: Auditor,
    session: AsyncSession,
    principal: Principal,
    meta: RequestMeta | None,
    hold_id: str,
    *,
    operator: str | None = None,
) -> HoldView:
    """Release one of the principal's tenant's active holds, audited in the caller's transaction.

    An unknown id (or another tenant's hold) is `HoldNotFound`; a hold released already is
    `HoldReleased`.
    """
    if not is_id_of("hold", hold_id):
        raise HoldNotFound(hold_id)
    hold = await session.scalar(
        select(LegalHold).where(LegalHold.id == hold_id, LegalHold.tenant_id == principal.tenant_id).with_for_update()
    )
    if hold is None:
        raise HoldNotFound(hold_id)
    if hold.released_at is not None:
        raise HoldReleased(hold.id)
    hold.released_at = await session.scalar(select(func.now()))
    hold.released_by = operator or principal.key_id
    await auditor.append(
        session,
        AuditEntry(
            "legal_hold.release",
            principal,
            meta,
            resource_type="legal_hold",
            resource_id=hold.id,
            details={"scope": hold.scope, "conversation_id": hold.conversation_id},
            operator=operator,
        ),
    )
    return _view(hold)


async def list_holds(session: AsyncSession, tenant_id: str, *, active_only: bool = False) -> list[HoldView]:
    query = select(LegalHold).where(LegalHold.tenant_id == tenant_id).order_by(LegalHold.created_at)
    if active_only:
        query = query.where(LegalHold.released_at.is_(None))
    return [_view(hold) for hold in await session.scalars(query)]


def _view(hold: LegalHold) -> HoldView:
    return HoldView(
        id=hold.id,
        scope=hold.scope,
        conversation_id=hold.conversation_id,
        reason=hold.reason,
        created_by=hold.created_by,
        created_at=hold.created_at,
        released_at=hold.released_at,
        released_by=hold.released_by,
    )
