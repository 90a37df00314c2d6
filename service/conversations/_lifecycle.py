"""A conversation's lifecycle: opened, read, its history read, deleted.

Each public function is one audited unit of work (`Auditor.action`): the action and its audit
record commit in one transaction, or a record of the refusal or failure is written instead. The
HTTP layer calls them, and so can any other caller (a retention runner, say): deletion in
particular happens in one place, data key first, then rows, then the provider's copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditEntry, RequestMeta, utc_instant
from ..auth import Principal
from ..context import ServiceContext
from ..database import database_now
from ..errors import ConversationNotFound, InvalidInput, LegalHoldActive, MinimumRetention, TurnInProgress
from ..ids import audited_conversation_id, is_conversation_id, new_id
from ..leases import close_abandoned
from ..legal_holds import active_hold
from ..models import Conversation, IdempotencyRecord, Step, Turn, UpstreamInteraction
from ..policy import check_data_classes
from ._data_keys import create_cipher, load_cipher
from ._deadlines import rule_values
from ._history import decode_json, read_steps, shred_data_key
from ._provider_copies import delete_provider_copies
from ._receipts import Erased, OwedReceipt, owing_receipt

__all__ = [
    "ConversationView",
    "Deleted",
    "HistoryPage",
    "check_deletable",
    "delete_conversation",
    "erase",
    "erase_owned",
    "read_conversation",
    "read_history",
    "open_conversation",
    "owned_conversation",
]

_PROFILE = "profile"


@dataclass(frozen=True)
class ConversationView:
    """A conversation's metadata: never its content."""

    id: str
    route: str
    data_classes: list[str]
    subject: str | None
    metadata: dict[str, Any]
    policy_version: str
    turn_count: int
    step_count: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class HistoryPage:
    steps: list[tuple[int, str, Any]]  # (position, turn id, step)
    next_cursor: int | None
    data_classes: list[str]


@dataclass(frozen=True)
class Deleted:
    data_classes: list[str]
    provider_copies: list[str]  # upstream interaction ids the provider held
    receipt: dict[str, Any]  # the signed deletion receipt


async def owned_conversation(
    session: AsyncSession, principal: Principal, conversation_id: str, *, lock: bool = False
) -> Conversation:
    """The caller's conversation; another tenant's is indistinguishable from a missing one."""
    if not is_conversation_id(conversation_id):
        raise ConversationNotFound(conversation_id)
    query = select(Conversation).where(
        Conversation.id == conversation_id, Conversation.tenant_id == principal.tenant_id
    )
    if lock:
        query = query.with_for_update()
    conversation = await session.scalar(query)
    if conversation is None:
        raise ConversationNotFound(conversation_id)
    return conversation


async def open_conversation(
    ctx: ServiceContext,
    principal: Principal,
    meta: RequestMeta,
    *,
    route: str,
    data_classes: list[str],
    subject: str | None,
    metadata: dict[str, Any] | None,
) -> ConversationView:
    entry = AuditEntry(
        "conversation.create", principal, meta, resource_type="conversation", policy_version=ctx.policy.version
    )
    async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
        route_policy = ctx.policy.route(route)
        classes = sorted(set(data_classes))
        if not classes:
            raise InvalidInput("declare at least one data class", pointer="/data_classes")
        check_data_classes(route_policy, classes, ctx.policy.data_classes)
        conversation_id = new_id("conv")
        # The conversation row goes first: the data key row refers to it.
        conversation = Conversation(
            id=conversation_id,
            tenant_id=principal.tenant_id,
            route=route,
            data_classes=classes,
            subject_digest=ctx.subject_digest(principal.tenant_id, subject) if subject else None,
            profile=b"",
            profile_key_version=0,
            policy_version=ctx.policy.version,
            step_count=0,
            turn_count=0,
            **rule_values(
                ctx.policy.retention_for(route, classes),
                ctx.policy.version,
                created=func.now(),
                last_activity=func.now(),
            ),
        )
        session.add(conversation)
        await session.flush()
        cipher = await create_cipher(session, ctx, principal.tenant_id, conversation_id)
        conversation.profile = cipher.seal_record(_PROFILE, 0, {"subject": subject, "metadata": metadata or {}})
        conversation.profile_key_version = cipher.key_version
        await session.flush()
        await session.refresh(conversation)
        # Only now are the route and classes known to be policy names rather than client text.
        entry.resource_id, entry.data_classes = conversation_id, classes
        entry.details["route"] = route
        return _view(conversation, subject, metadata or {})
    raise AssertionError("unreachable")  # the audited block returns or raises


async def read_conversation(
    ctx: ServiceContext, principal: Principal, meta: RequestMeta, conversation_id: str
) -> ConversationView:
    entry = AuditEntry(
        "conversation.read",
        principal,
        meta,
        resource_type="conversation",
        resource_id=audited_conversation_id(conversation_id),
    )
    async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
        conversation = await owned_conversation(session, principal, conversation_id)
        cipher = await load_cipher(session, ctx, conversation)
        profile = cipher.open_record(_PROFILE, 0, conversation.profile_key_version, conversation.profile)
        entry.data_classes, entry.policy_version = list(conversation.data_classes), conversation.policy_version
        return _view(conversation, profile["subject"], profile["metadata"])
    raise AssertionError("unreachable")


