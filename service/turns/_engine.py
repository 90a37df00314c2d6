"""The turn engine: claim the conversation, replay its history to the model, store the reply.

A turn is three units of work, and no database transaction stays open across the model call:

1. claim (`turn.start`, see _claim.py): take the conversation, or answer a repeated
   Idempotency-Key from storage;
2. call the model with the whole history plus the new input as `input`, `store` as decided, and
   the route's settings re-sent, while a background task renews the lease (see service/leases.py);
   where provider storage is permitted and the provider holds a fit copy of the history, only the
   new input goes, chained onto that copy (`previous_interaction_id`), and a copy found gone
   falls back to the whole history (service/upstream.py);
3. settle (see _settle.py): the ledger of provider copies first, then `turn.create`, which
   appends the input and reply if the lease is still ours, or a release if the model failed.

Once the model has answered, settling runs as a background task: a caller who goes away does not
stop it, and if the database is unreachable it keeps trying (the reply is in memory) while the
lease is ours; the caller gets 503 after a while and, retrying with its Idempotency-Key, the
stored turn. The input is stored with the reply, not at the claim: a failed model call leaves the
history exactly as it was, never with an unanswered input.

When the claim finds that the conversation may no longer have provider copies (its
classification rose to a class that forbids them), they are deleted while the model works, and
the turn answers once that is done too; when the model's answer raises it so, after the finish.

Before any of that, the input is canonicalised (for the keyed request fingerprint) and scanned
by the detectors: a small input at once, a large one only once the conversation is known to be
the caller's, and in a worker thread so that it cannot stall the other requests of the process
(see `_inspect`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

from sqlalchemy import select

from ..audit import AuditEntry, outcome_of
from ..context import ServiceContext
from ..conversations import delete_conversation_copies, delete_provider_copies
from ..database_errors import database_unreachable
from ..detectors import Findings
from ..errors import ConversationNotFound, DatabaseUnavailable, ModelOutputRefused, UpstreamFailed
from ..generate_content import create_or_fall_back
from ..ids import is_conversation_id
from ..keyed_digests import canonical_json, idempotency_key_digest, request_fingerprint
from ..leases import renew_lease
from ..models import Conversation
from ..upstream import UpstreamReply
from ._claim import Claim, Inspected, claim_turn
from ._input import normalize_client_input
from ._reply import Outcome, outcome_of_reply
from ._settle import ClaimedTurn
from ._types import TurnRequest, TurnResult

__all__ = ["TurnEngine"]

T = TypeVar("T")
logger = logging.getLogger("custody.turns")

# Inputs larger than this are canonicalised and scanned in a worker thread: a megabyte takes
# tens of milliseconds of CPU, which on the event loop would stall every other request.
_OFF_LOOP_BYTES = 64_000


def _aborted(ctx: ServiceContext, exc: BaseException) -> str:
    """The error code of a turn stopped by something other than the model: `shutdown` when the
    replica's drain cancelled it, so the audit trail tells a rolling update from a caller who left."""
    if isinstance(exc, asyncio.CancelledError) and ctx.drain.was_cancelled(asyncio.current_task()):
        return "shutdown"
    return "turn_aborted"


