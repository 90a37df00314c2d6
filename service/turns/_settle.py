"""After the model call: the units of work that store a turn's outcome, each one transaction.

- `ledger`: when the provider keeps copies, their interaction ids (one per hop of the turn) go
  into the ledger of provider copies before anything else can fail, with an `upstream.store`
  record for each (the ids of a turn it keeps nothing of are written by `finish`);
- `finish` (`turn.create`): if the lease is still ours, the new input and the model's steps are
  appended, sealed, at the next positions; the turn's outcome is recorded and the lease released;
- `release`: a turn that failed is closed and its lease and Idempotency-Key given back.

Each is safe to run again after a lost acknowledgement (the database died between the commit and
its answer): the engine retries them while the database is unreachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditEntry
from ..context import ServiceContext
from ..conversations import (
    align_data_keys,
    append_steps,
    encode_json,
    last_activity_deadline,
    seal_day_for,
    utc_day,
    utc_today,
)
from ..errors import ConversationNotFound, LeaseLost
from ..models import Conversation, DataKey, IdempotencyRecord, Turn, UpstreamInteraction
from ._claim import RESULT_LABEL, Claim
from ._reply import Outcome, output_text
from ._types import TurnRequest, TurnResult

__all__ = ["ClaimedTurn"]


@dataclass(frozen=True)
class ClaimedTurn:
    """A claimed turn: the request, its validated input and its claim, with the units of work
    that store what became of it."""

    ctx: ServiceContext
    request: TurnRequest
    new_steps: list[dict[str, Any]] = field(repr=False)
    claim: Claim

    @cached_property
    def new_step_bytes(self) -> list[bytes]:
        """The client's steps as stored and sent: the compact JSON of each validated value."""
        return [encode_json(step) for step in self.new_steps]

    def result(self, outcome: Outcome) -> TurnResult:
        claim = self.claim
        return TurnResult(
            conversation_id=self.request.conversation_id,
            turn_id=claim.turn_id,
            turn_number=claim.turn_number,
            status=outcome.status,
            error_code=outcome.error_code,
            steps=outcome.model_steps,
            output_text=output_text(outcome.model_steps),
            usage=outcome.usage,
            store=claim.decision.provider_storage,
            storage_reason=claim.decision.reason,
            policy_version=claim.policy_version,
        )

    def turn_entry(self) -> AuditEntry:
        """The `turn.create` record of this turn, with its storage decision."""
        claim = self.claim
        return AuditEntry(
            "turn.create",
            self.request.principal,
            self.request.meta,
            resource_type="turn",
            resource_id=claim.turn_id,
            data_classes=claim.data_classes,
            policy_version=claim.policy_version,
            details={
                "conversation_id": self.request.conversation_id,
                "store": claim.decision.provider_storage,
                "storage_reason": claim.decision.code,
            },
        )

    async def ledger(self, interaction_ids: list[str], retry: bool) -> None:
        """Record the provider's interaction ids; each is written once, however often this runs."""
        claim, principal = self.claim, self.request.principal
        stored = claim.decision.provider_storage
        async with self.ctx.sessions.begin() as session:
            inserted = await self._insert_ledger(session, interaction_ids)
            for interaction_id in inserted if stored else []:
                await self.ctx.auditor.append(
                    session,
                    AuditEntry(
                        "upstream.store",
                        principal,
                        self.request.meta,
                        resource_type="upstream_interaction",
                        resource_id=interaction_id,
                        data_classes=claim.data_classes,
                        policy_version=claim.policy_version,
                        details={"conversation_id": self.request.conversation_id, "turn_id": claim.turn_id},
                    ),
                )

    async def _insert_ledger(self, session: AsyncSession, interaction_ids: list[str]) -> list[str]:
        """The ids not on the ledger yet, now written there."""
        inserted = await session.scalars(
            insert(UpstreamInteraction)
            .values(
                [
                    {
                        "id": interaction_id,
                        "tenant_id": self.request.principal.tenant_id,
                        "conversation_id": self.request.conversation_id,
                        "turn_id": self.claim.turn_id,
                        "stored": self.claim.decision.provider_storage,
                    }
                    for interaction_id in interaction_ids
                ]
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(UpstreamInteraction.id)
        )
        return list(inserted.all())

    async def finish(self, outcome: Outcome, retry: bool) -> TurnResult:
        """Store the outcome, if the lease is still ours; the result the caller gets.

        A few statements, none through the ORM's unit of work: the conversation's row is updated
        only while our lease token is on it (which also locks it), the steps go in as one
        multi-row insert at the positions the claim saw free (nobody else appends while the lease
        is ours), then the turn row, the interaction ids of a turn the provider keeps nothing of,
        the Idempotency-Key's sealed answer, and the `turn.create` record.
        """
        result = self.result(outcome)
        if retry and await self._finished_earlier(outcome):
            # The commit of an earlier attempt went through but its acknowledgement was lost with
            # the connection: the turn and its record are stored; writing again would duplicate.
            return result
        claim, request = self.claim, self.request
        stored = [*self.new_step_bytes, *outcome.model_step_bytes] if outcome.kept else []
        async with self.ctx.auditor.action(self.ctx.sessions, self.turn_entry()) as (session, entry):
            moved = (
                await session.execute(
                    update(Conversation)
                    .where(Conversation.id == request.conversation_id, Conversation.lease_token == claim.lease_token)
                    .values(
                        step_count=Conversation.step_count + len(stored),
                        lease_token=None,
                        lease_expires_at=None,
                        # Activity now: delete_after counts from here.
                        updated_at=func.now(),
                        purge_at=last_activity_deadline(),
                    )
                    .returning(
                        Conversation.step_count - len(stored),
                        utc_day(Conversation.purge_at),
                        utc_today(self.ctx.clock),
                        select(DataKey.expiry_day).where(DataKey.conversation_id == Conversation.id).scalar_subquery(),
                    )
                    .execution_options(synchronize_session=False)
                )
            ).one_or_none()
            if moved is None:
                # Deleted meanwhile, or our lease expired and another turn took over: appending
                # now would resurrect or fork the history. (Raising records a denied turn.create;
                # the engine then releases the turn row and the key.)
                if await session.scalar(select(Conversation.id).where(Conversation.id == request.conversation_id)):
                    self.ctx.metrics.lease_conflict("lost", request.principal.tenant_id)
                    raise LeaseLost(request.conversation_id)
                raise ConversationNotFound(request.conversation_id)
            first_position, purge_day, today, key_day = moved
            await append_steps(session, claim.cipher, claim.turn_id, first_position, stored)
            finished = await session.scalar(
                update(Turn)
                .where(Turn.id == claim.turn_id)
                .values(
                    status=outcome.status,
                    error_code=outcome.error_code,
                    upstream_status=outcome.upstream_status[:40],
                    usage=outcome.usage,
                    upstream_latency_ms=outcome.reply.latency_ms,
                    upstream_attempts=outcome.reply.attempts,
                    finished_at=func.now(),
                    **({"first_position": first_position, "step_count": len(stored)} if outcome.kept else {}),
                )
                .returning(Turn.id)
                .execution_options(synchronize_session=False)
            )
            if finished is None:  # the claim created it, and only a deletion (checked above) removes it
                raise ConversationNotFound(request.conversation_id)
            if not claim.decision.provider_storage and outcome.reply.interaction_ids:
                # The provider keeps nothing of this turn: its ids need not be on record before
                # anything else can fail, so they ride in this transaction.
                await self._insert_ledger(session, outcome.reply.interaction_ids)
            if key_day != seal_day_for(purge_day, today):
                # The deadline moved to another day: the data key's expiry layer follows it.
                await align_data_keys(session, self.ctx, [request.conversation_id])
            if claim.key_digest is not None:
                await self._answer_key(session, outcome, result)
            entry.details |= {
                "status": outcome.status,
                "steps": len(outcome.model_steps),
                "upstream_interaction_id": outcome.last_interaction,
            }
        return result

    async def _finished_earlier(self, outcome: Outcome) -> bool:
        async with self.ctx.sessions() as session:
            turn = await session.get(Turn, self.claim.turn_id)
        return turn is not None and turn.status == outcome.status and turn.error_code == outcome.error_code

    async def _answer_key(self, session: AsyncSession, outcome: Outcome, result: TurnResult) -> None:
        """Seal the answer under this turn's Idempotency-Key, or free the key when nothing was
        stored (a retry may run the turn again). Only this turn's record: after a takeover the
        key names another turn's record, which is not ours to touch."""
        claim = self.claim
        mine = (
            IdempotencyRecord.tenant_id == self.request.principal.tenant_id,
            IdempotencyRecord.key == claim.key_digest,
            IdempotencyRecord.turn_id == claim.turn_id,
        )
        if outcome.kept:
            await session.execute(
                update(IdempotencyRecord)
                .where(*mine)
                .values(
                    response=claim.cipher.seal_record(RESULT_LABEL, claim.turn_number, result.to_record()),
                    response_key_version=claim.cipher.key_version,
                )
                .execution_options(synchronize_session=False)
            )
        else:
            await session.execute(delete(IdempotencyRecord).where(*mine).execution_options(synchronize_session=False))

    async def release(self, code: str, attempts: int, retry: bool, *, audit: bool = True) -> bool:
        """Record the failed turn and give the conversation back; the history is untouched.
        Idempotent: a turn already closed (by an earlier attempt or a takeover) stays as it is.
        False when the conversation is gone (deleted while the model worked)."""
        claim, principal = self.claim, self.request.principal
        async with self.ctx.sessions.begin() as session:
            conversation = await session.scalar(
                select(Conversation).where(Conversation.id == self.request.conversation_id).with_for_update()
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
            if audit and closing:
                entry = self.turn_entry()
                entry.details["upstream_attempts"] = attempts
                await self.ctx.auditor.append(session, entry, outcome="error", reason=code[:80])
            return conversation is not None
