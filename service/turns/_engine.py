"""The turn engine: claim the conversation, replay its history to the model, store the reply.

A turn is three units of work, and no database transaction stays open across the model call:

1. claim (`turn.start`, one short transaction): lock the conversation row, close a turn whose
   holder died (its lease expired), check the Idempotency-Key, refuse with 409 if another turn
   holds a live lease, decrypt the history, check the input against pending function calls,
   decide provider storage, take the lease, record the turn. Its audit record is written here
   because this is where history is read to be disclosed to the model;
2. call the model with the whole history plus the new input as `input`, `store` as decided, and
   the route's settings re-sent (design invariants 3 and 4), while a background task renews the
   lease; the provider's interaction id goes into the ledger of provider copies at once, in a
   transaction of its own, so that no later failure can lose track of a copy the provider keeps;
3. finish (`turn.create`, one transaction): if the lease is still ours, append the new input and
   the model's steps, sealed, at the next positions, record the outcome, release the lease.

Once the model has answered, storing the reply runs as a background task: a caller who goes away
does not stop it, and if the database is unreachable it keeps trying (the reply is in memory)
while the lease is ours; the caller gets 503 after a while and, retrying with its Idempotency-Key,
the stored turn. See turn_leases.py for the lease itself. The input is stored with the reply, not
at the claim: a failed model call leaves the history exactly as it was, never with an unanswered
input.

Before any of that, the input is checked against the caller's own conversation and only then
canonicalised (for the keyed request fingerprint) and scanned by the detectors; a large input is
scanned in a worker thread so that it cannot stall the other requests of the process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditEntry, RequestMeta, outcome_of
from ..auth import Principal
from ..context import ServiceContext
from ..conversations import (
    ConversationCipher,
    append_steps,
    delete_provider_copies,
    load_cipher,
    owned_conversation,
    read_steps,
)
from ..database import database_now
from ..database_errors import database_unreachable
from ..detectors import detect_classes
from ..errors import (
    ConversationNotFound,
    DatabaseUnavailable,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidInput,
    LeaseLost,
    TurnInProgress,
    UpstreamFailed,
)
from ..ids import audited_conversation_id, is_conversation_id, new_id
from ..keyed_digests import canonical_json, idempotency_key_digest, request_fingerprint
from ..models import Conversation, IdempotencyRecord, Turn, UpstreamInteraction
from ..policy import StorageDecision, UnknownRouteError, check_data_classes, decide_storage
from ..upstream import UpstreamReply
from ._input import check_function_results, normalize_client_input
from ._leases import close_abandoned, renew_lease

__all__ = ["TurnEngine", "output_text"]

T = TypeVar("T")
logger = logging.getLogger("custody.turns")

_RESPONSE = "response"
# Only these statuses leave a history the model can continue from.
_KEPT = frozenset({"completed", "requires_action"})
_USAGE_FIELDS = (
    "total_input_tokens",
    "total_output_tokens",
    "total_thought_tokens",
    "total_cached_tokens",
    "total_tool_use_tokens",
    "total_tokens",
)
# Inputs larger than this are canonicalised and scanned in a worker thread: a megabyte takes
# tens of milliseconds of CPU, which on the event loop would stall every other request.
_OFF_LOOP_BYTES = 64_000


@dataclass(frozen=True)
class _Inspected:
    """What the content of a turn's input told us, computed before the claim."""

    fingerprint: str
    detected: frozenset[str]


@dataclass(frozen=True)
class _Claim:
    turn_id: str
    turn_number: int
    lease_token: str
    settings: dict[str, Any]
    decision: StorageDecision
    policy_version: str
    data_classes: list[str]
    key_digest: str | None
    # Plaintext and keys: never in a repr, which tracebacks and debuggers print.
    cipher: ConversationCipher = field(repr=False)
    history: list[Any] = field(repr=False)


