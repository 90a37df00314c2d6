"""The claim: the short transaction that takes a conversation for one turn (`turn.start`).

It locks the conversation row, closes a turn whose holder died (its lease ran out), answers a
repeated Idempotency-Key with the stored result, refuses with 409 while another turn holds a live
lease, refuses a turn whose input carries what the detectors found and the policy refuses (a
card security code, always; a class the route blocks), raises the classification if the
detectors found a new class, decrypts the history, checks the input against the pending function
calls, decides provider storage (and whether the turn may chain onto the provider's copy of the
history, or the provider's copies must go), and takes the lease. Its audit record is written
here because this is where history is read to be disclosed to the model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditEntry
from ..context import ServiceContext
from ..conversations import (
    ConversationCipher,
    align_data_keys,
    decode_json,
    load_cipher,
    replay_steps,
    rule_values,
)
from ..database import run_sql
from ..errors import (
    CardSecurityCodeRefused,
    ConversationNotFound,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidInput,
    TurnInProgress,
    UnknownRouteError,
)
from ..ids import audited_conversation_id, is_conversation_id, new_id
from ..leases import background_turn_running, close_abandoned
from ..models import Conversation, DataKey, IdempotencyRecord, Turn, UpstreamInteraction
from ..policy import Route, StorageDecision, check_blocked, check_data_classes, check_media, decide_storage
from ..upstream import Chain
from ._input import check_function_results, media_blocks
from ._types import TurnRequest, TurnResult

__all__ = ["Claim", "Inspected", "claim_turn"]

# What a replayed answer is sealed under (with the conversation's data key).
RESULT_LABEL = "response"


@dataclass(frozen=True)
class Inspected:
    """What the content of a turn's input told us before the claim: its keyed fingerprint (for the
    Idempotency-Key), the data classes the detectors found and, when one of them always refuses the
    turn (a card security code), its name."""

    fingerprint: str
    detected: frozenset[str]
    refused_by: frozenset[str] = frozenset()


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
    # The stored steps, each its exact JSON bytes, and where the next step goes.
    history: list[bytes] = field(repr=False)
    step_count: int = 0
    # The provider's copy of the history to chain this turn onto, when storage is permitted and
    # the copy is fit for it (see `_chain_onto`).
    chain: Chain | None = None
    # Why the conversation may no longer have provider copies, when it may not: its
    # classification rose to a class that forbids them (`classification_raised`), or its policy
    # stopped permitting them (`storage_not_permitted`). The engine deletes them at once.
    drop_provider_copies: str | None = None


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
        conversation, now, chained_copy = await _locked_conversation(
            session, principal.tenant_id, request.conversation_id
        )
        entry.data_classes = list(conversation.data_classes)
        leased = bool(
            conversation.lease_token and conversation.lease_expires_at and conversation.lease_expires_at > now
        )
        if conversation.lease_token and not leased and await background_turn_running(session, conversation.id):
            # A background turn's holder died: a poller resumes it (service/turns/_background.py),
            # so its lease counts as held.
            leased = True
        if conversation.lease_token and not leased:
            # The lease ran out: its holder died (or lost the database for longer than the
            # lease). Close its turn, with its outcome on record, before taking over.
            if closed := await close_abandoned(ctx.auditor, session, conversation, closed_by="takeover"):
                entry.details["abandoned_turns_closed"] = closed
                ctx.metrics.abandoned_turns(closed, "takeover")
        _refuse_detected(ctx, conversation.route, inspected, entry)
        _refuse_media(ctx, conversation.route, request.raw_input, entry)
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
        # Exact bytes, spliced into the request unparsed; only steps that can be function calls
        # or results are parsed, to find the calls still waiting for an answer.
        history = await replay_steps(session, cipher)
        check_function_results([decode_json(step) for step in history if _may_be_function_step(step)], new_steps)
        decision = decide_storage(route, conversation.data_classes, ctx.policy.data_classes)
        drop_copies = None
        if not decision.provider_storage and (raised or conversation.provider_chain_id is not None):
            # Provider storage is no longer permitted: this turn goes with store=false and the
            # whole history, and the copies the provider holds are deleted at once.
            conversation.provider_chain_id = None
            drop_copies = "classification_raised" if raised else "storage_not_permitted"
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
            step_count=conversation.step_count,
            chain=_chain_onto(ctx, route, decision, chained_copy, now, len(new_steps)),
            drop_provider_copies=drop_copies,
        )
        # Pending ORM changes (a raised classification, a takeover's release) go first; then the
        # lease, the turn row and the Idempotency-Key in one statement.
        await session.flush()
        taken = (
            await run_sql(
                session,
                _TAKE,
                conversation.id,
                claim.lease_token,
                now + timedelta(seconds=ctx.turn_lease_seconds),
                claim.turn_number,
                claim.turn_id,
                decision.provider_storage,
                decision.reason,
                claim.policy_version,
                principal.key_id,
                principal.tenant_id,
                key_digest,
                inspected.fingerprint,
            )
        ).one()
        if key_digest is not None and not taken.key_taken:
            # The same key raced in on another conversation of this tenant: refused as the
            # in-flight request it is (and audited so), not as a database error.
            raise IdempotencyKeyInFlight("this Idempotency-Key is being used by another request")
        entry.policy_version = claim.policy_version
        entry.details |= {
            "turn_id": claim.turn_id,
            "history_steps": len(history),
            "store": decision.provider_storage,
            "storage_reason": decision.code,
            "history_chained": claim.chain is not None,
        }
        return claim
    raise AssertionError("unreachable")  # the audited block returns or raises


def _refuse_detected(ctx: ServiceContext, route_name: str, inspected: Inspected, entry: AuditEntry) -> None:
    """Refuse the turn when its input carries what may never be stored: a card security code next
    to a card number (on every route), or a class the route blocks. Before anything else is
    decided, so the refusal does not depend on leases or keys; the turn.start record names the
    classes (the detector.hit record before it, the detectors), never what matched."""
    route = ctx.policy.routes.get(route_name)
    blocked = inspected.detected & route.blocked_classes if route is not None else frozenset()
    if inspected.refused_by or blocked:
        entry.details["blocked_classes"] = sorted(blocked or inspected.detected)
    if inspected.refused_by:
        raise CardSecurityCodeRefused(route_name, inspected.detected)
    if route is not None:
        check_blocked(route, inspected.detected)


def _refuse_media(ctx: ServiceContext, route_name: str, raw_input: Any, entry: AuditEntry) -> None:
    """Refuse the turn when a media block does not fit the route's `media` rule (415, 413, or a
    URI it does not take), at the same point and on the same turn.start record as a blocked
    class. The record counts the blocks and their decoded bytes, never their types or content."""
    blocks = media_blocks(raw_input)
    if not blocks:
        return
    entry.details["media"] = {"blocks": len(blocks), "bytes": sum(block.size or 0 for block in blocks)}
    route = ctx.policy.routes.get(route_name)
    if route is not None:
        check_media(route, blocks)


async def _locked_conversation(
    session: AsyncSession, tenant_id: str, conversation_id: str
) -> tuple[Conversation, datetime, UpstreamInteraction | None]:
    """The caller's conversation, locked, with the database's clock (leases compare against one
    clock, whichever replica asks), its data key row and the ledger row of the provider copy it
    may chain onto, in one round trip: the key row lands in the session, where `load_cipher`
    finds it without asking again."""
    if not is_conversation_id(conversation_id):
        raise ConversationNotFound(conversation_id)
    row = (
        await session.execute(
            select(Conversation, func.now(), DataKey, UpstreamInteraction)
            .outerjoin(DataKey, DataKey.conversation_id == Conversation.id)
            .outerjoin(UpstreamInteraction, UpstreamInteraction.id == Conversation.provider_chain_id)
            .where(Conversation.id == conversation_id, Conversation.tenant_id == tenant_id)
            .with_for_update(of=Conversation)
        )
    ).one_or_none()
    if row is None:
        raise ConversationNotFound(conversation_id)
    return row[0], row[1], row[3]


def _chain_onto(
    ctx: ServiceContext,
    route: Route,
    decision: StorageDecision,
    copy: UpstreamInteraction | None,
    now: datetime,
    new_steps: int,
) -> Chain | None:
    """The provider copy this turn may chain onto, or None to replay the whole history.

    Only with provider storage permitted, and only onto a copy the ledger says the provider
    still holds (stored, never deleted) and that is younger than the chain's age limit (and the
    route's `provider_ttl`, past which the copy is due for deletion anyway). The age limit is
    there because the provider is not known to refuse an expired id: it may answer as if the
    history were empty, so Custody never relies on a copy near the provider's own expiry. A copy
    gone for any other reason is refused by the provider, and the turn replays in full.
    """
    if not decision.provider_storage or copy is None or not copy.stored or copy.deleted_at is not None:
        return None
    max_age = ctx.provider_chain_max_age_seconds
    if route.provider_ttl is not None:
        max_age = min(max_age, route.provider_ttl.approx_seconds)
    if copy.created_at <= now - timedelta(seconds=max_age):
        return None
    return Chain(copy.id, new_steps)


def _may_be_function_step(step: bytes) -> bool:
    """Whether a stored step could be a function call or result. Its type is written either
    plainly or with escapes (which JSON allows anywhere in a string): either way, a step holding
    neither spelling cannot be one, and needs no parsing here."""
    return b"function_" in step or b"\\u" in step


# The claim's writes in one statement: the lease, the turn row and, with an Idempotency-Key, its
# record (unless the key is taken: then the caller refuses the turn, which rolls all back).
_TAKE = """
WITH leased AS (
    UPDATE conversations SET lease_token = $2, lease_expires_at = $3, turn_count = $4
    WHERE id = $1
    RETURNING id
), turn AS (
    INSERT INTO turns (id, conversation_id, number, status, provider_storage, storage_reason, policy_version,
                       key_id, step_count, upstream_attempts)
    SELECT $5, id, $4, 'in_progress', $6, $7, $8, $9, 0, 0 FROM leased
), key AS (
    INSERT INTO idempotency_records (tenant_id, key, conversation_id, fingerprint, turn_id)
    SELECT $10, $11, id, $12, $5 FROM leased WHERE $11::varchar IS NOT NULL
    ON CONFLICT (tenant_id, key) DO NOTHING
    RETURNING key
)
SELECT EXISTS (SELECT 1 FROM key) AS key_taken
"""


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
