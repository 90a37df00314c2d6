"""`/v1/conversations`: open, read, take turns on, read the history of, and delete conversations."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter

from ..audit import AuditEntry, RequestMeta
from ..auth import Principal
from ..context import ServiceContext
from ..conversations import delete_conversation, get_conversation, list_steps, open_conversation
from ..errors import InvalidInput
from ..ids import audited_conversation_id
from ..provider_copies import delete_provider_copies
from ..turns import TurnEngine
from .security import MAX_CURSOR, provide_meta, require_role
from .wire import ConversationCreate, ConversationOut, HistoryOut, HistoryStep, TurnCreate, TurnOut

__all__ = ["ConversationController"]

logger = logging.getLogger("custody.api")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")


def _ctx(request: Request[Any, Any, Any]) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


class ConversationController(Controller):
    path = "/v1/conversations"
    tags = ["conversations"]
    dependencies = {"principal": Provide(require_role("backend")), "meta": Provide(provide_meta)}

    @post("/", operation_id="CreateConversation", status_code=201)
    async def create(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ConversationCreate],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> ConversationOut:
        """Open a conversation on a policy route, declaring the data classes it carries."""
        ctx = _ctx(request)
        entry = AuditEntry(
            "conversation.create", principal, meta, resource_type="conversation", policy_version=ctx.policy.version
        )
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            view = await open_conversation(
                session,
                ctx,
                principal,
                route=data.route,
                data_classes=data.data_classes,
                subject=data.subject,
                metadata=data.metadata,
            )
            # Only now are the route and classes known to be policy names rather than client text.
            entry.resource_id, entry.data_classes = view.id, view.data_classes
            entry.details["route"] = view.route
        return msgspec.convert(view, ConversationOut, from_attributes=True)

    @get("/{conversation_id:str}", operation_id="GetConversation")
    async def read(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> ConversationOut:
        """A conversation's metadata (route, data classes, counts); never its content."""
        ctx = _ctx(request)
        entry = AuditEntry(
            "conversation.read",
            principal,
            meta,
            resource_type="conversation",
            resource_id=audited_conversation_id(conversation_id),
        )
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            view = await get_conversation(session, ctx, principal, conversation_id)
            entry.data_classes, entry.policy_version = view.data_classes, view.policy_version
        return msgspec.convert(view, ConversationOut, from_attributes=True)

    @post("/{conversation_id:str}/turns", operation_id="CreateTurn", status_code=200)
    async def turn(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        data: JSONBody[TurnCreate],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        idempotency_key: Annotated[str | None, HeaderParameter(name="Idempotency-Key", required=False)] = None,
    ) -> TurnOut:
        """Send the next input; the whole history is replayed to the model with store=false."""
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise InvalidInput("Idempotency-Key must be 1 to 255 visible ASCII characters", pointer="Idempotency-Key")
        result = await TurnEngine(_ctx(request)).run(
            principal, meta, conversation_id, data.input, idempotency_key, input_bytes=len(await request.body())
        )
        return msgspec.convert(result, TurnOut)

    @get("/{conversation_id:str}/steps", operation_id="ListSteps")
    async def steps(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        cursor: Annotated[int, QueryParameter(ge=0, le=MAX_CURSOR)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 100,
    ) -> HistoryOut:
        """The decrypted history in order, `limit` steps from position `cursor`."""
        ctx = _ctx(request)
        entry = AuditEntry(
            "history.read",
            principal,
            meta,
            resource_type="conversation",
            resource_id=audited_conversation_id(conversation_id),
            details={"cursor": cursor, "limit": limit},
        )
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            page = await list_steps(session, ctx, principal, conversation_id, cursor=cursor, limit=limit)
            entry.data_classes = page.data_classes
            entry.details["steps"] = len(page.steps)
        return HistoryOut(
            conversation_id=conversation_id,
            next_cursor=page.next_cursor,
            steps=[HistoryStep(position=p, turn_id=t, step=s) for p, t, s in page.steps],
        )

    @delete("/{conversation_id:str}", operation_id="DeleteConversation", status_code=204)
    async def remove(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> None:
        """Crypto-shred the conversation, delete its rows, then delete any provider copies."""
        ctx = _ctx(request)
        entry = AuditEntry(
            "conversation.delete",
            principal,
            meta,
            resource_type="conversation",
            resource_id=audited_conversation_id(conversation_id),
        )
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            deleted = await delete_conversation(session, principal, conversation_id)
            entry.data_classes = deleted.data_classes
            entry.details["provider_copies"] = len(deleted.provider_copies)
        await delete_provider_copies(ctx, principal, meta, conversation_id, deleted.provider_copies)
