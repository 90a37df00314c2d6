"""`/v1/conversations`: open, list, read, take turns on, read the history of, and delete conversations."""

from __future__ import annotations

import logging
import re
from types import MappingProxyType
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, JSONBody, QueryParameter
from litestar.response import Stream

from ..audit import RequestMeta
from ..auth import Principal
from ..context import ServiceContext
from ..conversations import (
    delete_conversation,
    list_conversations,
    open_conversation,
    read_conversation,
    read_history,
)
from ..errors import InvalidInput
from ..ids import id_pattern
from ..turns import BackgroundTurns, StreamingTurns, TurnEngine, TurnRequest, TurnView
from .security import provide_meta, require_role
from .streaming import LAST_EVENT_ID, event_stream, wants_event_stream
from .wire import (
    AUTHENTICATED,
    ApiOperation,
    ConversationCreate,
    ConversationOut,
    ConversationsOut,
    ConversationSummaryOut,
    DeletionReceiptOut,
    HistoryOut,
    HistoryStep,
    TurnCreate,
    TurnOut,
    TurnStatusOut,
    problem_responses,
)

__all__ = ["ConversationController"]

logger = logging.getLogger("custody.api")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,255}$")
# A number of seconds, in plain decimal (no exponent, sign or spaces).
_SECONDS = re.compile(r"^[0-9]{1,6}(?:\.[0-9]{1,3})?$")
# A step's position is a Postgres `integer`: a cursor past it names no step, and the driver
# refuses to send it (that was a 500), so it is refused as malformed like any cursor out of range.
MAX_STEP_POSITION = 2**31 - 1


def _ctx(request: Request[Any, Any, Any]) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def _status_out(view: TurnView) -> TurnStatusOut:
    return TurnStatusOut(
        conversation_id=view.conversation_id,
        turn_id=view.turn_id,
        turn_number=view.turn_number,
        status=view.status,
        error_code=view.error_code,
        background=view.background,
        result=TurnOut.of(view.result) if view.result is not None else None,
    )