@dataclass(frozen=True)
class _Outcome:
    """What the model's reply means for the turn, before anything is stored."""

    kept: bool
    status: str
    error_code: str | None
    upstream_status: str
    usage: dict[str, int]
    reply: UpstreamReply = field(repr=False)
    model_steps: list[Any] = field(repr=False)
    # The answer to the caller, and what a repeated Idempotency-Key replays.
    response: dict[str, Any] = field(repr=False)


class TurnEngine:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    async def run(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        raw_input: Any,
        idempotency_key: str | None,
        *,
        input_bytes: int = 0,
    ) -> dict[str, Any]:
        """Run one turn; returns the response body (replayed as first sent for a repeated key)."""
        ctx = self._ctx
        new_steps = normalize_client_input(raw_input)
        key_digest = (
            idempotency_key_digest(ctx.pepper, principal.tenant_id, idempotency_key) if idempotency_key else None
        )
        inspected = await self._inspect(principal, meta, conversation_id, new_steps, input_bytes)
        claim = await self._claim(principal, meta, conversation_id, new_steps, inspected, key_digest)
        if isinstance(claim, dict):
            return claim
        heartbeat = ctx.tasks.spawn(renew_lease(ctx, conversation_id, claim.lease_token), name=f"lease:{claim.turn_id}")
        try:
            reply = await ctx.upstream.create(
                settings=claim.settings,
                steps=[*claim.history, *new_steps],
                store=claim.decision.provider_storage,
            )
        except BaseException as exc:
            # Failed, cancelled (the client went away) or a bug: give the conversation back.
            code, attempts = (exc.code, exc.attempts) if isinstance(exc, UpstreamFailed) else ("turn_aborted", 0)
            partial_hops = exc.interaction_ids if isinstance(exc, UpstreamFailed) else []
            release = self._in_background(
                self._give_back(principal, meta, conversation_id, claim, code, attempts, partial_hops),
                heartbeat,
                claim,
            )
            # The caller hears about the model's failure, not the database's: if the database is
            # down, the release goes on in the background.
            with contextlib.suppress(DatabaseUnavailable):
                await self._wait_stored(release)
            raise
        # From here on the model has answered: the reply is stored even if the caller goes away.
        settle = self._in_background(
            self._settle(principal, meta, conversation_id, claim, new_steps, reply), heartbeat, claim
        )
        return await self._wait_stored(settle)

    async def _give_back(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        claim: _Claim,
        code: str,
        attempts: int,
        interaction_ids: list[str],
    ) -> None:
        """Release a turn whose model call failed; interactions it did get (hops of a continued
        turn) still go into the ledger, since the provider may keep them."""
        if interaction_ids:
            await self._stored(partial(self._ledger, principal, meta, conversation_id, claim, interaction_ids))
        await self._stored(partial(self._release_failed, principal, meta, conversation_id, claim, code, attempts))

    def _in_background(
        self, work: Coroutine[Any, Any, T], heartbeat: asyncio.Task[None], claim: _Claim
    ) -> asyncio.Task[T]:
        """Run `work` past the request's life; the lease is renewed until it ends."""
        task = self._ctx.tasks.spawn(work, name=f"settle:{claim.turn_id}")
        task.add_done_callback(lambda _: heartbeat.cancel())
        return task

    async def _wait_stored(self, task: asyncio.Task[T]) -> T:
        """The task's result; DatabaseUnavailable if the database keeps it waiting too long (it
        goes on in the background, and a retry with the same Idempotency-Key finds the result)."""
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout=self._ctx.turn_store_wait_seconds)
        except TimeoutError:
            raise DatabaseUnavailable(
                "the database cannot be reached; the model's reply is kept and stored as soon as it is back: "
                "retry with the same Idempotency-Key"
            ) from None

    async def _stored(self, work: Callable[[bool], Awaitable[T]]) -> T:
        """Run one unit of work until it commits, retrying while the database is unreachable (for
        up to `turn_store_retry_seconds`); `work(retry)` is told whether an earlier attempt ran."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._ctx.turn_store_retry_seconds
        delay, retry = 0.2, False
        while True:
            try:
                return await work(retry)
            except Exception as exc:
                if not database_unreachable(exc) or loop.time() >= deadline:
                    raise
                logger.warning("database unreachable (%s) while storing a turn; retrying", type(exc).__name__)
            await asyncio.sleep(delay)
            delay, retry = min(delay * 2, 2.0), True

    async def _inspect(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        new_steps: list[dict[str, Any]],
        input_bytes: int,
    ) -> _Inspected:
        """Fingerprint and scan the input, but only for the caller's own conversation: nobody
        gets to make the service canonicalise and scan a megabyte for a conversation they
        cannot reach (the claim then refuses it, with its audit record)."""
        ctx = self._ctx
        if not await self._owns(principal, conversation_id):
            return _Inspected("", frozenset())
        work = partial(self._fingerprint_and_detect, conversation_id, new_steps)
        fingerprint, detected = await asyncio.to_thread(work) if input_bytes > _OFF_LOOP_BYTES else work()
        if detected:
            # Recorded on its own, before the claim, so the hit stays on record even when the
            # turn is then refused because the route does not allow the class.
            await ctx.auditor.record(
                ctx.sessions,
                AuditEntry(
                    "detector.hit",
                    principal,
                    meta,
                    resource_type="conversation",
                    resource_id=conversation_id,
                    data_classes=sorted(detected),
                    details={"classes": sorted(detected)},
                ),
            )
        return _Inspected(fingerprint, detected)

    async def _owns(self, principal: Principal, conversation_id: str) -> bool:
        if not is_conversation_id(conversation_id):
            return False
        async with self._ctx.sessions() as session:
            found = await session.scalar(
                select(Conversation.id).where(
                    Conversation.id == conversation_id, Conversation.tenant_id == principal.tenant_id
                )
            )
        return found is not None

    def _fingerprint_and_detect(
        self, conversation_id: str, new_steps: list[dict[str, Any]]
    ) -> tuple[str, frozenset[str]]:
        fingerprint = request_fingerprint(self._ctx.pepper, canonical_json([conversation_id, new_steps]))
        return fingerprint, frozenset(detect_classes(new_steps, self._ctx.policy.data_classes))

    async def _claim(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        new_steps: list[dict[str, Any]],
        inspected: _Inspected,
        key_digest: str | None,
    ) -> _Claim | dict[str, Any]:
        ctx = self._ctx
        entry = AuditEntry(
            "turn.start",
            principal,
            meta,
            resource_type="conversation",
            resource_id=audited_conversation_id(conversation_id),
            details={"input_steps": len(new_steps), "idempotency_key": key_digest is not None},
        )
        try:
            async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
                conversation = await owned_conversation(session, principal, conversation_id, lock=True)
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
                if key_digest is not None:
                    earlier = await session.get(IdempotencyRecord, (principal.tenant_id, key_digest))
                    if earlier is not None:
                        replayed = await _replay(
                            session, ctx, conversation, earlier, inspected.fingerprint, leased=leased
                        )
                        if replayed is not None:
                            entry.details["idempotent_replay"] = True
                            return replayed
                if leased:
                    raise TurnInProgress(conversation_id)
                try:
                    route = ctx.policy.route(conversation.route)
                except UnknownRouteError:
                    raise InvalidInput("this conversation's route is no longer in the policy") from None
                raised = inspected.detected - set(conversation.data_classes)
                if raised:
                    # Classification only rises; a class the route does not allow refuses the turn.
                    check_data_classes(route, raised, ctx.policy.data_classes)
                    conversation.data_classes = sorted({*conversation.data_classes, *raised})
                    entry.data_classes = list(conversation.data_classes)
                    entry.details["classification_raised"] = sorted(raised)
                cipher = await load_cipher(session, ctx.keyring, conversation)
                history = [step for _, _, step in await read_steps(session, cipher)]
                check_function_results(history, new_steps)
                decision = decide_storage(route, conversation.data_classes, ctx.policy.data_classes)
                claim = _Claim(
                    turn_id=new_id("turn"),
                    turn_number=conversation.turn_count + 1,
                    lease_token=new_id("lease"),
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
                    session.add(
                        IdempotencyRecord(
                            tenant_id=principal.tenant_id,
                            key=key_digest,
                            conversation_id=conversation.id,
                            fingerprint=inspected.fingerprint,
                            turn_id=claim.turn_id,
                        )
                    )
                entry.policy_version = claim.policy_version
                entry.details |= {
                    "turn_id": claim.turn_id,
                    "history_steps": len(history),
                    "store": decision.provider_storage,
                    "storage_reason": decision.code,
                }
                return claim
        except IntegrityError as exc:
            if "pk_idempotency_records" not in str(exc.orig):
                raise
            # The same key raced in on another conversation of this tenant.
            raise IdempotencyKeyInFlight("this Idempotency-Key is being used by another request") from None

    async def _settle(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        claim: _Claim,
        new_steps: list[dict[str, Any]],
        reply: UpstreamReply,
    ) -> dict[str, Any]:
        finishing = False
        outcome = _outcome(conversation_id, claim, new_steps, reply)
        try:
            if reply.interaction_ids:
                await self._stored(
                    partial(self._ledger, principal, meta, conversation_id, claim, reply.interaction_ids)
                )
            finishing = True
            return await self._stored(
                partial(self._finish, principal, meta, conversation_id, claim, new_steps, outcome)
            )
        except BaseException as exc:
            if database_unreachable(exc):
                # Given up after turn_store_retry_seconds: once the database is back, the lease
                # has run out and the reaper (or the next turn) closes the turn as abandoned.
                raise
            # Free the turn row and the key. A failed finish was recorded by its audited action;
            # a failed ledger write was not, so it gets its record here.
            code = outcome_of(exc)[1]
            await self._stored(
                partial(
                    self._release_failed,
                    principal,
                    meta,
                    conversation_id,
                    claim,
                    code,
                    reply.attempts,
                    audit=not finishing,
                )
            )
            if isinstance(exc, ConversationNotFound):
                # Deleted while the model worked: the copy the provider kept must go too.
                await self._delete_orphaned_copy(principal, meta, conversation_id, reply, claim)
            raise

    async def _ledger(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        claim: _Claim,
        interaction_ids: list[str],
        retry: bool,
    ) -> None:
        """Record the provider's interaction ids (one per hop of the turn) before anything else
        can fail. Each is written once even when an earlier attempt committed but its
        acknowledgement was lost."""
        stored = claim.decision.provider_storage
        async with self._ctx.sessions.begin() as session:
            inserted = await session.scalars(
                insert(UpstreamInteraction)
                .values(
                    [
                        {
                            "id": interaction_id,
                            "tenant_id": principal.tenant_id,
                            "conversation_id": conversation_id,
                            "turn_id": claim.turn_id,
                            "stored": stored,
                        }
                        for interaction_id in interaction_ids
                    ]
                )
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(UpstreamInteraction.id)
            )
            for interaction_id in inserted.all() if stored else []:
                await self._ctx.auditor.append(
                    session,
                    AuditEntry(
                        "upstream.store",
                        principal,
                        meta,
                        resource_type="upstream_interaction",
                        resource_id=interaction_id,
                        data_classes=claim.data_classes,
                        policy_version=claim.policy_version,
                        details={"conversation_id": conversation_id, "turn_id": claim.turn_id},
                    ),
                )

    async def _finish(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        claim: _Claim,
        new_steps: list[dict[str, Any]],
        outcome: _Outcome,
        retry: bool,
    ) -> dict[str, Any]:
        ctx = self._ctx
        if retry and await self._finished_earlier(claim, outcome):
            # The commit of an earlier attempt went through but its acknowledgement was lost with
            # the connection: the turn and its record are stored; writing again would duplicate.
            return outcome.response
        entry = _turn_entry(principal, meta, conversation_id, claim)
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            conversation = await session.scalar(
                select(Conversation).where(Conversation.id == conversation_id).with_for_update()
            )
            if conversation is None or conversation.lease_token != claim.lease_token:
                # Deleted meanwhile, or our lease expired and another turn took over: appending
                # now would resurrect or fork the history. (Raising records a denied turn.create;
                # `_settle` then releases the turn row and the key.)
                if conversation is None:
                    raise ConversationNotFound(conversation_id)
                raise LeaseLost(conversation_id)
            await self._record(session, principal, conversation, claim, new_steps, outcome)
            entry.details |= {
                "status": outcome.status,
                "steps": len(outcome.model_steps),
                "upstream_interaction_id": _last_interaction(outcome.reply),
            }
            return outcome.response

    async def _finished_earlier(self, claim: _Claim, outcome: _Outcome) -> bool:
        async with self._ctx.sessions() as session:
            turn = await session.get(Turn, claim.turn_id)
        return turn is not None and turn.status == outcome.status and turn.error_code == outcome.error_code

    async def _delete_orphaned_copy(
        self, principal: Principal, meta: RequestMeta, conversation_id: str, reply: UpstreamReply, claim: _Claim
    ) -> None:
        """The conversation was deleted while the model worked: its provider copies go too."""
        if claim.decision.provider_storage and reply.interaction_ids:
            await delete_provider_copies(self._ctx, principal, meta, conversation_id, reply.interaction_ids)

    async def _record(
        self,
        session: AsyncSession,
        principal: Principal,
        conversation: Conversation,
        claim: _Claim,
        new_steps: list[dict[str, Any]],
        outcome: _Outcome,
    ) -> None:
        turn = await session.get(Turn, claim.turn_id)
        assert turn is not None
        if outcome.kept:
            # A turn the model did not complete stores nothing: the history stays as it was.
            stored = [*new_steps, *outcome.model_steps]
            append_steps(session, claim.cipher, claim.turn_id, conversation.step_count, stored)
            turn.first_position, turn.step_count = conversation.step_count, len(stored)
            conversation.step_count += len(stored)
        turn.status, turn.error_code = outcome.status, outcome.error_code
        turn.upstream_status, turn.usage = outcome.upstream_status[:40], outcome.usage
        turn.upstream_latency_ms, turn.upstream_attempts = outcome.reply.latency_ms, outcome.reply.attempts
        turn.finished_at = func.now()
        conversation.lease_token = conversation.lease_expires_at = None
        conversation.updated_at = func.now()
        if claim.key_digest is not None:
            record = await session.get(IdempotencyRecord, (principal.tenant_id, claim.key_digest))
            if record is not None and record.turn_id != claim.turn_id:
                record = None  # the key now names another turn's record (a takeover): not ours to touch
            if record is not None and outcome.kept:
                record.response = claim.cipher.seal_record(_RESPONSE, claim.turn_number, outcome.response)
                record.response_key_version = claim.cipher.key_version
            elif record is not None:
                # Nothing was stored, so a retry with the same key may run the turn again.
                await session.delete(record)

    async def _release_failed(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        claim: _Claim,
        code: str,
        attempts: int,
        retry: bool,
        *,
        audit: bool = True,
    ) -> None:
        """Record the failed turn and give the conversation back; the history is untouched.
        Idempotent: a turn already closed (by an earlier attempt or a takeover) stays as it is."""
        async with self._ctx.sessions.begin() as session:
            conversation = await session.scalar(
                select(Conversation).where(Conversation.id == conversation_id).with_for_update()
            )
            turn = await session.get(Turn, claim.turn_id)
            closing = turn is not None and turn.status == "in_progress"
            if turn is not None and closing:
                turn.status, turn.error_code, turn.finished_at = "failed", code[:80], func.now()
                turn.upstream_attempts = attempts
            if conversation is not None and conversation.lease_token == claim.lease_token:
                conversation.lease_token = conversation.lease_expires_at = None
            if claim.key_digest is not None:
                # Only this turn's record: after a takeover the same key names the new turn's
                # record, which must survive this (late) release or a replay would run it again.
                await session.execute(
                    delete(IdempotencyRecord).where(
                        IdempotencyRecord.tenant_id == principal.tenant_id,
                        IdempotencyRecord.key == claim.key_digest,
                        IdempotencyRecord.turn_id == claim.turn_id,
                        IdempotencyRecord.response.is_(None),
                    )
                )
            if not audit or not closing:
                return
            entry = _turn_entry(principal, meta, conversation_id, claim)
            entry.details["upstream_attempts"] = attempts
            await self._ctx.auditor.append(session, entry, outcome="error", reason=code[:80])


def _outcome(conversation_id: str, claim: _Claim, new_steps: list[dict[str, Any]], reply: UpstreamReply) -> _Outcome:
    body = reply.body
    upstream_status = str(body.get("status", ""))
    kept = upstream_status in _KEPT
    # A turn the model did not complete stores nothing, so it returns nothing either: showing
    # output the next turn's model will never see would mislead the caller.
    model_steps: list[Any] = (body.get("steps") or []) if kept else []
    usage = _usage(body.get("usage"))
    error_code = None if kept else f"model_{upstream_status or 'no_status'}"[:80]
    status = upstream_status if kept else "failed"
    response = {
        "conversation_id": conversation_id,
        "turn_id": claim.turn_id,
        "turn_number": claim.turn_number,
        "status": status,
        "error_code": error_code,
        "steps": model_steps,
        "output_text": output_text(model_steps),
        "usage": usage,
        "storage": {
            "store": claim.decision.provider_storage,
            "provider_storage": claim.decision.provider_storage,
            "reason": claim.decision.reason,
        },
        "policy_version": claim.policy_version,
    }
    return _Outcome(kept, status, error_code, upstream_status, usage, reply, model_steps, response)


async def _replay(
    session: AsyncSession,
    ctx: ServiceContext,
    conversation: Conversation,
    record: IdempotencyRecord,
    fingerprint: str,
    *,
    leased: bool,
) -> dict[str, Any] | None:
    """The stored response for a repeated key; None when the first attempt stored nothing."""
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
    cipher = await load_cipher(session, ctx.keyring, conversation)
    number = turn.number if turn is not None else 0
    replayed: dict[str, Any] = cipher.open_record(_RESPONSE, number, record.response_key_version, record.response)
    return replayed


def _turn_entry(principal: Principal, meta: RequestMeta, conversation_id: str, claim: _Claim) -> AuditEntry:
    """The `turn.create` record of a claimed turn, with its storage decision."""
    return AuditEntry(
        "turn.create",
        principal,
        meta,
        resource_type="turn",
        resource_id=claim.turn_id,
        data_classes=claim.data_classes,
        policy_version=claim.policy_version,
        details={
            "conversation_id": conversation_id,
            "store": claim.decision.provider_storage,
            "storage_reason": claim.decision.code,
        },
    )


def _last_interaction(reply: UpstreamReply) -> str | None:
    return reply.interaction_ids[-1] if reply.interaction_ids else None


def _usage(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {}
    return {k: int(raw[k]) for k in _USAGE_FIELDS if isinstance(raw.get(k), int)}


def output_text(steps: list[Any]) -> str:
    """The trailing run of text in model_output steps, as the SDK computes `output_text`:
    thought steps are skipped, and any other step or block ends the run."""
    texts: list[str] = []
    for step in reversed(steps):
        if not isinstance(step, dict) or step.get("type") == "thought":
            continue
        if step.get("type") != "model_output":
            break
        blocks = step.get("content") or []
        run = []
        for block in reversed(blocks):
            if not isinstance(block, dict) or block.get("type") != "text":
                break
            run.append(str(block.get("text", "")))
        texts.extend(run)
        if len(run) != len(blocks):
            break
    return "".join(reversed(texts))
