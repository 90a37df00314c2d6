"""Background turns: the model runs the turn after the request is answered (202), and Custody
polls it until it ends, then stores its answer with the same guarantees as a foreground turn's.

Only where the route permits background turns and the storage decision permits provider storage
(a background interaction is always one the provider keeps); anywhere else the request is refused
(422 `background-not-permitted`) before anything is stored or sent.

1. start: the claim as for any turn (lease, turn row, Idempotency-Key, `turn.start`); the input
   steps sealed into the turn row under the conversation's data key (`pending_input`), so that
   whichever replica stores the answer can store the input with it; the upstream create with
   `background=true, store=true`; its interaction id on the ledger of provider copies at once
   (with its `upstream.store` record) and on the turn row. The caller gets 202.
2. follow: a poller task in this replica renews the lease and GETs the interaction every
   `background_poll_seconds`. While it runs the conversation stays leased, so new turns get 409.
3. settle: once the interaction has ended, the turn's claim is rebuilt from its row, its
   conversation and the unsealed input, and the engine's settling stores it: the detectors over
   the model's answer, then `finish` (input and answer appended, sealed, if the lease is still
   ours), or `release` when the model did not complete it.

A replica that dies leaves its lease to run out: the reaper and a new turn's takeover leave a
background turn alone (service/leases.py), and the sweep every replica runs (`resume_orphans`)
takes the lease of a running background turn whose lease has expired and follows it from there.
`cancel` closes the turn locally (failed, `cancelled`; lease and Idempotency-Key given back,
nothing stored) and then cancels the interaction upstream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from typing import Any

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditEntry, RequestMeta, outcome_of
from ..auth import Principal
from ..context import ServiceContext
from ..conversations import decode_json, load_cipher, owned_conversation, read_steps
from ..database_errors import database_unreachable
from ..errors import BackgroundNotPermitted, LeaseLost, TurnNotFound, TurnNotRunning, UpstreamFailed
from ..ids import audited_conversation_id, is_conversation_id, is_id_of, new_id
from ..keyed_digests import idempotency_key_digest
from ..leases import renew_lease
from ..models import Conversation, IdempotencyRecord, Turn
from ..policy import StorageDecision, decide_storage
from ..upstream import UpstreamReply
from ._claim import Claim, Inspected, claim_turn
from ._engine import TurnEngine
from ._input import normalize_client_input
from ._reply import output_text
from ._settle import ClaimedTurn
from ._types import TurnRequest, TurnResult

__all__ = ["BackgroundTurns", "TurnView"]

logger = logging.getLogger("custody.turns")

# What a background turn's input is sealed under (with the conversation's data key and the turn's
# number), beside RESULT_LABEL's idempotent answers.
PENDING_LABEL = "pending_input"
# The interaction's statuses while the model still works on it; any other has ended.
_RUNNING = frozenset({"queued", "in_progress"})
# Steps only a client sends: a turn's stored steps are its input, then the model's.
_CLIENT_STEPS = frozenset({"user_input", "function_result"})
_SWEEP_BATCH = 100
# The actor's request is long gone when a poller stores the answer.
_NO_REQUEST = RequestMeta(address=None, request_id=None)


@dataclass(frozen=True)
class TurnView:
    """A turn as `GET .../turns/{turn_id}` shows it: its progress and, once it has an answer, the
    answer as the foreground turn would have returned it."""

    conversation_id: str
    turn_id: str
    turn_number: int
    status: str
    error_code: str | None
    background: bool
    result: TurnResult | None = None


def _poll_name(turn_id: str) -> str:
    return f"poll:{turn_id}"


class BackgroundTurns:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        # The engine's units of work, retried while the database is unreachable, and its settling.
        self._engine = TurnEngine(ctx)

    # --- start -----------------------------------------------------------------------------------

    async def start(self, request: TurnRequest) -> TurnView:
        """Claim the turn and start the model on it in the background; the turn as it is now (a
        repeated Idempotency-Key gets the first turn's answer)."""
        ctx = self._ctx
        new_steps = normalize_client_input(request.raw_input)
        key = request.idempotency_key
        key_digest = idempotency_key_digest(ctx.pepper, request.principal.tenant_id, key) if key else None
        inspected = await self._engine._inspect(request, new_steps)
        await self._refuse_unless_permitted(request, inspected)
        claim = await claim_turn(ctx, request, new_steps, inspected, key_digest)
        if isinstance(claim, TurnResult):
            return TurnView(
                claim.conversation_id, claim.turn_id, claim.turn_number, claim.status, claim.error_code, True, claim
            )
        turn = ClaimedTurn(ctx, request, new_steps, claim)
        # Past the request's life: a caller who goes away stops neither a model that may already
        # be working nor the record of the copy it keeps.
        task = ctx.tasks.spawn(self._launch(turn), name=f"launch:{claim.turn_id}")
        await self._engine._wait_stored(task)
        return TurnView(request.conversation_id, claim.turn_id, claim.turn_number, "in_progress", None, True)

    async def _refuse_unless_permitted(self, request: TurnRequest, inspected: Inspected) -> None:
        """422 before anything is stored or sent, unless the route permits background turns and
        provider storage is permitted for the conversation's classes (with those the detectors
        found in this input and the route would raise it to). A conversation that is not the
        caller's, a class the route refuses, or a route gone from the policy are left to the
        claim, which refuses them as it refuses any turn."""
        ctx = self._ctx
        if not is_conversation_id(request.conversation_id):
            return
        async with ctx.sessions() as session:
            row = (
                await session.execute(
                    select(Conversation.route, Conversation.data_classes).where(
                        Conversation.id == request.conversation_id,
                        Conversation.tenant_id == request.principal.tenant_id,
                    )
                )
            ).one_or_none()
        route = ctx.policy.routes.get(row.route) if row is not None else None
        if row is None or route is None:
            return
        if not route.background:
            reason = "route_denies_background"
        else:
            raised = (inspected.detected & route.data_classes) - route.blocked_classes
            decision = decide_storage(route, {*row.data_classes, *raised}, ctx.policy.data_classes)
            if decision.provider_storage:
                return
            reason = decision.code
        refusal = BackgroundNotPermitted(route.name, reason)
        outcome, code = outcome_of(refusal)
        await ctx.auditor.record(
            ctx.sessions,
            AuditEntry(
                "turn.start",
                request.principal,
                request.meta,
                resource_type="conversation",
                resource_id=request.conversation_id,
                data_classes=sorted(row.data_classes),
                policy_version=ctx.policy.version,
                details={"background": True, "storage_reason": reason},
            ),
            outcome=outcome,
            reason=code,
        )
        raise refusal

    async def _launch(self, turn: ClaimedTurn) -> None:
        """Seal the input, start the interaction, put it on the ledger and the turn row, and hand
        the turn to this replica's poller; a failure gives the turn back as a foreground one's."""
        ctx, claim, engine = self._ctx, turn.claim, self._engine
        conversation_id = turn.request.conversation_id
        heartbeat = ctx.tasks.spawn(renew_lease(ctx, conversation_id, claim.lease_token), name=f"lease:{claim.turn_id}")
        try:
            try:
                route = ctx.policy.routes.get(claim.route)
                if not claim.decision.provider_storage or route is None or not route.background:
                    # The classification rose between the check and the claim.
                    raise BackgroundNotPermitted(claim.route, claim.decision.code)
                await engine._stored(partial(self._seal_input, turn))
                interaction_id, attempts, sent = await ctx.upstream.start_background(
                    settings=claim.settings, steps=[*claim.history, *turn.new_step_bytes], chain=claim.chain
                )
            except BaseException as exc:
                failed = exc if isinstance(exc, UpstreamFailed) else None
                code, attempts = (failed.code, failed.attempts) if failed else (_code(exc), 0)
                sent = failed.history_sent if failed else "replayed"
                await engine._give_back(turn, code, attempts, [], sent)
                await engine._stored(partial(self._forget_input, claim.turn_id))
                raise
            try:
                await engine._stored(partial(turn.ledger, [interaction_id]))
                if not await engine._stored(partial(self._mark_started, turn, interaction_id, attempts, sent)):
                    raise LeaseLost(conversation_id)
            except BaseException as exc:
                if database_unreachable(exc):
                    # Given up: the lease runs out, and the turn, which never got its interaction
                    # id, is closed as abandoned; the copy is on the ledger if that write went in.
                    raise
                exists = await engine._stored(partial(turn.release, outcome_of(exc)[1], attempts, sent=sent))
                await engine._stored(partial(self._forget_input, claim.turn_id))
                if not exists:
                    await engine._delete_orphans(turn, [interaction_id])
                else:
                    await self._cancel_upstream(interaction_id)
                raise
        finally:
            heartbeat.cancel()
        self.follow(conversation_id, claim.turn_id, claim.lease_token)

    async def _seal_input(self, turn: ClaimedTurn, retry: bool) -> None:
        claim = turn.claim
        sealed = claim.cipher.seal_record(PENDING_LABEL, claim.turn_number, turn.new_steps)
        async with self._ctx.sessions.begin() as session:
            await session.execute(
                update(Turn)
                .where(Turn.id == claim.turn_id)
                .values(pending_input=sealed, pending_input_key_version=claim.cipher.key_version)
            )

    async def _mark_started(
        self, turn: ClaimedTurn, interaction_id: str, attempts: int, sent: str, retry: bool
    ) -> bool:
        """The interaction id on the turn row, while the turn is still ours to run; False if not."""
        claim = turn.claim
        async with self._ctx.sessions.begin() as session:
            marked = await session.scalar(
                update(Turn)
                .where(
                    Turn.id == claim.turn_id,
                    Turn.status == "in_progress",
                    Turn.conversation_id.in_(
                        select(Conversation.id).where(
                            Conversation.id == turn.request.conversation_id,
                            Conversation.lease_token == claim.lease_token,
                        )
                    ),
                )
                .values(background_interaction_id=interaction_id, upstream_attempts=attempts, history_sent=sent)
                .returning(Turn.id)
            )
        return marked is not None

    async def _forget_input(self, turn_id: str, retry: bool) -> None:
        """Drop a turn's sealed input once the turn has ended (stored with the answer, or not at all)."""
        async with self._ctx.sessions.begin() as session:
            await session.execute(
                update(Turn)
                .where(Turn.id == turn_id, Turn.status != "in_progress", Turn.pending_input.is_not(None))
                .values(pending_input=None, pending_input_key_version=None)
            )

    # --- follow ----------------------------------------------------------------------------------

    def follow(self, conversation_id: str, turn_id: str, lease_token: str) -> None:
        """Poll the turn's interaction in this replica until it ends, under `lease_token`."""
        if not self._ctx.polls.running(_poll_name(turn_id)):
            self._ctx.polls.spawn(self._poll(conversation_id, turn_id, lease_token), name=_poll_name(turn_id))

    async def _poll(self, conversation_id: str, turn_id: str, lease_token: str) -> None:
        ctx = self._ctx
        # Not one of ctx.tasks, which shutdown waits for: this one ends when the lease is lost.
        heartbeat = asyncio.get_running_loop().create_task(
            renew_lease(ctx, conversation_id, lease_token), name=f"lease:{turn_id}"
        )
        try:
            while True:
                await asyncio.sleep(ctx.background_poll_seconds)
                if heartbeat.done():
                    return  # the lease is no longer ours: cancelled, deleted, or taken over
                try:
                    done = await self._poll_once(conversation_id, turn_id, lease_token)
                except Exception as exc:
                    if not database_unreachable(exc):
                        raise
                    done = False
                    logger.warning("database unreachable (%s) while polling a background turn", type(exc).__name__)
                if done:
                    return
        except Exception as exc:  # noqa: BLE001 - a poller that fails leaves the turn to a sweep
            # The type only: messages may carry anything. The lease runs out and a sweep retries.
            logger.error("following a background turn failed (%s)", type(exc).__name__)
        finally:
            heartbeat.cancel()

    async def _poll_once(self, conversation_id: str, turn_id: str, lease_token: str) -> bool:
        """One look at the interaction; True once the turn needs no more polling."""
        ctx = self._ctx
        turn = await self._claimed(turn_id, lease_token)
        if turn is None:
            return True
        interaction_id = turn.interaction_id
        try:
            polled = await ctx.upstream.get(interaction_id)
        except UpstreamFailed as exc:
            logger.warning("polling a background interaction failed (%s); polling again", exc.code)
            return False
        if polled is None:
            # The provider no longer has it (expired, or deleted by someone else): it has no answer.
            await self._engine._stored(
                partial(turn.claimed.release, "upstream_interaction_lost", turn.attempts, sent=turn.history_sent)
            )
            await self._engine._stored(partial(self._forget_input, turn_id))
            return True
        body, step_bytes = polled
        if body.get("status") in _RUNNING:
            return False
        reply = UpstreamReply(
            body, turn.latency_ms, turn.attempts, [interaction_id], steps=step_bytes, history_sent=turn.history_sent
        )
        # Stored past this task's life, as a foreground turn's reply is: a shutdown that cancels
        # the pollers waits for it.
        settle = ctx.tasks.spawn(self._settle(turn, reply), name=f"settle:{turn_id}")
        await asyncio.shield(settle)
        return True

    async def _settle(self, turn: _Resumed, reply: UpstreamReply) -> None:
        ctx, claimed = self._ctx, turn.claimed
        status = "error"
        try:
            result = await self._engine._settle(claimed, reply)
            status = result.status
        except Exception as exc:
            if database_unreachable(exc):
                raise
            status = "failed"
            # The engine recorded the outcome (and gave the turn back); the type only here.
            logger.warning("a background turn's answer was not stored (%s)", type(exc).__name__)
        finally:
            ctx.metrics.turn_finished(
                claimed.claim.route, status, turn.latency_ms / 1000, claimed.request.principal.tenant_id
            )
        await self._engine._stored(partial(self._forget_input, claimed.claim.turn_id))

    async def _claimed(self, turn_id: str, lease_token: str) -> _Resumed | None:
        """The turn's claim, rebuilt from its row, its conversation and its unsealed input, while
        it is running under `lease_token`; None once it is not (ended, cancelled, taken over)."""
        ctx = self._ctx
        async with ctx.sessions() as session:
            row = (
                await session.execute(
                    select(Turn, Conversation, func.now())
                    .join(Conversation, Conversation.id == Turn.conversation_id)
                    .where(Turn.id == turn_id)
                )
            ).one_or_none()
            if row is None:
                return None
            turn, conversation, now = row
            if (
                turn.status != "in_progress"
                or conversation.lease_token != lease_token
                or turn.background_interaction_id is None
                or turn.pending_input is None
                or turn.pending_input_key_version is None
            ):
                return None
            cipher = await load_cipher(session, ctx, conversation)
            new_steps = cipher.open_record(
                PENDING_LABEL, turn.number, turn.pending_input_key_version, turn.pending_input
            )
            key_digest = await session.scalar(
                select(IdempotencyRecord.key).where(
                    IdempotencyRecord.tenant_id == conversation.tenant_id, IdempotencyRecord.turn_id == turn.id
                )
            )
        route = ctx.policy.routes.get(conversation.route)
        claim = Claim(
            turn_id=turn.id,
            turn_number=turn.number,
            lease_token=lease_token,
            route=conversation.route,
            settings=route.upstream_settings() if route is not None else {},
            decision=StorageDecision(turn.provider_storage, turn.storage_reason),
            policy_version=turn.policy_version,
            data_classes=list(conversation.data_classes),
            key_digest=key_digest,
            cipher=cipher,
            # Nobody appends while the lease is ours: the answer goes where the claim saw free.
            history=[],
            step_count=conversation.step_count,
        )
        # The key that started the turn acts for it, as in an abandoned turn's record.
        principal = Principal(conversation.tenant_id, turn.key_id or "", "backend")
        request = TurnRequest(principal, _NO_REQUEST, conversation.id, new_steps)
        latency = (now - turn.started_at).total_seconds() * 1000 if turn.started_at else 0.0
        return _Resumed(
            ClaimedTurn(ctx, request, list(new_steps), claim),
            turn.background_interaction_id,
            turn.upstream_attempts,
            latency,
            turn.history_sent,
        )

    # --- resume ----------------------------------------------------------------------------------

    async def resume_orphans(self) -> int:
        """Take over the running background turns whose lease has run out (their replica died or
        stopped) and follow them here; returns how many. Every replica runs this: a turn another
        replica is taking is skipped, and a turn this replica follows already is left to it."""
        ctx = self._ctx
        taken: list[tuple[str, str, str]] = []
        async with ctx.sessions.begin() as session:
            rows = (
                await session.execute(
                    select(Conversation.id, Turn.id)
                    .join(Turn, Turn.conversation_id == Conversation.id)
                    .where(
                        Turn.status == "in_progress",
                        Turn.background_interaction_id.is_not(None),
                        or_(Conversation.lease_token.is_(None), Conversation.lease_expires_at < func.now()),
                    )
                    .limit(_SWEEP_BATCH)
                    .with_for_update(of=Conversation, skip_locked=True)
                )
            ).all()
            for conversation_id, turn_id in rows:
                if ctx.polls.running(_poll_name(turn_id)):
                    continue
                token = new_id("lease")
                await session.execute(
                    update(Conversation)
                    .where(Conversation.id == conversation_id)
                    .values(lease_token=token, lease_expires_at=func.now() + timedelta(seconds=ctx.turn_lease_seconds))
                )
                taken.append((conversation_id, turn_id, token))
        for conversation_id, turn_id, token in taken:
            self.follow(conversation_id, turn_id, token)
        return len(taken)

    # --- read and cancel -------------------------------------------------------------------------

    async def read(self, principal: Principal, meta: RequestMeta, conversation_id: str, turn_id: str) -> TurnView:
        """A turn of one of the caller's conversations (404 for another tenant's), audited as a
        read of the history (its answer is history)."""
        ctx = self._ctx
        entry = AuditEntry(
            "history.read",
            principal,
            meta,
            resource_type="conversation",
            resource_id=audited_conversation_id(conversation_id),
            details={"turn_id": turn_id if is_id_of("turn", turn_id) else None},
        )
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            conversation = await owned_conversation(session, principal, conversation_id)
            entry.data_classes = list(conversation.data_classes)
            turn = await _turn_of(session, conversation, turn_id)
            view = _view(turn)
            if turn.status in ("completed", "requires_action") and turn.first_position is not None:
                cipher = await load_cipher(session, ctx, conversation)
                stored = await read_steps(session, cipher, start=turn.first_position, limit=turn.step_count)
                steps = [decode_json(step) for _, owner, step in stored if owner == turn.id]
                model_steps = _model_steps(steps)
                view = dataclasses.replace(view, result=_result(conversation_id, turn, model_steps))
                entry.details["steps"] = len(model_steps)
            entry.details["status"] = turn.status
            return view
        raise AssertionError("unreachable")  # the audited block returns or raises

    async def cancel(self, principal: Principal, meta: RequestMeta, conversation_id: str, turn_id: str) -> TurnView:
        """Cancel a running background turn: closed here first (failed, `cancelled`: the lease and
        its Idempotency-Key given back, nothing stored), then at the provider, which may have
        finished it meanwhile. 409 for a turn that is not a running background turn."""
        ctx = self._ctx
        entry = AuditEntry(
            "turn.create",
            principal,
            meta,
            resource_type="turn",
            resource_id=turn_id if is_id_of("turn", turn_id) else None,
            details={"conversation_id": audited_conversation_id(conversation_id), "closed_by": "cancel"},
        )
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            conversation = await owned_conversation(session, principal, conversation_id, lock=True)
            entry.data_classes = list(conversation.data_classes)
            turn = await _turn_of(session, conversation, turn_id, lock=True)
            interaction_id = turn.background_interaction_id
            if turn.status != "in_progress" or interaction_id is None:
                raise TurnNotRunning(turn.status)
            turn.status, turn.error_code, turn.finished_at = "failed", "cancelled", func.now()
            turn.pending_input = turn.pending_input_key_version = None
            conversation.lease_token = conversation.lease_expires_at = None
            await session.execute(
                delete(IdempotencyRecord).where(
                    IdempotencyRecord.turn_id == turn.id, IdempotencyRecord.response.is_(None)
                )
            )
            entry.policy_version = turn.policy_version
            entry.details |= {"store": turn.provider_storage, "status": "failed", "error_code": "cancelled"}
            await session.flush()
            view = TurnView(conversation.id, turn.id, turn.number, "failed", "cancelled", True)
        # After the commit: a poller that stores an answer now finds its lease gone.
        await self._cancel_upstream(interaction_id)
        return view

    async def _cancel_upstream(self, interaction_id: str) -> None:
        """Ask the provider to stop; it may have finished already. A failure is logged, not
        raised: the turn is closed here either way, and the copy stays on the ledger."""
        try:
            await self._ctx.upstream.cancel(interaction_id)
        except UpstreamFailed as exc:
            logger.warning("cancelling a background interaction upstream failed (%s)", exc.code)


@dataclass(frozen=True)
class _Resumed:
    """A running background turn as a poller holds it."""

    claimed: ClaimedTurn
    interaction_id: str
    attempts: int
    latency_ms: float
    history_sent: str


def _code(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "turn_aborted"
    return outcome_of(exc)[1]


async def _turn_of(session: AsyncSession, conversation: Conversation, turn_id: str, *, lock: bool = False) -> Turn:
    if not is_id_of("turn", turn_id):
        raise TurnNotFound(turn_id)
    query = select(Turn).where(Turn.id == turn_id, Turn.conversation_id == conversation.id)
    if lock:
        query = query.with_for_update()
    turn = await session.scalar(query)
    if turn is None:
        raise TurnNotFound(turn_id)
    return turn


def _view(turn: Turn) -> TurnView:
    return TurnView(
        turn.conversation_id,
        turn.id,
        turn.number,
        turn.status,
        turn.error_code,
        turn.background_interaction_id is not None,
    )


def _model_steps(steps: list[Any]) -> list[Any]:
    """A stored turn's steps without its input: the leading steps only a client sends."""
    index = 0
    while index < len(steps) and isinstance(steps[index], dict) and steps[index].get("type") in _CLIENT_STEPS:
        index += 1
    return steps[index:]


def _result(conversation_id: str, turn: Turn, model_steps: list[Any]) -> TurnResult:
    return TurnResult(
        conversation_id=conversation_id,
        turn_id=turn.id,
        turn_number=turn.number,
        status=turn.status,
        error_code=turn.error_code,
        steps=model_steps,
        output_text=output_text(model_steps),
        usage={k: int(v) for k, v in (turn.usage or {}).items()},
        store=turn.provider_storage,
        storage_reason=turn.storage_reason,
        policy_version=turn.policy_version,
    )