class ConversationController(Controller):
    path = "/v1/conversations"
    # Immutable class attributes: Litestar copies them into each router it registers the controller on.
    tags = ("conversations",)
    dependencies = MappingProxyType({"principal": Provide(require_role("backend")), "meta": Provide(provide_meta)})
    security = ({"bearerAuth": []},)

    @post(
        "/",
        operation_id="CreateConversation",
        status_code=201,
        summary="Open a conversation",
        operation_class=ApiOperation,
        responses=problem_responses(
            400,
            413,
            *AUTHENTICATED,
            notes={
                422: "The route or a data class is not in the policy, the route does not allow a declared class, "
                "or no class is declared (`detail` lists the known names).",
            },
        ),
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[ConversationCreate],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> ConversationOut:
        """Open a conversation on a route of the policy, declaring the data classes it will carry.

        The subject (the data subject's identifier, such as a patient id) and the metadata are
        stored encrypted; the subject also gets a keyed digest, for retention and erasure requests.
        """
        view = await open_conversation(
            _ctx(request),
            principal,
            meta,
            route=data.route,
            data_classes=data.data_classes,
            subject=data.subject,
            metadata=data.metadata,
        )
        return msgspec.convert(view, ConversationOut, from_attributes=True)

    @get(
        "/",
        operation_id="ListConversations",
        summary="List conversations",
        operation_class=ApiOperation,
        responses=problem_responses(400, *AUTHENTICATED),
    )
    async def index(
        self,
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        subject: Annotated[
            str | None,
            QueryParameter(
                min_length=1,
                description="Only this data subject's conversations (the identifier they were opened with); only "
                "its keyed digest is used, and it is never logged or recorded.",
            ),
        ] = None,
        cursor: Annotated[
            str | None,
            QueryParameter(
                pattern=id_pattern("conv"),
                description="The `next_cursor` of the previous page; the first page without it.",
            ),
        ] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 100,
    ) -> ConversationsOut:
        """The tenant's conversations, or one data subject's, in id order, `limit` at a time: each
        one's route, data classes, policy version, turn and step counts, times and retention
        deadlines (`keep_until`, `purge_at`). Never the subject, the metadata or any content.

        `next_cursor` is the `cursor` of the next page, or null after the last conversation.
        """
        page = await list_conversations(_ctx(request), principal, meta, subject=subject, cursor=cursor, limit=limit)
        return ConversationsOut(
            conversations=[ConversationSummaryOut.of(c) for c in page.conversations], next_cursor=page.next_cursor
        )

    @get(
        "/{conversation_id:str}",
        operation_id="GetConversation",
        summary="Read a conversation's metadata",
        operation_class=ApiOperation,
        responses=problem_responses(404, *AUTHENTICATED),
    )
    async def read(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> ConversationOut:
        """A conversation's metadata (route, data classes, subject, metadata, counts); never its content."""
        view = await read_conversation(_ctx(request), principal, meta, conversation_id)
        return msgspec.convert(view, ConversationOut, from_attributes=True)

    @post(
        "/{conversation_id:str}/turns",
        operation_id="CreateTurn",
        status_code=200,
        summary="Take a turn",
        operation_class=ApiOperation,
        responses=problem_responses(
            400,
            404,
            502,
            504,
            *AUTHENTICATED,
            notes={
                413: "The request body is larger than the configured limit (`payload-too-large`), or a media block "
                "or the input's media together are larger than the route takes (`media-too-large`, `pointer` says "
                "which); nothing is stored or sent.",
                415: "A media block of a type the route does not take (`media-type-not-allowed`; a route without "
                "`media` in the policy takes none); nothing is stored or sent.",
                409: "Another turn holds the conversation, or the first request with this Idempotency-Key is still "
                "running; retry when it ends.",
                422: "The input is empty or in a shape a client may not send, a function result answers no pending "
                "call, the Idempotency-Key is malformed or was used with a different request, the input "
                "carries a data class the route does not allow, or the conversation's route has left the policy "
                "(`pointer` says where). `data-class-blocked`: the detectors found a class the route blocks "
                "(`on_detect: block`); `card-security-code`: the input carries a card security code next to a "
                "card number, refused on every route. Both name the classes in `data_classes`, and nothing of "
                "the turn is stored or sent to the model. `background-not-permitted`: a background turn was asked "
                "for where the route does not permit background turns or provider storage is not permitted (the "
                "route's or a data class's policy); nothing is stored or sent. `media-uri-not-allowed`: a media "
                "block by `uri` the route does not take.",
                503: "The database cannot be reached right now; a model reply already received is stored as soon "
                "as it is back: retry after `Retry-After` seconds with the same Idempotency-Key. Or "
                "`upstream-failed`: the model service is overloaded or failing for now (its own 429 or 503, named "
                "in `upstream_status`, or Custody's circuit breaker is open, `code: upstream_circuit_open`); retry "
                "after `Retry-After` seconds when given.",
            },
        )
        | {
            # Said here: the handler's return type names both bodies, which would document 200 as either.
            200: ResponseSpec(TurnOut, description="Request fulfilled, document follows", generate_examples=False),
            202: ResponseSpec(
                TurnStatusOut,
                description="A background turn (`background: true`) was started: `status` is `in_progress` (or, "
                "for a repeated Idempotency-Key, the first turn's outcome) and `Location` is the turn to poll.",
                generate_examples=False,
            ),
        },
    )
    async def turn(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        data: JSONBody[TurnCreate],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        idempotency_key: Annotated[
            str | None,
            HeaderParameter(
                name="Idempotency-Key",
                required=False,
                description="Resending with the same key returns the first answer instead of taking a second turn.",
                # Documentation only: the handler checks it, and answers 422 (not 400) when it is wrong.
                schema_extra={"pattern": _IDEMPOTENCY_KEY.pattern},
            ),
        ] = None,
        request_timeout: Annotated[
            str | None,
            HeaderParameter(
                name="Request-Timeout",
                required=False,
                description="Seconds the caller will wait for the model: the model call (every attempt, and the "
                "waits between them) ends by then with 504. Capped by the service's own deadline "
                "(CUSTODY_TURN_DEADLINE_SECONDS).",
                # Documentation only: the handler checks it, and answers 422 when it is wrong.
                schema_extra={"pattern": _SECONDS.pattern},
            ),
        ] = None,
    ) -> TurnOut | Response[TurnStatusOut] | Stream:
        """Send the next input; the whole history is replayed to the model with store=false.

        A reply the model did not complete answers 200 with `status: failed` and stores nothing; a
        model call that still fails after Custody's retries answers 502, 503 when the model
        service is overloaded or failing for now (its 429 or 503, or Custody's circuit breaker is
        open; `Retry-After` when known), or 504 when it timed out or the turn's deadline passed;
        `upstream_status` names the model service's own status when it gave one.
        Resend with the same Idempotency-Key to get the first answer again, not a second turn.

        With `background: true` (where the route permits it and provider storage is permitted), the
        model runs the turn in the background (`store=true`): the answer is 202 at once, with the
        turn's id and a `Location` to poll (`GET .../turns/{turn_id}`). Custody polls the model and
        stores its answer as it stores a foreground turn's; until then the conversation refuses new
        turns (409), and `POST .../turns/{turn_id}/cancel` stops it.

        With `Accept: text/event-stream` (and no `background`), the answer is the model's progress as
        Server-Sent Events while it works, and Custody stores the complete turn when the model has
        finished, exactly as it stores one answered as JSON (refusals are still problem+json, before
        any event). A client that goes away loses nothing: the turn is stored all the same, and
        `GET .../turns/{turn_id}/events` gives its events again.
        """
        if idempotency_key is not None and not _IDEMPOTENCY_KEY.fullmatch(idempotency_key):
            raise InvalidInput("Idempotency-Key must be 1 to 255 visible ASCII characters", pointer="Idempotency-Key")
        timeout = None
        if request_timeout is not None:
            if not _SECONDS.fullmatch(request_timeout) or not 0 < float(request_timeout) <= 86_400:
                raise InvalidInput(
                    "Request-Timeout must be a number of seconds above 0 and at most 86400", pointer="Request-Timeout"
                )
            timeout = float(request_timeout)
        turn = TurnRequest(
            principal,
            meta,
            conversation_id,
            data.input,
            idempotency_key,
            input_bytes=len(await request.body()),
            timeout_seconds=timeout,
        )
        if not data.background and wants_event_stream(request.headers.get("accept")):
            return event_stream((await StreamingTurns(_ctx(request)).start(turn)).events)
        if not data.background:
            return TurnOut.of(await TurnEngine(_ctx(request)).run(turn))
        view = await BackgroundTurns(_ctx(request)).start(turn)
        return Response(
            _status_out(view),
            status_code=202,
            headers={"Location": f"/v1/conversations/{view.conversation_id}/turns/{view.turn_id}"},
        )

    @get(
        "/{conversation_id:str}/turns/{turn_id:str}",
        operation_id="GetTurn",
        summary="Read a turn's progress and result",
        operation_class=ApiOperation,
        responses=problem_responses(
            *AUTHENTICATED,
            notes={404: "No such conversation for this tenant, or no such turn in it (`turn-not-found`)."},
        ),
    )
    async def read_turn(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        turn_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> TurnStatusOut:
        """A turn's status and, once the model has answered (`completed` or `requires_action`), its
        result as the turn itself would have answered it. Audited as a read of the history."""
        return _status_out(await BackgroundTurns(_ctx(request)).read(principal, meta, conversation_id, turn_id))

    @get(
        "/{conversation_id:str}/turns/{turn_id:str}/events",
        operation_id="GetTurnEvents",
        summary="Read a turn's events (Server-Sent Events)",
        operation_class=ApiOperation,
        media_type="text/event-stream",
        responses=problem_responses(
            *AUTHENTICATED,
            notes={404: "No such conversation for this tenant, or no such turn in it (`turn-not-found`)."},
        ),
    )
    async def turn_events(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        turn_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        last_event_id: Annotated[
            str | None,
            HeaderParameter(
                name="Last-Event-ID",
                required=False,
                description="The id of the last event received: only the events after it are sent (an id that "
                "is not one of this turn's is taken as none: every event is sent).",
            ),
        ] = None,
    ) -> Stream:
        """A turn's events, for a client that reconnects (`Last-Event-ID`) or comes later: while the
        turn runs on this replica, the events it missed and then the rest as they come; once the
        turn has ended, on any replica, its events regenerated from the stored turn. A turn running
        on another replica: one `turn.running_elsewhere` event that asks the client to reconnect.
        Audited as a read of the history."""
        if last_event_id is not None and not LAST_EVENT_ID.fullmatch(last_event_id):
            # As a browser's EventSource would send whatever id it last saw: not one of ours.
            last_event_id = None
        ctx = _ctx(request)
        view = await BackgroundTurns(ctx).read(principal, meta, conversation_id, turn_id)
        log = ctx.turn_events.get(view.turn_id)
        if log is not None and (log.tenant_id, log.conversation_id) != (principal.tenant_id, view.conversation_id):
            log = None
        return event_stream(await StreamingTurns(ctx).events(view, log, last_event_id))

    @post(
        "/{conversation_id:str}/turns/{turn_id:str}/cancel",
        operation_id="CancelTurn",
        status_code=200,
        summary="Cancel a background turn",
        operation_class=ApiOperation,
        responses=problem_responses(
            *AUTHENTICATED,
            notes={
                404: "No such conversation for this tenant, or no such turn in it (`turn-not-found`).",
                409: "The turn is not a running background turn (`turn-not-running`): it has ended, or it is a "
                "foreground turn, or its model has not been started yet.",
            },
        ),
    )
    async def cancel_turn(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        turn_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> TurnStatusOut:
        """Cancel a running background turn: it ends `failed` with `error_code: cancelled`, nothing of
        it is stored, the conversation takes turns again and its Idempotency-Key may run it again;
        then the model's interaction is cancelled too (it may have finished meanwhile: its answer
        is dropped)."""
        return _status_out(await BackgroundTurns(_ctx(request)).cancel(principal, meta, conversation_id, turn_id))

    @get(
        "/{conversation_id:str}/steps",
        operation_id="ListSteps",
        summary="Read the history",
        operation_class=ApiOperation,
        responses=problem_responses(400, 404, *AUTHENTICATED),
    )
    async def steps(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        cursor: Annotated[int, QueryParameter(ge=0, le=MAX_STEP_POSITION)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=500)] = 100,
    ) -> HistoryOut:
        """The decrypted history in order, `limit` steps from position `cursor`.

        `next_cursor` is the `cursor` of the next page, or null after the last step.
        """
        page = await read_history(_ctx(request), principal, meta, conversation_id, cursor=cursor, limit=limit)
        return HistoryOut(
            conversation_id=conversation_id,
            next_cursor=page.next_cursor,
            steps=[HistoryStep(position=p, turn_id=t, step=s) for p, t, s in page.steps],
        )

    @delete(
        "/{conversation_id:str}",
        operation_id="DeleteConversation",
        status_code=200,
        summary="Delete a conversation",
        operation_class=ApiOperation,
        responses=problem_responses(
            404,
            *AUTHENTICATED,
            notes={
                409: "A turn is waiting for the model (retry when it ends), a legal hold covers the conversation "
                "(`hold_id` names it), or its minimum retention has not passed (`deletable_from` says when it will).",
            },
        ),
    )
    async def remove(
        self,
        request: Request[Any, Any, Any],
        conversation_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> DeletionReceiptOut:
        """Crypto-shred the conversation, delete its rows, then delete any provider copies; answers
        with the deletion receipt, signed with the audit key.

        The data key is destroyed first, so copies of the rows in backups cannot be read either.
        A provider copy that cannot be deleted now is retried later, and audited either way; the
        receipt lists it as pending. Check a receipt offline with `custody receipts verify`.
        """
        deleted = await delete_conversation(_ctx(request), principal, meta, conversation_id)
        return DeletionReceiptOut.of(deleted.receipt)
