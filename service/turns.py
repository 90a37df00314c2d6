"""The turn engine: claim the conversation, replay its history to the model, store the reply.

A turn is three steps, and no database transaction stays open across the model call:

1. claim (one short transaction): lock the conversation row, check the Idempotency-Key, refuse
   with 409 if another turn holds an unexpired lease, decrypt the history, check the input
   against pending function calls, decide provider storage, take the lease, record the turn;
2. call the model with the whole history plus the new input as `input`, `store` as decided, and
   the route's settings re-sent (design invariants 3 and 4);
3. finish (one transaction): if the lease is still ours, append the new input and the model's
   steps, sealed, at the next positions, record the outcome, release the lease.

The lease is a row value, so it holds across any number of service processes; it expires so a
crashed process cannot wedge a conversation. The input is stored with the reply, not at the
claim: a failed model call leaves the history exactly as it was, never with an unanswered input.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .auth import Principal, new_id
from .client_input import check_function_results, normalize_client_input
from .context import ServiceContext
from .errors import (ConversationNotFound, IdempotencyKeyInFlight, IdempotencyKeyReused, InvalidInput,
                     TurnInProgress, UpstreamFailed)
from .history import ConversationCipher, append_steps, encode_json, load_cipher, read_steps
from .models import Conversation, IdempotencyRecord, Turn, UpstreamInteraction
from .policy import StorageDecision, UnknownRouteError, decide_storage
from .upstream import UpstreamReply

__all__ = ["TurnEngine", "output_text"]

_RESPONSE = "response"
_USAGE_FIELDS = ("total_input_tokens", "total_output_tokens", "total_thought_tokens",
                 "total_cached_tokens", "total_tool_use_tokens", "total_tokens")


@dataclass(frozen=True)
class _Claim:
    turn_id: str
    turn_number: int
    lease_token: str
    cipher: ConversationCipher
    history: list[Any]
    settings: dict[str, Any]
    decision: StorageDecision
    policy_version: str
    idempotency_key: str | None


class TurnEngine:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    async def run(
        self, principal: Principal, conversation_id: str, raw_input: Any, idempotency_key: str | None
    ) -> dict[str, Any]:
        """Run one turn; returns the response body (replayed as first sent for a repeated key)."""
        new_steps = normalize_client_input(raw_input)
        fingerprint = hashlib.sha256(encode_json([conversation_id, new_steps])).hexdigest()
        claim = await self._claim(principal, conversation_id, new_steps, fingerprint, idempotency_key)
        if isinstance(claim, dict):
            return claim
        try:
            reply = await self._ctx.upstream.create(
                settings=claim.settings, steps=[*claim.history, *new_steps],
                store=claim.decision.provider_storage,
            )
        except UpstreamFailed as exc:
            await self._release_failed(principal, conversation_id, claim, exc.code)
            raise
        except BaseException:
            # Cancelled (client went away) or a bug: give the conversation back before leaving.
            await asyncio.shield(self._release_failed(principal, conversation_id, claim, "turn_aborted"))
            raise
        return await self._finish(principal, conversation_id, claim, new_steps, reply)

    async def _claim(
        self, principal: Principal, conversation_id: str, new_steps: list[dict[str, Any]],
        fingerprint: str, idempotency_key: str | None,
    ) -> _Claim | dict[str, Any]:
        ctx = self._ctx
        try:
            async with ctx.sessions.begin() as session:
                conversation = await _lock(session, principal, conversation_id)
                if idempotency_key is not None:
                    earlier = await session.get(IdempotencyRecord, (principal.tenant_id, idempotency_key))
                    if earlier is not None:
                        return await _replay(session, ctx, conversation, earlier, fingerprint)
                now = await session.scalar(select(func.now()))
                if conversation.lease_token and conversation.lease_expires_at and conversation.lease_expires_at > now:
                    raise TurnInProgress(conversation_id)
                try:
                    route = ctx.policy.route(conversation.route)
                except UnknownRouteError:
                    raise InvalidInput(f"route {conversation.route!r} is no longer in the policy") from None
                cipher = await load_cipher(session, ctx.keyring, conversation)
                history = [step for _, _, step in await read_steps(session, cipher)]
                check_function_results(history, new_steps)
                decision = decide_storage(route, conversation.data_classes, ctx.policy.data_classes)
                claim = _Claim(
                    turn_id=new_id("turn"), turn_number=conversation.turn_count + 1,
                    lease_token=new_id("lease"), cipher=cipher, history=history,
                    settings=route.upstream_settings(), decision=decision,
                    policy_version=ctx.policy.version, idempotency_key=idempotency_key,
                )
                conversation.lease_token = claim.lease_token
                conversation.lease_expires_at = now + timedelta(seconds=ctx.turn_lease_seconds)
                conversation.turn_count = claim.turn_number
                session.add(Turn(
                    id=claim.turn_id, conversation_id=conversation.id, number=claim.turn_number,
                    status="in_progress", provider_storage=decision.provider_storage,
                    storage_reason=decision.reason, policy_version=claim.policy_version,
                ))
                await session.flush()
                if idempotency_key is not None:
                    session.add(IdempotencyRecord(
                        tenant_id=principal.tenant_id, key=idempotency_key, conversation_id=conversation.id,
                        fingerprint=fingerprint, turn_id=claim.turn_id,
                    ))
                return claim
        except IntegrityError:
            # The same key raced in on another conversation of this tenant.
            raise IdempotencyKeyInFlight("this Idempotency-Key is being used by another request") from None

    async def _finish(
        self, principal: Principal, conversation_id: str, claim: _Claim,
        new_steps: list[dict[str, Any]], reply: UpstreamReply,
    ) -> dict[str, Any]:
        body = reply.body
        async with self._ctx.sessions.begin() as session:
            conversation = await session.scalar(
                select(Conversation).where(Conversation.id == conversation_id).with_for_update()
            )
            if isinstance(body.get("id"), str) and body["id"]:
                # The ledger of provider copies, kept whatever happened to the conversation.
                session.add(UpstreamInteraction(
                    id=body["id"], tenant_id=principal.tenant_id, conversation_id=conversation_id,
                    turn_id=claim.turn_id, stored=claim.decision.provider_storage,
                ))
            if conversation is None or conversation.lease_token != claim.lease_token:
                # Deleted meanwhile, or our lease expired and another turn took over: appending
                # now would resurrect or fork the history.
                turn = await session.get(Turn, claim.turn_id)
                if turn is not None:
                    turn.status, turn.error_code, turn.finished_at = "failed", "lease_lost", func.now()
                lost = True
            else:
                lost = False
                response = await self._record(session, principal, conversation, claim, new_steps, reply)
        if lost:
            if conversation is None:
                raise ConversationNotFound(conversation_id)
            raise TurnInProgress(conversation_id)
        return response

    async def _record(
        self, session: AsyncSession, principal: Principal, conversation: Conversation, claim: _Claim,
        new_steps: list[dict[str, Any]], reply: UpstreamReply,
    ) -> dict[str, Any]:
        body = reply.body
        model_steps: list[Any] = body.get("steps") or []
        upstream_status = str(body.get("status", ""))
        # Only these leave a history the model can continue from; anything else (failed,
        # incomplete, cancelled...) is recorded and leaves the history as it was.
        kept = upstream_status in ("completed", "requires_action")
        status = upstream_status if kept else "failed"
        conversation_id = conversation.id
        turn = await session.get(Turn, claim.turn_id)
        assert turn is not None
        if kept:
            stored = [*new_steps, *model_steps]
            append_steps(session, claim.cipher, claim.turn_id, conversation.step_count, stored)
            turn.first_position, turn.step_count = conversation.step_count, len(stored)
            conversation.step_count += len(stored)
        usage = _usage(body.get("usage"))
        turn.status, turn.upstream_status, turn.usage = status, upstream_status[:40], usage
        turn.upstream_latency_ms, turn.upstream_attempts = reply.latency_ms, reply.attempts
        turn.error_code = None if kept else f"model_{upstream_status or 'no_status'}"[:80]
        turn.finished_at = func.now()
        conversation.lease_token = conversation.lease_expires_at = None
        conversation.updated_at = func.now()
        response = {
            "conversation_id": conversation_id,
            "turn_id": claim.turn_id,
            "turn_number": claim.turn_number,
            "status": status,
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
            if record is not None:
                record.response = claim.cipher.seal_record(_RESPONSE, claim.turn_number, response)
                record.response_key_version = claim.cipher.key_version
        return response

    async def _release_failed(self, principal: Principal, conversation_id: str, claim: _Claim, code: str) -> None:
        """Record the failed turn and give the conversation back; the history is untouched."""
        async with self._ctx.sessions.begin() as session:
            conversation = await session.scalar(
                select(Conversation).where(Conversation.id == conversation_id).with_for_update()
            )
            turn = await session.get(Turn, claim.turn_id)
            if turn is not None:
                turn.status, turn.error_code, turn.finished_at = "failed", code[:80], func.now()
            if conversation is not None and conversation.lease_token == claim.lease_token:
                conversation.lease_token = conversation.lease_expires_at = None
            if claim.idempotency_key is not None:
                # Nothing was stored, so a retry with the same key may run the turn again.
                await session.execute(delete(IdempotencyRecord).where(
                    IdempotencyRecord.tenant_id == principal.tenant_id,
                    IdempotencyRecord.key == claim.idempotency_key))


async def _lock(session: AsyncSession, principal: Principal, conversation_id: str) -> Conversation:
    conversation = await session.scalar(
        select(Conversation)
        .where(Conversation.id == conversation_id, Conversation.tenant_id == principal.tenant_id)
        .with_for_update()
    )
    if conversation is None:
        raise ConversationNotFound(conversation_id)
    return conversation


async def _replay(
    session: AsyncSession, ctx: ServiceContext, conversation: Conversation,
    record: IdempotencyRecord, fingerprint: str,
) -> dict[str, Any]:
    if record.conversation_id != conversation.id or record.fingerprint != fingerprint:
        raise IdempotencyKeyReused("this Idempotency-Key was used with a different request")
    if record.response is None or record.response_key_version is None:
        raise IdempotencyKeyInFlight("the first request with this Idempotency-Key is still running")
    turn = await session.get(Turn, record.turn_id)
    cipher = await load_cipher(session, ctx.keyring, conversation)
    number = turn.number if turn is not None else 0
    replayed: dict[str, Any] = cipher.open_record(_RESPONSE, number, record.response_key_version, record.response)
    return replayed


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
