"""The claim: the short transaction that takes a conversation for one turn (`turn.start`).

It locks the conversation row, closes a turn whose holder died (its lease ran out), answers a
repeated Idempotency-Key with the stored result, refuses with 409 while another turn holds a live
lease, raises the classification if the detectors found a new class, decrypts the history,
checks the input against the pending function calls, decides provider storage, and takes the
lease. Its audit record is written here because this is where history is read to be disclosed
to the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditEntry
from ..context import ServiceContext
from ..conversations import (
    ConversationCipher,
    align_data_keys,
    load_cipher,
    owned_conversation,
    read_steps,
    rule_values,
)
from ..database import database_now
from ..errors import (
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidInput,
    TurnInProgress,
    UnknownRouteError,
)
from ..ids import audited_conversation_id, new_id
from ..leases import close_abandoned
from ..models import Conversation, IdempotencyRecord, Turn
from ..policy import StorageDecision, check_data_classes, decide_storage
from ._input import check_function_results
from ._types import TurnRequest, TurnResult

__all__ = ["Claim", "Inspected", "claim_turn"]

# What a replayed answer is sealed under (with the conversation's data key).
RESULT_LABEL = "response"


@dataclass(frozen=True)
class Inspected:
    """What the content of a turn's input told us before the claim: its keyed fingerprint (for the
    Idempotency-Key) and the data classes the detectors found."""

    fingerprint: str
    detected: frozenset[str]


@dataclass(frozen=True)
class Claim:
    """A conversation taken for one turn: everything the model call and the finish need."""

    turn_id: str
    turn_number: int
    lease_token: str
    route: str
    settings: dict[str, Any]
    decision: StorageDecision
    policy_version: str
    data_classes: list[str]
    key_digest: str | None
    # Plaintext and keys: never in a repr, which tracebacks and debuggers print.
    cipher: ConversationCipher = field(repr=False)
    history: list[Any] = field(repr=False)


async def claim_turn(
    ctx: ServiceContext,
    request: TurnRequest,
    new_steps: list[dict[str, Any]],
    inspected: Inspected,
    key_digest: str | None,
) -> Claim | TurnResult:
    """Take the conversation for this turn, or answer a repeated Idempotency-Key from storage."""
    principal = request.principal
    entry = AuditEntry(
        "turn.start",
        principal,
        request.meta,
        resource_type="conversation",
        resource_id=audited_conversation_id(request.conversation_id),
        details={"input_steps": len(new_steps), "idempotency_key": key_digest is not None},
    )
    async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
        conversation = await owned_conversation(session, principal, request.conversation_id, lock=True)
        entry.data_classes = list(conversation.data_classes)
        now = await database_now(session)
        leased = bool(
            conversation.lease_token and conversation.lease_expires_at and conversation.lease_expires_at > now
        )
        if conversation.lease_token and not leased:
            # The lease ran out: its holder died (or lost the database for longer than the
            # lease). Close its turn, with its outcome on record, before taking over.
            if closed := await close_abandoned(ctx.auditor, session, conversation, closed_by="takeover"):
                entry.details["abandoned_turns_closed"] = closed
                ctx.metrics.abandoned_turns(closed, "takeover")
        if key_digest is not None:
            earlier = await session.get(IdempotencyRecord, (principal.tenant_id, key_digest))
            if earlier is not None:
                replayed = await _replay(session, ctx, conversation, earlier, inspected.fingerprint, leased=leased)
                if replayed is not None:
                    entry.details["idempotent_replay"] = True
                    return replayed
        if leased:
            ctx.metrics.lease_conflict("held", principal.tenant_id)
            raise TurnInProgress(request.conversation_id)
        try:
            route = ctx.policy.route(conversation.route)
        except UnknownRouteError:
            raise InvalidInput("this conversation's route is no longer in the policy") from None
        raised = inspected.detected - set(conversation.data_classes)
        if raised:
            # Classification only rises; a class the route does not allow refuses the turn.
            check_data_classes(route, raised, ctx.policy.data_classes)
            conversation.data_classes = sorted({*conversation.data_classes, *raised})
            # A new class may bring a stricter retention rule: the deadlines follow at once.
            for column, value in rule_values(
                ctx.policy.retention_for(conversation.route, conversation.data_classes), ctx.policy.version
            ).items():
                setattr(conversation, column, value)
            # ...and the data key follows the deadline to its new day, in this transaction.
            await align_data_keys(session, ctx, [conversation.id])
            entry.data_classes = list(conversation.data_classes)
            entry.details["classification_raised"] = sorted(raised)
        cipher = await load_cipher(session, ctx, conversation)
        history = [step for _, _, step in await read_steps(session, cipher)]
        check_function_results(history, new_steps)
        decision = decide_storage(route, conversation.data_classes, ctx.policy.data_classes)
        claim = Claim(
            turn_id=new_id("turn"),
            turn_number=conversation.turn_count + 1,
            lease_token=new_id("lease"),
            route=conversation.route,
            settings=route.upstream_settings(),
            decision=decision,
            policy_version=ctx.policy.version,
            data_classes=list(conversation.data_classes),
            key_digest=key_digest,
            cipher=cipher,
            history=history,
        )
        conversation.lease_token = claim.lease_token
        conversation.lease_expires_at = now + timedelta(seconds=ctx.turn_lease_seconds)
        conversation.turn_count = claim.turn_number
        session.add(
            Turn(
                id=claim.turn_id,
                conversation_id=conversation.id,
                number=claim.turn_number,
                status="in_progress",
                provider_storage=decision.provider_storage,
                storage_reason=decision.reason,
                policy_version=claim.policy_version,
                key_id=principal.key_id,
            )
        )
        await session.flush()
        if key_digest is not None:
            try:
                # A savepoint: losing the race for the key refuses this turn as the in-flight
                # request it is (and is audited so), not as a database error.
                async with session.begin_nested():
                    session.add(
                        IdempotencyRecord(
                            tenant_id=principal.tenant_id,
                            key=key_digest,
                            conversation_id=conversation.id,
                            fingerprint=inspected.fingerprint,
                            turn_id=claim.turn_id,
                        )
                    )
                    await session.flush()
            except IntegrityError:
                # The same key raced in on another conversation of this tenant.
                raise IdempotencyKeyInFlight("this Idempotency-Key is being used by another request") from None
        entry.policy_version = claim.policy_version
        entry.details |= {
            "turn_id": claim.turn_id,
            "history_steps": len(history),
            "store": decision.provider_storage,
            "storage_reason": decision.code,
        }
        return claim
    raise AssertionError("unreachable")  # the audited block returns or raises


async def _replay(
    session: AsyncSession,
    ctx: ServiceContext,
    conversation: Conversation,
    record: IdempotencyRecord,
    fingerprint: str,
    *,
    leased: bool,
) -> TurnResult | None:
    """The stored result for a repeated key; None when the first attempt stored nothing."""
    if record.conversation_id != conversation.id or record.fingerprint != fingerprint:
        raise IdempotencyKeyReused("this Idempotency-Key was used with a different request")
    if record.response is None or record.response_key_version is None:
        if leased:
            raise IdempotencyKeyInFlight("the first request with this Idempotency-Key is still running")
        # Its turn ended without storing anything: the key is free to run the turn again.
        await session.delete(record)
        await session.flush()
        return None
    turn = await session.get(Turn, record.turn_id)
    cipher = await load_cipher(session, ctx, conversation)
    number = turn.number if turn is not None else 0
    sealed = cipher.open_record(RESULT_LABEL, number, record.response_key_version, record.response)
    return TurnResult.from_record(sealed)
