"""The turn engine: claim the conversation, replay its history to the model, store the reply.

A turn is three units of work, and no database transaction stays open across the model call:

1. claim (`turn.start`, one short transaction): lock the conversation row, check the
   Idempotency-Key, refuse with 409 if another turn holds an unexpired lease, decrypt the
   history, check the input against pending function calls, decide provider storage, take the
   lease, record the turn. Its audit record is written here because this is where history is
   read to be disclosed to the model;
2. call the model with the whole history plus the new input as `input`, `store` as decided, and
   the route's settings re-sent (design invariants 3 and 4); the provider's interaction id goes
   into the ledger of provider copies at once, in a transaction of its own, so that no later
   failure can lose track of a copy the provider keeps;
3. finish (`turn.create`, one transaction): if the lease is still ours, append the new input and
   the model's steps, sealed, at the next positions, record the outcome, release the lease.

The lease is a row value, so it holds across any number of service processes; it expires so a
crashed process cannot wedge a conversation. The input is stored with the reply, not at the
claim: a failed model call leaves the history exactly as it was, never with an unanswered input.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .audit import AuditEntry, RequestMeta, append, outcome_of
from .auth import Principal, new_id
from .client_input import check_function_results, normalize_client_input
from .context import ServiceContext
from .conversations import audited_id, owned_conversation
from .database import database_now
from .detectors import detect_classes
from .errors import (
    ConversationNotFound,
    IdempotencyKeyInFlight,
    IdempotencyKeyReused,
    InvalidInput,
    TurnInProgress,
    UpstreamFailed,
)
from .history import ConversationCipher, append_steps, encode_json, load_cipher, read_steps
from .models import Conversation, IdempotencyRecord, Turn, UpstreamInteraction
from .policy import StorageDecision, UnknownRouteError, check_data_classes, decide_storage
from .provider_copies import delete_provider_copies
from .upstream import UpstreamReply

__all__ = ["TurnEngine", "output_text"]

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


@dataclass(frozen=True)
class _Claim:
    turn_id: str
    turn_number: int
    lease_token: str
    settings: dict[str, Any]
    decision: StorageDecision
    policy_version: str
    data_classes: list[str]
    idempotency_key: str | None
    # Plaintext and keys: never in a repr, which tracebacks and debuggers print.
    cipher: ConversationCipher = field(repr=False)
    history: list[Any] = field(repr=False)


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
    ) -> dict[str, Any]:
        """Run one turn; returns the response body (replayed as first sent for a repeated key)."""
        new_steps = normalize_client_input(raw_input)
        fingerprint = hashlib.sha256(encode_json([conversation_id, new_steps])).hexdigest()
        detected = detect_classes(new_steps, self._ctx.policy.data_classes)
        if detected:
            # Recorded on its own, before the claim, so the hit stays on record even when the
            # turn is then refused because the route does not allow the class.
            await self._ctx.auditor.record(
                self._ctx.sessions,
                AuditEntry(
                    "detector.hit",
                    principal,
                    meta,
                    resource_type="conversation",
                    resource_id=audited_id(conversation_id),
                    data_classes=sorted(detected),
                    details={"classes": sorted(detected)},
                ),
            )
        claim = await self._claim(principal, meta, conversation_id, new_steps, fingerprint, idempotency_key, detected)
        if isinstance(claim, dict):
            return claim
        try:
            reply = await self._ctx.upstream.create(
                settings=claim.settings,
                steps=[*claim.history, *new_steps],
                store=claim.decision.provider_storage,
            )
        except UpstreamFailed as exc:
            await asyncio.shield(self._release_failed(principal, meta, conversation_id, claim, exc.code))
            raise
        except BaseException:
            # Cancelled (the client went away) or a bug: give the conversation back first.
            await asyncio.shield(self._release_failed(principal, meta, conversation_id, claim, "turn_aborted"))
            raise
        # From here on the model has answered: finish even if the caller goes away.
        return await asyncio.shield(self._settle(principal, meta, conversation_id, claim, new_steps, reply))

    async def _claim(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        new_steps: list[dict[str, Any]],
        fingerprint: str,
        idempotency_key: str | None,
        detected: set[str],
    ) -> _Claim | dict[str, Any]:
        ctx = self._ctx
        entry = AuditEntry(
            "turn.start",
            principal,
            meta,
            resource_type="conversation",
            resource_id=audited_id(conversation_id),
            details={"input_steps": len(new_steps), "idempotency_key": idempotency_key is not None},
        )
        try:
            async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
                conversation = await owned_conversation(session, principal, conversation_id, lock=True)
                entry.data_classes = list(conversation.data_classes)
                now = await database_now(session)
                leased = bool(
                    conversation.lease_token and conversation.lease_expires_at and conversation.lease_expires_at > now
                )
                if idempotency_key is not None:
                    earlier = await session.get(IdempotencyRecord, (principal.tenant_id, idempotency_key))
                    if earlier is not None:
                        replayed = await _replay(session, ctx, conversation, earlier, fingerprint, leased=leased)
                        if replayed is not None:
                            entry.details["idempotent_replay"] = True
                            return replayed
                if leased:
                    raise TurnInProgress(conversation_id)
                try:
                    route = ctx.policy.route(conversation.route)
                except UnknownRouteError:
                    raise InvalidInput("this conversation's route is no longer in the policy") from None
                raised = detected - set(conversation.data_classes)
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
                    idempotency_key=idempotency_key,
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
                    )
                )
                await session.flush()
                if idempotency_key is not None:
                    session.add(
                        IdempotencyRecord(
                            tenant_id=principal.tenant_id,
                            key=idempotency_key,
                            conversation_id=conversation.id,
                            fingerprint=fingerprint,
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
        try:
            interaction_id = _interaction_id(reply.body)
            if interaction_id is not None:
                await self._ledger(principal, meta, conversation_id, claim, interaction_id)
            finishing = True
            return await self._finish(principal, meta, conversation_id, claim, new_steps, reply)
        except BaseException as exc:
            # Free the turn row and the key. A failed finish was recorded by its audited action;
            # a failed ledger write was not, so it gets its record here.
            code = "lease_lost" if isinstance(exc, TurnInProgress) else outcome_of(exc)[1]
            await self._release_failed(principal, meta, conversation_id, claim, code, audit=not finishing)
            if isinstance(exc, ConversationNotFound):
                # Deleted while the model worked: the copy the provider kept must go too.
                await self._delete_orphaned_copy(principal, meta, conversation_id, reply, claim)
            raise

    async def _ledger(
        self, principal: Principal, meta: RequestMeta, conversation_id: str, claim: _Claim, interaction_id: str
    ) -> None:
        """Record the provider's interaction id before anything else can fail."""
        stored = claim.decision.provider_storage
        async with self._ctx.sessions.begin() as session:
            session.add(
                UpstreamInteraction(
                    id=interaction_id,
                    tenant_id=principal.tenant_id,
                    conversation_id=conversation_id,
                    turn_id=claim.turn_id,
                    stored=stored,
                )
            )
            if stored:
                await append(
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
        reply: UpstreamReply,
    ) -> dict[str, Any]:
        ctx = self._ctx
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
                raise TurnInProgress(conversation_id)
            response = await self._record(session, principal, conversation, claim, new_steps, reply)
            entry.details |= {
                "status": response["status"],
                "steps": len(response["steps"]),
                "upstream_interaction_id": _interaction_id(reply.body),
            }
            return response

    async def _delete_orphaned_copy(
        self, principal: Principal, meta: RequestMeta, conversation_id: str, reply: UpstreamReply, claim: _Claim
    ) -> None:
        """The conversation was deleted while the model worked: its provider copy goes too."""
        interaction_id = _interaction_id(reply.body)
        if claim.decision.provider_storage and interaction_id is not None:
            await delete_provider_copies(self._ctx, principal, meta, conversation_id, [interaction_id])

    async def _record(
        self,
        session: AsyncSession,
        principal: Principal,
        conversation: Conversation,
        claim: _Claim,
        new_steps: list[dict[str, Any]],
        reply: UpstreamReply,
    ) -> dict[str, Any]:
        body = reply.body
        upstream_status = str(body.get("status", ""))
        kept = upstream_status in _KEPT
        # A turn the model did not complete stores nothing, so it returns nothing either: showing
        # output the next turn's model will never see would mislead the caller.
        model_steps: list[Any] = (body.get("steps") or []) if kept else []
        turn = await session.get(Turn, claim.turn_id)
        assert turn is not None
        if kept:
            stored = [*new_steps, *model_steps]
            append_steps(session, claim.cipher, claim.turn_id, conversation.step_count, stored)
            turn.first_position, turn.step_count = conversation.step_count, len(stored)
            conversation.step_count += len(stored)
        usage = _usage(body.get("usage"))
        error_code = None if kept else f"model_{upstream_status or 'no_status'}"[:80]
        turn.status = upstream_status if kept else "failed"
        turn.upstream_status, turn.usage = upstream_status[:40], usage
        turn.upstream_latency_ms, turn.upstream_attempts = reply.latency_ms, reply.attempts
        turn.error_code, turn.finished_at = error_code, func.now()
        conversation.lease_token = conversation.lease_expires_at = None
        conversation.updated_at = func.now()
        response = {
            "conversation_id": conversation.id,
            "turn_id": claim.turn_id,
            "turn_number": claim.turn_number,
            "status": turn.status,
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
        if claim.idempotency_key is not None:
            record = await session.get(IdempotencyRecord, (principal.tenant_id, claim.idempotency_key))
            if record is not None and kept:
                record.response = claim.cipher.seal_record(_RESPONSE, claim.turn_number, response)
                record.response_key_version = claim.cipher.key_version
            elif record is not None:
                # Nothing was stored, so a retry with the same key may run the turn again.
                await session.delete(record)
        return response

    async def _release_failed(
        self,
        principal: Principal,
        meta: RequestMeta,
        conversation_id: str,
        claim: _Claim,
        code: str,
        *,
        audit: bool = True,
    ) -> None:
        """Record the failed turn and give the conversation back; the history is untouched."""
        async with self._ctx.sessions.begin() as session:
            conversation = await session.scalar(
                select(Conversation).where(Conversation.id == conversation_id).with_for_update()
            )
            turn = await session.get(Turn, claim.turn_id)
            if turn is not None and turn.status == "in_progress":
                turn.status, turn.error_code, turn.finished_at = "failed", code[:80], func.now()
            if conversation is not None and conversation.lease_token == claim.lease_token:
                conversation.lease_token = conversation.lease_expires_at = None
            if claim.idempotency_key is not None:
                await session.execute(
                    delete(IdempotencyRecord).where(
                        IdempotencyRecord.tenant_id == principal.tenant_id,
                        IdempotencyRecord.key == claim.idempotency_key,
                        IdempotencyRecord.response.is_(None),
                    )
                )
            if not audit:
                return
            await append(
                session,
                _turn_entry(principal, meta, conversation_id, claim),
                outcome="error",
                reason=code[:80],
            )


async def _replay(
    session: AsyncSession,
    ctx: ServiceContext,
    conversation: Conversation,
    record: IdempotencyRecord,
    fingerprint: str,
    *,
    leased: bool,
) -> dict[str, Any] | None:
    """The stored response for a repeated key; None when the first attempt was abandoned."""
    if record.conversation_id != conversation.id or record.fingerprint != fingerprint:
        raise IdempotencyKeyReused("this Idempotency-Key was used with a different request")
    if record.response is None or record.response_key_version is None:
        if leased:
            raise IdempotencyKeyInFlight("the first request with this Idempotency-Key is still running")
        # Its turn died without finishing (a crashed process, a lost lease): nothing was stored,
        # so the key is free to run the turn again.
        turn = await session.get(Turn, record.turn_id) if record.turn_id else None
        if turn is not None and turn.status == "in_progress":
            turn.status, turn.error_code, turn.finished_at = "failed", "abandoned", func.now()
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


_INTERACTION_ID = re.compile(r"^[\x21-\x7e]{1,200}$")


def _interaction_id(body: dict[str, Any]) -> str | None:
    """The provider's interaction id, when it is a plausible one: it goes into the ledger and
    audit records, which must never hold arbitrary text from a response."""
    value = body.get("id")
    return value if isinstance(value, str) and _INTERACTION_ID.match(value) else None


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
