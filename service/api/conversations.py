"""`/v1/conversations`: open, read, take turns on, read the history of, and delete conversations."""

from __future__ import annotations

import logging
import re
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.di import Provide
from litestar.params import Parameter
from sqlalchemy import func, update

from ..auth import Principal
from ..context import ServiceContext
from ..conversations import (delete_conversation, get_conversation, list_steps, open_conversation)
from ..errors import InvalidInput
from ..models import UpstreamInteraction
from ..turns import TurnEngine
from .security import require_role
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
    dependencies = {"principal": Provide(require_role("backend"))}

    @post("/", operation_id="CreateConversation", status_code=201)
    async def create(self, request: Request[Any, Any, Any], data: ConversationCreate, principal: Principal) -> ConversationOut:
        """Open a conversation on a policy route, declaring the data classes it carries."""
        ctx = _ctx(request)
        async with ctx.sessions.begin() as session:
            view = await open_conversation(session, ctx, principal, route=data.route, data_classes=data.data_classes,
                                           subject=data.subject, metadata=data.metadata)
        return msgspec.convert(view, ConversationOut, from_attributes=True)

    @get("/{conversation_id:str}", operation_id="GetConversation")
    async def read(self, request: Request[Any, Any, Any], conversation_id: str, principal: Principal) -> ConversationOut:
        """A conversation's metadata (route, data classes, counts); never its content."""
        ctx = _ctx(request)
        async with ctx.sessions.begin() as session:
            view = await get_conversation(session, ctx, principal, conversation_id)
        return msgspec.convert(view, ConversationOut, from_attributes=True)

    @post("/{conversation_id:str}/turns", operation_id="CreateTurn", status_code=200)
    async def turn(
        self, request: Request[Any, Any, Any], conversation_id: str, data: TurnCreate, principal: Principal,
        idempotency_key: Annotated[str | None, Parameter(header="Idempotency-Key", required=False)] = None,
    ) -> TurnOut:
        """Send the next input; the whole history is replayed to the model with store=false."""
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.match(idempotency_key):
            raise InvalidInput("Idempotency-Key must be 1 to 255 visible ASCII characters", pointer="Idempotency-Key")
        result = await TurnEngine(_ctx(request)).run(principal, conversation_id, data.input, idempotency_key)
        return msgspec.convert(result, TurnOut)

    @get("/{conversation_id:str}/steps", operation_id="ListSteps")
    async def steps(
        self, request: Request[Any, Any, Any], conversation_id: str, principal: Principal,
        cursor: Annotated[int, Parameter(ge=0)] = 0,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 100,
    ) -> HistoryOut:
        """The decrypted history in order, `limit` steps from position `cursor`."""
        ctx = _ctx(request)
        async with ctx.sessions.begin() as session:
            page = await list_steps(session, ctx, principal, conversation_id, cursor=cursor, limit=limit)
        return HistoryOut(conversation_id=conversation_id, next_cursor=page.next_cursor,
                          steps=[HistoryStep(position=p, turn_id=t, step=s) for p, t, s in page.steps])

    @delete("/{conversation_id:str}", operation_id="DeleteConversation", status_code=204)
    async def remove(self, request: Request[Any, Any, Any], conversation_id: str, principal: Principal) -> None:
        """Crypto-shred the conversation, delete its rows, then delete any provider copies."""
        ctx = _ctx(request)
        async with ctx.sessions.begin() as session:
            provider_copies = await delete_conversation(session, principal, conversation_id)
        for interaction_id in provider_copies:
            await _delete_provider_copy(ctx, interaction_id)


async def _delete_provider_copy(ctx: ServiceContext, interaction_id: str) -> None:
    """Ask the provider to delete its copy; a failure stays in the ledger for the retention run."""
    error: str | None = None
    try:
        await ctx.upstream.delete(interaction_id)
    except Exception as exc:  # noqa: BLE001 - any failure is retried later, and named only by type
        error = type(exc).__name__
        logger.warning("provider copy %s not deleted yet (%s)", interaction_id, error)
    async with ctx.sessions.begin() as session:
        values: dict[str, Any] = {"delete_attempts": UpstreamInteraction.delete_attempts + 1, "last_error": error}
        if error is None:
            values["deleted_at"] = func.now()
        await session.execute(update(UpstreamInteraction).where(UpstreamInteraction.id == interaction_id).values(**values))