class TurnEngine:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    async def run(self, request: TurnRequest) -> TurnResult:
        """Run one turn; a repeated Idempotency-Key gets the first result back."""
        ctx = self._ctx
        started = time.perf_counter()
        # The model call ends by then, however many attempts it takes (see Upstream.create).
        limit = ctx.turn_deadline_seconds
        deadline = time.monotonic() + min(limit, request.timeout_seconds or limit)
        # A large input (inline media, say) is checked in a worker thread: strict base64 over
        # megabytes takes tens of milliseconds.
        check = partial(normalize_client_input, request.raw_input)
        new_steps = await asyncio.to_thread(check) if request.input_bytes > _OFF_LOOP_BYTES else check()
        key = request.idempotency_key
        key_digest = idempotency_key_digest(ctx.pepper, request.principal.tenant_id, key) if key else None
        inspected = await self._inspect(request, new_steps)
        claim = await claim_turn(ctx, request, new_steps, inspected, key_digest)
        if isinstance(claim, TurnResult):
            return claim
        dropping = self._drop_copies(request, claim.drop_provider_copies) if claim.drop_provider_copies else None
        # The model's answer (completed, requires_action, failed), a failed call (failed), or
        # anything else: the caller went away, the reply was not stored in time, a bug (error).
        status = "error"
        try:
            result = await self._call_and_settle(request, new_steps, claim, deadline)
            status = result.status
            return result
        except UpstreamFailed:
            status = "failed"
            raise
        finally:
            if dropping is not None:
                # The caller hears back once the provider's copies are gone too (or on the ledger
                # as pending, for the retention runner to retry).
                await asyncio.wait([dropping])
            ctx.metrics.turn_finished(claim.route, status, time.perf_counter() - started, request.principal.tenant_id)

    def _drop_copies(self, request: TurnRequest, cause: str) -> asyncio.Task[None]:
        """Delete every copy the provider holds of the conversation, in a task of its own that
        outlives the request; a failure leaves them pending on the ledger, which the retention
        runner's sweep retries."""
        ctx = self._ctx

        async def drop() -> None:
            try:
                await delete_conversation_copies(
                    ctx,
                    request.principal,
                    request.meta,
                    request.conversation_id,
                    tenant_id=request.principal.tenant_id,
                    cause=cause,
                )
            except Exception as exc:  # noqa: BLE001 - the sweep retries; the turn goes on
                logger.warning("provider copies not deleted yet (%s); the retention runner retries", type(exc).__name__)

        return ctx.tasks.spawn(drop(), name=f"drop-copies:{request.conversation_id}")

    async def _call_and_settle(
        self, request: TurnRequest, new_steps: list[dict[str, Any]], claim: Claim, deadline: float
    ) -> TurnResult:
        """The model call, with the lease renewed meanwhile, then the reply stored (or the turn
        given back when the call failed)."""
        ctx = self._ctx
        turn = ClaimedTurn(ctx, request, new_steps, claim)
        heartbeat = ctx.tasks.spawn(
            renew_lease(ctx, request.conversation_id, claim.lease_token), name=f"lease:{claim.turn_id}"
        )
        route = ctx.policy.routes.get(claim.route)
        try:
            # On a route with `fallback: generate_content`, a turn the Interactions surface cannot
            # take goes through generateContent instead (service/generate_content.py).
            reply = await create_or_fall_back(
                ctx.upstream,
                fallback=route is not None and route.fallback == "generate_content",
                settings=claim.settings,
                steps=[*claim.history, *turn.new_step_bytes],
                store=claim.decision.provider_storage,
                chain=claim.chain,
                deadline=deadline,
            )
        except BaseException as exc:
            # Failed, cancelled (the client went away, or the replica's drain time ran out) or a
            # bug: give the conversation back.
            failed = exc if isinstance(exc, UpstreamFailed) else None
            code, attempts = (failed.code, failed.attempts) if failed else (_aborted(ctx, exc), 0)
            partial_hops = failed.interaction_ids if failed else []
            sent = failed.history_sent if failed else ("chained" if claim.chain else "replayed")
            fallback_failed = failed.fallback_failed if failed else None
            release = self._in_background(
                self._give_back(turn, code, attempts, partial_hops, sent, fallback_failed), heartbeat, claim
            )
            # The caller hears about the model's failure, not the database's: if the database is
            # down, the release goes on in the background.
            with contextlib.suppress(DatabaseUnavailable):
                await self._wait_stored(release)
            raise
        # From here on the model has answered: the reply is stored even if the caller goes away.
        return await self._wait_stored(self._in_background(self._settle(turn, reply), heartbeat, claim))

    async def _settle(self, turn: ClaimedTurn, reply: UpstreamReply) -> TurnResult:
        finishing = False
        outcome = outcome_of_reply(reply)
        try:
            if reply.interaction_ids and turn.claim.decision.provider_storage:
                # Copies the provider keeps go on the ledger before anything else can fail; the
                # ids of a turn it keeps nothing of are written with the turn itself.
                await self._stored(partial(turn.ledger, reply.interaction_ids))
            findings = await self._scan_output(turn, outcome)
            finishing = True
            result = await self._stored(partial(turn.finish, outcome, findings))
        except BaseException as exc:
            if database_unreachable(exc):
                # Given up after turn_store_retry_seconds: once the database is back, the lease
                # has run out and the reaper (or the next turn) closes the turn as abandoned.
                raise
            # Free the turn row and the key. A failed finish was recorded by its audited action;
            # a failed ledger write was not, so it gets its record here.
            exists = await self._stored(
                partial(turn.release, outcome_of(exc)[1], reply.attempts, audit=not finishing, sent=reply.history_sent)
            )
            if not exists or isinstance(exc, (ConversationNotFound, ModelOutputRefused)):
                # Deleted meanwhile, or the answer carried what this route may not keep: the
                # provider's copies of this turn go too.
                await self._delete_orphans(turn, reply.interaction_ids)
            raise
        if turn.claim.decision.provider_storage and not turn.storage_permitted_after(findings):
            # The model's answer raised the classification to a class that forbids provider
            # storage: every copy of the conversation goes now, this turn's included.
            await self._drop_copies(turn.request, "classification_raised")
        return result

    async def _scan_output(self, turn: ClaimedTurn, outcome: Outcome) -> Findings:
        """The detectors over the model's answer (its text and function calls' arguments) on its
        way into storage; a hit is recorded on its own, like one in the input, by class and
        detector name. The finish then raises the classification, or refuses the turn."""
        ctx = self._ctx
        if not outcome.kept:
            return Findings()
        work = partial(ctx.policy.detectors.scan, outcome.model_steps)
        large = sum(map(len, outcome.model_step_bytes)) > _OFF_LOOP_BYTES
        findings = await asyncio.to_thread(work) if large else work()
        if findings:
            request = turn.request
            ctx.metrics.detector_hits(findings.classes, request.principal.tenant_id)
            entry = AuditEntry(
                "detector.hit",
                request.principal,
                request.meta,
                resource_type="conversation",
                resource_id=request.conversation_id,
                data_classes=sorted(findings.classes),
                details={
                    "classes": sorted(findings.classes),
                    "detectors": sorted(findings.detectors),
                    "source": "model_output",
                    "turn_id": turn.claim.turn_id,
                },
            )
            # Like the rest of storing a reply, kept trying while the database is unreachable.
            await self._stored(lambda _retry: ctx.auditor.record(ctx.sessions, entry))
        return findings

    async def _give_back(
        self,
        turn: ClaimedTurn,
        code: str,
        attempts: int,
        interaction_ids: list[str],
        sent: str,
        fallback_failed: str | None = None,
    ) -> None:
        """Release a turn whose model call failed; interactions it did get (hops of a continued
        turn) still go into the ledger, since the provider may keep them."""
        if interaction_ids:
            await self._stored(partial(turn.ledger, interaction_ids))
        if not await self._stored(partial(turn.release, code, attempts, sent=sent, fallback_failed=fallback_failed)):
            await self._delete_orphans(turn, interaction_ids)

    async def _delete_orphans(self, turn: ClaimedTurn, interaction_ids: list[str]) -> None:
        """The copies the provider kept of this turn's interactions, when the turn stored nothing
        of them: the conversation was deleted while the model worked (nobody could reach them
        now), or the answer was refused (it carries what the route may not keep)."""
        if turn.claim.decision.provider_storage and interaction_ids:
            request = turn.request
            await delete_provider_copies(
                self._ctx, request.principal, request.meta, request.conversation_id, interaction_ids
            )

    def _in_background(
        self, work: Coroutine[Any, Any, T], heartbeat: asyncio.Task[None], claim: Claim
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

    async def _inspect(self, request: TurnRequest, new_steps: list[dict[str, Any]]) -> Inspected:
        """Fingerprint and scan the input, but only for the caller's own conversation: nobody
        gets to make the service canonicalise and scan a megabyte for a conversation they
        cannot reach (the claim then refuses it, with its audit record), nor to put a detector
        hit on record against one.

        A small input is scanned first, since that costs less than asking the database, and its
        ownership is asked only when the scan found something to record; a large one is scanned
        only after the database has said the conversation is the caller's.
        """
        ctx = self._ctx
        large = request.input_bytes > _OFF_LOOP_BYTES
        if large and not await self._owns(request):
            return Inspected("", frozenset())
        work = partial(self._fingerprint_and_detect, request.conversation_id, new_steps)
        fingerprint, findings = await asyncio.to_thread(work) if large else work()
        detected = findings.classes
        if findings and not large and not await self._owns(request):
            return Inspected("", frozenset())
        if findings:
            ctx.metrics.detector_hits(detected, request.principal.tenant_id)
            # Recorded on its own, before the claim, so the hit stays on record even when the
            # turn is then refused: the route does not allow or blocks the class, or the input
            # carries a card security code. Class and detector names only, never what matched.
            await ctx.auditor.record(
                ctx.sessions,
                AuditEntry(
                    "detector.hit",
                    request.principal,
                    request.meta,
                    resource_type="conversation",
                    resource_id=request.conversation_id,
                    data_classes=sorted(detected),
                    details={"classes": sorted(detected), "detectors": sorted(findings.detectors)},
                ),
            )
        return Inspected(fingerprint, detected, findings.refused_by)

    async def _owns(self, request: TurnRequest) -> bool:
        if not is_conversation_id(request.conversation_id):
            return False
        async with self._ctx.sessions() as session:
            found = await session.scalar(
                select(Conversation.id).where(
                    Conversation.id == request.conversation_id,
                    Conversation.tenant_id == request.principal.tenant_id,
                )
            )
        return found is not None

    def _fingerprint_and_detect(self, conversation_id: str, new_steps: list[dict[str, Any]]) -> tuple[str, Findings]:
        fingerprint = request_fingerprint(self._ctx.pepper, canonical_json([conversation_id, new_steps]))
        return fingerprint, self._ctx.policy.detectors.scan(new_steps)
