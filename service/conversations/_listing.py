"""Listing a tenant's conversations, all of them or one data subject's: metadata only.

A listing never opens a conversation's data key: it shows what the rows say in the clear (route,
data classes, counts, times and retention deadlines), never the sealed subject or metadata. A
subject is named by its identifier, which is only turned into its keyed digest; the audit record
says whether the listing was by subject, never which.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select

from ..audit import AuditEntry, RequestMeta
from ..auth import Principal
from ..context import ServiceContext
from ..errors import InvalidInput
from ..ids import is_conversation_id
from ..models import Conversation

__all__ = ["ConversationPage", "ConversationSummary", "list_conversations"]


@dataclass(frozen=True)
class ConversationSummary:
    """A conversation as a listing shows it: no subject, no metadata, no content."""

    id: str
    route: str
    data_classes: list[str]
    policy_version: str
    turn_count: int
    step_count: int
    created_at: datetime
    updated_at: datetime
    keep_until: datetime | None  # no deletion before it (minimum retention)
    purge_at: datetime | None  # the retention runner purges it from then on (None: never)


@dataclass(frozen=True)
class ConversationPage:
    conversations: list[ConversationSummary]
    next_cursor: str | None  # the id to pass as `cursor` for the next page; None after the last


async def list_conversations(
    ctx: ServiceContext,
    principal: Principal,
    meta: RequestMeta | None,
    *,
    subject: str | None,
    cursor: str | None,
    limit: int,
) -> ConversationPage:
    """`limit` of the caller's conversations (only `subject`'s, when given) in id order, after
    the conversation `cursor` names (which need not exist any more); one audited read."""
    if subject is not None and not subject:
        raise InvalidInput("subject must not be empty", pointer="subject")
    if cursor is not None and not is_conversation_id(cursor):
        raise InvalidInput("cursor must be a conversation id (conv_…), as `next_cursor` gives", pointer="cursor")
    entry = AuditEntry(
        "conversation.list",
        principal,
        meta,
        resource_type="conversation",
        details={"by_subject": subject is not None, "cursor": cursor, "limit": limit},
    )
    query = select(Conversation).where(Conversation.tenant_id == principal.tenant_id)
    if subject is not None:
        query = query.where(Conversation.subject_digest == ctx.subject_digest(principal.tenant_id, subject))
    if cursor is not None:
        query = query.where(Conversation.id > cursor)
    async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
        rows = list(await session.scalars(query.order_by(Conversation.id).limit(limit + 1)))
        page, more = rows[:limit], len(rows) > limit
        entry.details["returned"] = len(page)
        entry.data_classes = sorted({c for row in page for c in row.data_classes})
    return ConversationPage([_summary(row) for row in page], page[-1].id if more else None)


def _summary(conversation: Conversation) -> ConversationSummary:
    return ConversationSummary(
        id=conversation.id,
        route=conversation.route,
        data_classes=list(conversation.data_classes),
        policy_version=conversation.policy_version,
        turn_count=conversation.turn_count,
        step_count=conversation.step_count,
        created_at=conversation.created_at,
        updated_at=conversation.updated_at,
        keep_until=conversation.keep_until,
        purge_at=conversation.purge_at,
    )
