"""After the model call: the units of work that store a turn's outcome, each one transaction.

- `ledger`: the provider's interaction ids (one per hop of the turn) go into the ledger of
  provider copies before anything else can fail, with an `upstream.store` record for each copy
  the provider keeps;
- `finish` (`turn.create`): if the lease is still ours, the new input and the model's steps are
  appended, sealed, at the next positions; the turn's outcome is recorded and the lease released;
- `release`: a turn that failed is closed and its lease and Idempotency-Key given back.

Each is safe to run again after a lost acknowledgement (the database died between the commit and
its answer): the engine retries them while the database is unreachable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditEntry
from ..context import ServiceContext
from ..conversations import align_data_keys, append_steps, last_activity_deadline
from ..errors import ConversationNotFound, LeaseLost
from ..models import Conversation, IdempotencyRecord, Turn, UpstreamInteraction
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
            inserted = await session.scalars(
                insert(UpstreamInteraction)
                .values(
                    [
                        {
                            "id": interaction_id,
                            "tenant_id": principal.tenant_id,
                            "conversation_id": self.request.conversation_id,
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

    async def finish(self, outcome: Outcome, retry: bool) -> TurnResult:
        """Store the outcome, if the lease is still ours; the result the caller gets."""
        result = self.result(outcome)
        if retry and await self._finished_earlier(outcome):
            # The commit of an earlier attempt went through but its acknowledgement was lost with
            # the connection: the turn and its record are stored; writing again would duplicate.
            return result
        async with self.ctx.auditor.action(self.ctx.sessions, self.turn_entry()) as (session, entry):
            conversation = await session.scalar(
                select(Conversation).where(Conversation.id == self.request.conversation_id).with_for_update()
            )
            if conversation is None or conversation.lease_token != self.claim.lease_token:
                # Deleted meanwhile, or our lease expired and another turn took over: appending
                # now would resurrect or fork the history. (Raising records a denied turn.create;
                # the engine then releases the turn row and the key.)
                if conversation is None:
                    raise ConversationNotFound(self.request.conversation_id)
                self.ctx.metrics.lease_conflict("lost", self.request.principal.tenant_id)
                raise LeaseLost(self.request.conversation_id)
            await self._record(session, conversation, outcome, result)
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

    async def _record(
        self, session: AsyncSession, conversation: Conversation, outcome: Outcome, result: TurnResult
    ) -> None:
        claim = self.claim
        turn = await session.get(Turn, claim.turn_id)
        if turn is None:  # the claim created it, and only a deletion (checked above) removes it
            raise ConversationNotFound(self.request.conversation_id)
        if outcome.kept:
            # A turn the model did not complete stores nothing: the history stays as it was.
            stored = [*self.new_steps, *outcome.model_steps]
            append_steps(session, claim.cipher, claim.turn_id, conversation.step_count, stored)
            turn.first_position, turn.step_count = conversation.step_count, len(stored)
            conversation.step_count += len(stored)
        turn.status, turn.error_code = outcome.status, outcome.error_code
        turn.upstream_status, turn.usage = outcome.upstream_status[:40], outcome.usage
        turn.upstream_latency_ms, turn.upstream_attempts = outcome.reply.latency_ms, outcome.reply.attempts
        turn.finished_at = func.now()
        conversation.lease_token = conversation.lease_expires_at = None
        # Activity now: delete_after counts from here.
        conversation.updated_at = func.now()
        conversation.purge_at = last_activity_deadline()
        # A deadline moved to another day takes the data key's expiry layer with it.
        await align_data_keys(session, self.ctx, [conversation.id])
        if claim.key_digest is not None:
            record = await session.get(IdempotencyRecord, (self.request.principal.tenant_id, claim.key_digest))
            if record is not None and record.turn_id != claim.turn_id:
                record = None  # the key now names another turn's record (a takeover): not ours to touch
            if record is not None and outcome.kept:
                record.response = claim.cipher.seal_record(RESULT_LABEL, claim.turn_number, result.to_record())
                record.response_key_version = claim.cipher.key_version
            elif record is not None:
                # Nothing was stored, so a retry with the same key may run the turn again.
                await session.delete(record)

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