async def read_history(
    ctx: ServiceContext,
    principal: Principal,
    meta: RequestMeta,
    conversation_id: str,
    *,
    cursor: int,
    limit: int,
) -> HistoryPage:
    entry = AuditEntry(
        "history.read",
        principal,
        meta,
        resource_type="conversation",
        resource_id=audited_conversation_id(conversation_id),
        details={"cursor": cursor, "limit": limit},
    )
    async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
        conversation = await owned_conversation(session, principal, conversation_id)
        cipher = await load_cipher(session, ctx, conversation)
        steps = [
            (position, turn_id, decode_json(step))
            for position, turn_id, step in await read_steps(session, cipher, start=cursor, limit=limit)
        ]
        following = steps[-1][0] + 1 if steps else None
        more = following is not None and following < conversation.step_count
        entry.data_classes = list(conversation.data_classes)
        entry.details["steps"] = len(steps)
        return HistoryPage(steps, following if more else None, list(conversation.data_classes))
    raise AssertionError("unreachable")


async def delete_conversation(
    ctx: ServiceContext, principal: Principal, meta: RequestMeta | None, conversation_id: str
) -> Deleted:
    """Delete one of the caller's conversations: data key first, then rows (one audited
    transaction, which also owes the receipt), then every copy the provider still holds (each
    attempt audited; a failure stays on the ledger to be retried); returns what was destroyed,
    with its signed receipt.

    Refused while a turn waits for the model (409), while a legal hold covers the conversation
    (409 naming the hold) and before its minimum retention has passed (409 with the date).
    """
    async with owing_receipt(ctx, tenant_id=principal.tenant_id, chain=principal.tenant_id, cause="deletion") as owed:
        erased = await erase_owned(ctx, principal, meta, conversation_id, owed)
        await delete_provider_copies(ctx, principal, meta, conversation_id, erased.provider_copies)
        receipt = await owed.sign()
    assert receipt is not None  # noqa: S101 - erase_owned recorded the item, or raised
    return Deleted(erased.data_classes, erased.provider_copies, receipt)


async def erase_owned(
    ctx: ServiceContext,
    principal: Principal,
    meta: RequestMeta | None,
    conversation_id: str,
    receipt: OwedReceipt,
    *,
    details: dict[str, Any] | None = None,
) -> Erased:
    """Erase one of the caller's conversations (data key first, then rows) in one audited
    `conversation.delete` transaction, if `check_deletable` allows it, recording it for `receipt`
    in the same transaction; `details` go into its record (a subject erasure says so). The
    provider's copies are the caller's to delete next."""
    entry = AuditEntry(
        "conversation.delete",
        principal,
        meta,
        resource_type="conversation",
        resource_id=audited_conversation_id(conversation_id),
        details=dict(details or {}),
    )
    async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
        conversation = await owned_conversation(session, principal, conversation_id, lock=True)
        await check_deletable(ctx, session, conversation)
        erased = await erase(session, conversation)
        ctx.data_keys.drop(conversation.id)
        await receipt.record(session, erased, action=entry.action)
        entry.data_classes = erased.data_classes
        entry.details["provider_copies"] = len(erased.provider_copies)
    return erased


async def check_deletable(ctx: ServiceContext, session: AsyncSession, conversation: Conversation) -> None:
    """Refuse (409) to delete a conversation a turn holds, a legal hold covers, or whose minimum
    retention has not passed; close a turn whose holder died, with its outcome on record."""
    now = await database_now(session)
    if conversation.lease_token and conversation.lease_expires_at and conversation.lease_expires_at > now:
        # A turn is waiting for the model; deleting now would let its reply (and, with provider
        # storage, its provider copy) land after the erasure. The caller retries when it ends.
        raise TurnInProgress(conversation.id)
    if conversation.lease_token:
        await close_abandoned(ctx.auditor, session, conversation, closed_by="deletion")
    if (hold_id := await active_hold(session, conversation)) is not None:
        raise LegalHoldActive(hold_id)
    if conversation.keep_until is not None:
        deadline_now = await session.scalar(select(ctx.clock.now()))
        if deadline_now is not None and conversation.keep_until > deadline_now:
            raise MinimumRetention(utc_instant(conversation.keep_until))


async def erase(session: AsyncSession, conversation: Conversation) -> Erased:
    """Shred the data key, then delete the rows, of a conversation the caller holds locked.

    The order matters for backups and replicas: once the key row is gone, any copy of the step
    rows that survives elsewhere is ciphertext nobody can open.
    """
    key_version = await shred_data_key(session, conversation.id)
    destroyed_at = utc_instant(await database_now(session))
    await session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.conversation_id == conversation.id))
    await session.execute(delete(Step).where(Step.conversation_id == conversation.id))
    await session.execute(delete(Turn).where(Turn.conversation_id == conversation.id))
    await session.delete(conversation)
    stored = await session.scalars(
        select(UpstreamInteraction.id).where(
            UpstreamInteraction.conversation_id == conversation.id,
            UpstreamInteraction.stored.is_(True),
            UpstreamInteraction.deleted_at.is_(None),
        )
    )
    return Erased(
        conversation.id,
        list(conversation.data_classes),
        conversation.step_count,
        key_version,
        destroyed_at,
        list(stored),
    )


def _view(conversation: Conversation, subject: str | None, metadata: dict[str, Any]) -> ConversationView:
    return ConversationView(
        id=conversation.id,
        route=conversation.route,
        data_classes=list(conversation.data_classes),
        subject=subject,
        metadata=metadata,
        policy_version=conversation.policy_version,
        turn_count=conversation.turn_count,
        step_count=conversation.step_count,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
    )
