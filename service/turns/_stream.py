"""Streamed turns: the model's progress relayed as Server-Sent Events while Custody stores the
complete turn exactly as it stores a foreground one.

1. Before any event: the input canonicalised and scanned, and the claim (the engine's `_inspect`
   and `claim_turn`), so that a refusal is still a problem+json answer and a repeated
   Idempotency-Key replays the stored turn as a completed stream.
2. The turn runs as a task of its own (`ctx.tasks`) that outlives the request: it renews the
   lease, sends the create with `"stream": true` (`Upstream.create_stream`), and writes each step
   event into the turn's event log (service/turn_events.py) as it arrives; the relay of the
   request reads the log at the client's pace. A client that goes away stops only its relay.
3. Once the stream has ended, the steps assembled from it (byte for byte what the non-streaming
   answer carries) are settled by the engine's `_settle`: the ledger, the detectors over the
   model's answer, `finish` (`turn.create`); a failed call is given back with the engine's
   `_give_back` (`turn.create`, failed, nothing stored). The last event is `turn.completed`
   (the turn as the foreground answer would carry it) or `error`.

The relay holds back what the route would refuse: before a delta is relayed, the detectors scan
the step it belongs to as assembled so far, and from the first hit that the finish would refuse
(a class the route blocks or does not allow, a card security code), no further step event is
relayed; the turn goes on to its end, where `finish` judges the whole answer (and `error` with
`model_output_refused` says it was refused, or `turn.completed` carries it when it was not).

After the turn, events come from the log while this replica keeps it, and are otherwise
regenerated from the stored turn (`events_of_stored`), with ids of their own (`s1`, `s2`, ...):
`turn.started`, each stored model step whole (`step.start` and `step.stop`), `turn.completed`;
a client that already has some live events (a numeric `Last-Event-ID`) gets only the last one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from ..audit import outcome_of
from ..context import ServiceContext
from ..errors import UpstreamFailed
from ..keyed_digests import idempotency_key_digest
from ..leases import renew_lease
from ..turn_events import EventsDropped, TurnEventLog, encode_event
from ._background import TurnView
from ._claim import Claim, claim_turn
from ._engine import TurnEngine, _aborted
from ._input import normalize_client_input
from ._settle import ClaimedTurn
from ._types import TurnRequest, TurnResult

__all__ = ["StreamedTurn", "StreamingTurns", "completed_data", "events_of_result"]

logger = logging.getLogger("custody.turns")

# Upstream events relayed to the client (step content); the interaction's own events carry the
# provider's ids and are not.
_RELAYED = frozenset({"step.start", "step.delta", "step.stop"})
# How long a client told that the turn runs on another replica waits before reconnecting.
ELSEWHERE_RETRY_MS = 1000


def started_data(result_or_claim: TurnResult | Claim, conversation_id: str) -> dict[str, Any]:
    if isinstance(result_or_claim, TurnResult):
        result = result_or_claim
        return {
            "conversation_id": conversation_id,
            "turn_id": result.turn_id,
            "turn_number": result.turn_number,
            "store": result.store,
            "storage_reason": result.storage_reason,
            "policy_version": result.policy_version,
        }
    claim = result_or_claim
    return {
        "conversation_id": conversation_id,
        "turn_id": claim.turn_id,
        "turn_number": claim.turn_number,
        "store": claim.decision.provider_storage,
        "storage_reason": claim.decision.reason,
        "policy_version": claim.policy_version,
    }


def completed_data(result: TurnResult) -> dict[str, Any]:
    """turn.completed: the turn as the foreground answer would carry it."""
    return {
        "turn_id": result.turn_id,
        "turn_number": result.turn_number,
        "status": result.status,
        "error_code": result.error_code,
        "usage": result.usage,
        "output_text": result.output_text,
        "steps": result.steps,
    }


def error_data(turn_id: str, code: str) -> dict[str, Any]:
    return {"turn_id": turn_id, "code": code}


def events_of_result(result: TurnResult, after: str | None = None) -> list[bytes]:
    """A stored turn's events, regenerated (ids `s1`, `s2`, ...): all of them, those after an
    `sN` id, or, for a live (numeric) id, only the last, which carries the whole answer."""
    events: list[tuple[str, dict[str, Any]]] = [("turn.started", started_data(result, result.conversation_id))]
    if result.status in ("completed", "requires_action"):
        for index, step in enumerate(result.steps):
            events.append(("step.start", {"turn_id": result.turn_id, "index": index, "step": step}))
            events.append(("step.stop", {"turn_id": result.turn_id, "index": index}))
    events.append(("turn.completed", completed_data(result)))
    return _numbered(events, after)


def events_of_failed(view: TurnView, after: str | None = None) -> list[bytes]:
    """A turn that failed (stored nothing): its error, or turn.completed for a model that said
    it failed (the foreground answer's 200 with `status: failed`)."""
    code = view.error_code or "failed"
    last: tuple[str, dict[str, Any]]
    if code.startswith("model_"):
        last = (
            "turn.completed",
            {
                "turn_id": view.turn_id,
                "turn_number": view.turn_number,
                "status": "failed",
                "error_code": code,
                "usage": {},
                "output_text": "",
                "steps": [],
            },
        )
    else:
        last = ("error", error_data(view.turn_id, code))
    started = {"conversation_id": view.conversation_id, "turn_id": view.turn_id, "turn_number": view.turn_number}
    return _numbered([("turn.started", started), last], after)


def _numbered(events: list[tuple[str, dict[str, Any]]], after: str | None) -> list[bytes]:
    start = 0
    if after is not None:
        if after.startswith("s") and after[1:].isdigit():
            start = min(int(after[1:]), len(events))
        else:
            start = len(events) - 1
    return [encode_event(kind, data, f"s{number}") for number, (kind, data) in enumerate(events, 1)][start:]


def elsewhere_event(turn_id: str) -> bytes:
    """The turn runs, but not here: no id (the client keeps its Last-Event-ID), and a retry hint."""
    return encode_event("turn.running_elsewhere", {"turn_id": turn_id}, None, retry_ms=ELSEWHERE_RETRY_MS)


async def relay(log: TurnEventLog, after: int = 0) -> AsyncIterator[bytes]:
    """A client's copy of a running (or just ended) turn's events, at the client's pace."""
    try:
        async for event in log.follow(after):
            yield event
    except EventsDropped:
        # The client fell behind what the log keeps: it is told, and can reconnect once the turn
        # has ended (its turn.completed carries the whole answer). The turn goes on regardless.
        yield encode_event("error", error_data(log.turn_id, "events_dropped"), None)


class StreamedTurn:
    """What a streamed turn request gets: the events to relay."""

    def __init__(self, events: AsyncIterator[bytes]) -> None:
        self.events = events


class StreamingTurns:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._engine = TurnEngine(ctx)

    async def start(self, request: TurnRequest) -> StreamedTurn:
        """Claim the turn (refusals raise, as for any turn) and start it; its events."""
        ctx = self._ctx
        new_steps = normalize_client_input(request.raw_input)
        key = request.idempotency_key
        key_digest = idempotency_key_digest(ctx.pepper, request.principal.tenant_id, key) if key else None
        inspected = await self._engine._inspect(request, new_steps)
        claim = await claim_turn(ctx, request, new_steps, inspected, key_digest)
        if isinstance(claim, TurnResult):
            return StreamedTurn(_iterate(events_of_result(claim)))
        log = ctx.turn_events.open(request.principal.tenant_id, request.conversation_id, claim.turn_id)
        log.append("turn.started", started_data(claim, request.conversation_id))
        turn = ClaimedTurn(ctx, request, new_steps, claim)
        # Past the request's life: a client that goes away stops its relay, not the turn.
        ctx.tasks.spawn(self._run(turn, log), name=f"stream:{claim.turn_id}")
        return StreamedTurn(relay(log))

    async def _run(self, turn: ClaimedTurn, log: TurnEventLog) -> None:
        ctx, engine, claim, request = self._ctx, self._engine, turn.claim, turn.request
        started = time.perf_counter()
        dropping = engine._drop_copies(request, claim.drop_provider_copies) if claim.drop_provider_copies else None
        heartbeat = ctx.tasks.spawn(
            renew_lease(ctx, request.conversation_id, claim.lease_token), name=f"lease:{claim.turn_id}"
        )
        gate = _RelayGate(ctx, claim)
        status = "error"

        async def on_event(event: dict[str, Any], step: dict[str, Any] | None) -> None:
            kind = event.get("event_type")
            if kind not in _RELAYED or not gate.open(step):
                return
            data: dict[str, Any] = {"turn_id": claim.turn_id, "index": event.get("index")}
            if kind == "step.start":
                data["step"] = event.get("step")
            elif kind == "step.delta":
                data["delta"] = event.get("delta")
            log.append(str(kind), data)

        try:
            try:
                reply = await ctx.upstream.create_stream(
                    settings=claim.settings,
                    steps=[*claim.history, *turn.new_step_bytes],
                    store=claim.decision.provider_storage,
                    chain=claim.chain,
                    on_event=on_event,
                )
            except BaseException as exc:
                failed = exc if isinstance(exc, UpstreamFailed) else None
                code, attempts = (failed.code, failed.attempts) if failed else (_aborted(ctx, exc), 0)
                sent = failed.history_sent if failed else ("chained" if claim.chain else "replayed")
                status = "failed" if failed else "error"
                log.append("error", error_data(claim.turn_id, code))
                try:
                    await engine._give_back(turn, code, attempts, failed.interaction_ids if failed else [], sent)
                finally:
                    heartbeat.cancel()
                if failed is None:
                    raise
                return
            try:
                result = await engine._settle(turn, reply)
            except BaseException as exc:
                log.append("error", error_data(claim.turn_id, outcome_of(exc)[1]))
                if not isinstance(exc, Exception):
                    raise
                return
            finally:
                heartbeat.cancel()
            status = result.status
            log.append("turn.completed", completed_data(result))
        finally:
            ctx.turn_events.ended(log)
            if dropping is not None:
                await asyncio.wait([dropping])
            ctx.metrics.turn_finished(claim.route, status, time.perf_counter() - started, request.principal.tenant_id)

    async def events(
        self, request_view: TurnView, log: TurnEventLog | None, last_event_id: str | None
    ) -> AsyncIterator[bytes]:
        """`GET .../events`: from this replica's log while it has the turn, else regenerated from
        the stored turn; a turn running on another replica is said to run elsewhere."""
        if log is not None:
            if last_event_id is None or log.knows(last_event_id):
                return relay(log, int(last_event_id) if last_event_id else 0)
            if not log.closed:
                # An id this log never gave (a regenerated one, or garbage): from the start.
                return relay(log, 0)
        view = request_view
        if view.result is not None:
            return _iterate(events_of_result(view.result, last_event_id))
        if view.status == "failed":
            return _iterate(events_of_failed(view, last_event_id))
        return _iterate([elsewhere_event(view.turn_id)])


class _RelayGate:
    """Whether a step event may still be relayed: closed for good from the first detector hit
    in the step as assembled so far that the finish would refuse."""

    def __init__(self, ctx: ServiceContext, claim: Claim) -> None:
        self._ctx = ctx
        route = ctx.policy.routes.get(claim.route)
        self._allowed = (route.data_classes - route.blocked_classes) if route else frozenset()
        self._open = True

    def open(self, step: dict[str, Any] | None) -> bool:
        if self._open and step is not None:
            findings = self._ctx.policy.detectors.scan([step])
            if findings.refused_by or (findings.classes - self._allowed):
                self._open = False
        return self._open


async def _iterate(events: list[bytes]) -> AsyncIterator[bytes]:
    for event in events:
        yield event
