"""After the model call: the units of work that store a turn's outcome, each one transaction.

- `ledger`: when the provider keeps copies, their interaction ids (one per hop of the turn) go
  into the ledger of provider copies before anything else can fail, with an `upstream.store`
  record for each (the ids of a turn it keeps nothing of are written by `finish`);
- `finish` (`turn.create`): if the lease is still ours, the new input and the model's steps are
  appended, sealed, at the next positions; the turn's outcome is recorded and the lease released;
  with provider storage, the turn's last interaction becomes the copy the next turn chains onto;
- `release`: a turn that failed is closed and its lease and Idempotency-Key given back.

Each is safe to run again after a lost acknowledgement (the database died between the commit and
its answer): the engine retries them while the database is unreachable.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from ..audit import AuditEntry
from ..context import ServiceContext
from ..conversations import align_data_keys, encode_json, last_activity_deadline, rule_values, seal_day_for
from ..database import run_sql
from ..detectors import Findings
from ..errors import ConversationNotFound, LeaseLost, ModelOutputRefused
from ..models import Conversation, IdempotencyRecord, Turn, UpstreamInteraction
from ..policy import decide_storage
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
            # A turn the fallback answered was not sent with store (generateContent keeps nothing).
            store=claim.decision.provider_storage and outcome.reply.surface == "interactions",
            storage_reason=claim.decision.reason,
            policy_version=claim.policy_version,
        )

    def storage_permitted_after(self, findings: Findings) -> bool:
        """Whether provider storage is still permitted once the classes the detectors found in
        the model's answer are added to the conversation's."""
        route = self.ctx.policy.routes.get(self.claim.route)
        if route is None or not self.claim.decision.provider_storage:
            return False
        if not findings.classes - set(self.claim.data_classes):
            return True
        classes = {*self.claim.data_classes, *findings.classes}
        return decide_storage(route, classes, self.ctx.policy.data_classes).provider_storage

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

    async def finish(self, outcome: Outcome, findings: Findings, retry: bool) -> TurnResult:
        """Store the outcome, if the lease is still ours; the result the caller gets.

        One statement (`_FINISH`) does the turn's writes, so the unit of work is that statement,
        the Idempotency-Key's sealed answer when there is a key, and the `turn.create` record.
        """
        result = self.result(outcome)
        if retry and await self._finished_earlier(outcome):
            # The commit of an earlier attempt went through but its acknowledgement was lost with
            # the connection: the turn and its record are stored; writing again would duplicate.
            return result
        claim, request = self.claim, self.request
        stored = [*self.new_step_bytes, *outcome.model_step_bytes] if outcome.kept else []
        # Sealed at the positions the claim saw free: nobody else appends while the lease is ours,
        # and the statement checks that it is so.
        sealed = [claim.cipher.seal_step(claim.step_count + offset, step) for offset, step in enumerate(stored)]
        unstored_ids = [] if claim.decision.provider_storage else outcome.reply.interaction_ids
        # The copy the next turn may chain onto: the last interaction of a kept turn, when the
        # provider may keep it (none otherwise: the history moves on without the provider). A
        # turn that kept nothing leaves the chain as it was, like the history.
        chain_after = outcome.last_interaction if self.storage_permitted_after(findings) else None
        history_sent = outcome.reply.history_sent
        async with self.ctx.auditor.action(self.ctx.sessions, self.turn_entry()) as (session, entry):
            if findings:
                await self._take_output_classes(session, entry, findings)
            finished = (
                await run_sql(
                    session,
                    _FINISH,
                    request.conversation_id,
                    claim.lease_token,
                    claim.step_count,
                    claim.turn_id,
                    sealed,
                    claim.cipher.key_version,
                    outcome.status,
                    outcome.error_code,
                    outcome.upstream_status[:40],
                    json.dumps(outcome.usage),
                    outcome.reply.latency_ms,
                    outcome.reply.attempts,
                    outcome.kept,
                    request.principal.tenant_id,
                    unstored_ids,
                    self.ctx.clock.offset,
                    chain_after,
                    history_sent,
                )
            ).one_or_none()
            if finished is None:
                # Deleted meanwhile, or our lease expired and another turn took over: appending
                # now would resurrect or fork the history. (Raising records a denied turn.create;
                # the engine then releases the turn row and the key.)
                if await session.scalar(select(Conversation.id).where(Conversation.id == request.conversation_id)):
                    self.ctx.metrics.lease_conflict("lost", request.principal.tenant_id)
                    raise LeaseLost(request.conversation_id)
                raise ConversationNotFound(request.conversation_id)
            if finished.first_position != claim.step_count or not finished.turn_found:
                # The history moved under a lease we still hold, or the claim's turn row is gone:
                # neither can happen while the lease works, so store nothing (the raise rolls
                # the statement back) rather than a history with a hole or an overlap.
                raise ConversationNotFound(request.conversation_id)
            if finished.key_day != seal_day_for(finished.purge_day, finished.today):
                # The deadline moved to another day: the data key's expiry layer follows it.
                await align_data_keys(session, self.ctx, [request.conversation_id])
            if claim.key_digest is not None:
                await self._answer_key(session, outcome, result)
            entry.details |= {
                "status": outcome.status,
                "steps": len(outcome.model_steps),
                "upstream_interaction_id": outcome.last_interaction,
                "history_sent": history_sent,
                "surface": outcome.reply.surface,
            }
            if outcome.reply.fallback_reason is not None:
                # The route's fallback answered: the turn row says so too (its steps are stored
                # as converted Interactions steps; the provider kept nothing of it).
                entry.details["fallback_reason"] = outcome.reply.fallback_reason
                await session.execute(
                    update(Turn)
                    .where(Turn.id == claim.turn_id)
                    .values(surface=outcome.reply.surface)
                    .execution_options(synchronize_session=False)
                )
        return result

    async def _take_output_classes(self, session: AsyncSession, entry: AuditEntry, findings: Findings) -> None:
        """What the detectors found in the model's answer: a class the route blocks or does not
        allow, or a card security code, refuses the turn (raising rolls this transaction back:
        nothing of the turn is stored); a new class the route allows raises the conversation's
        classification, and its retention rule with it, in this transaction."""
        claim = self.claim
        route = self.ctx.policy.routes.get(claim.route)
        raised = findings.classes - set(claim.data_classes)
        refused = ((findings.classes & route.blocked_classes) | (raised - route.data_classes)) if route else raised
        if findings.refused_by or refused:
            entry.details["blocked_classes"] = sorted(refused or findings.classes)
            raise ModelOutputRefused(claim.route, refused or findings.classes)
        if not raised:
            return
        classes = sorted({*claim.data_classes, *raised})
        await session.execute(
            update(Conversation)
            .where(Conversation.id == self.request.conversation_id)
            .values(
                data_classes=classes,
                **rule_values(self.ctx.policy.retention_for(claim.route, classes), self.ctx.policy.version),
            )
            .execution_options(synchronize_session=False)
        )
        entry.data_classes = classes
        entry.details["classification_raised"] = sorted(raised)

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

    async def release(
        self,
        code: str,
        attempts: int,
        retry: bool,
        *,
        audit: bool = True,
        sent: str = "replayed",
        fallback_failed: str | None = None,
    ) -> bool:
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
                turn.upstream_attempts, turn.history_sent = attempts, sent
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
                entry.details |= {"upstream_attempts": attempts, "history_sent": sent}
                if fallback_failed is not None:
                    # The route's generateContent fallback was tried too, and failed so.
                    entry.details["fallback_failed"] = fallback_failed
                await self.ctx.auditor.append(session, entry, outcome="error", reason=code[:80])
            return conversation is not None


def _sql(expression: ColumnElement[Any]) -> str:
    """A SQLAlchemy expression as SQL text, so the rule it states is written once."""
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]
    return str(expression.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))


# A finished turn's writes in one statement, one round trip: release the lease, move the
# deadline and, for a kept turn, set the chain (only while our lease token is on the row, which
# also locks it); append the sealed
# steps at the positions the claim saw free; record the turn's outcome; put the ids of
# interactions the provider kept nothing of on the ledger. It answers where the history now
# starts and what the data key's expiry layer needs to know, or no row when the lease is gone
# (then nothing was written). Data-modifying CTEs all run, against one snapshot.
# (S608: constant SQL and a compiled expression; every value is a parameter.)
_FINISH = f"""
WITH conversation AS (
    UPDATE conversations
    SET step_count = step_count + cardinality($5::bytea[]),
        lease_token = NULL,
        lease_expires_at = NULL,
        updated_at = now(),
        purge_at = {_sql(last_activity_deadline())},
        provider_chain_id = CASE WHEN $13 THEN $17::varchar ELSE provider_chain_id END
    WHERE id = $1 AND lease_token = $2
    RETURNING step_count - cardinality($5::bytea[]) AS first_position, purge_at
), appended AS (
    INSERT INTO steps (conversation_id, position, turn_id, key_version, sealed)
    SELECT $1, $3 + step.ordinality - 1, $4, $6, step.sealed
    FROM conversation, unnest($5::bytea[]) WITH ORDINALITY AS step(sealed, ordinality)
    WHERE conversation.first_position = $3
), finished AS (
    UPDATE turns
    SET status = $7,
        error_code = $8,
        upstream_status = $9,
        usage = $10::jsonb,
        upstream_latency_ms = $11,
        upstream_attempts = $12,
        history_sent = $18,
        finished_at = now(),
        first_position = CASE WHEN $13 THEN $3 ELSE turns.first_position END,
        step_count = CASE WHEN $13 THEN cardinality($5::bytea[]) ELSE turns.step_count END
    FROM conversation
    WHERE turns.id = $4
    RETURNING turns.id
), ledger AS (
    INSERT INTO upstream_interactions (id, tenant_id, conversation_id, turn_id, stored, delete_attempts)
    SELECT interaction_id, $14, $1, $4, false, 0
    FROM conversation, unnest($15::text[]) AS interaction_id
    ON CONFLICT (id) DO NOTHING
)
SELECT conversation.first_position,
       CAST(timezone('UTC', conversation.purge_at) AS DATE) AS purge_day,
       CAST(timezone('UTC', clock_timestamp() + $16::interval) AS DATE) AS today,
       (SELECT expiry_day FROM data_keys WHERE conversation_id = $1) AS key_day,
       EXISTS (SELECT 1 FROM finished) AS turn_found
FROM conversation
"""  # noqa: S608
