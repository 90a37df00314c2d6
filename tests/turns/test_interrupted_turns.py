"""Turns interrupted while the model works: the caller goes away, the lease is lost, a continued turn's hop hangs."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from typing import Any, cast

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.auth_failures import AuthFailures
from service.context import ServiceContext
from service.simulator import FaultSpec, RunningSimulator

from ..api.helpers import assert_problem, open_conversation, take_turn
from ..conftest import Tenant, make_upstream
from .support import (
    FAQ,
    IDEMPOTENCY_KEY,
    PHI,
    audit,
    conversation_row,
    expire_lease,
    history,
    ledger,
    model_called,
    outcomes,
    post_turn,
    turn_ids,
    turns,
    user_texts,
    wait_until,
)

UPSTREAM_TIMEOUT = 1.0  # seconds: a hop that hangs longer than this times out


async def test_a_cancelled_request_releases_its_turn_and_appends_nothing(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """When the client's request is cancelled while the model works, the turn is closed failed/turn_aborted with a turn.create error record, the conversation and its Idempotency-Key are free again, and nothing was appended."""
    conversation = await open_conversation(api, tenant.headers(), PHI)
    await take_turn(api, tenant.headers(), conversation, "before the cancel")
    stored_before = await history(api, tenant, conversation)
    gemini.app.inject(FaultSpec(hang_seconds=5))  # the model works far longer than the caller waits
    request = asyncio.create_task(post_turn(api, tenant, conversation, "never answered", key="cancel-1"))
    await model_called(gemini, 2)
    request.cancel()
    with pytest.raises(asyncio.CancelledError):
        await request

    async def closed() -> bool:
        return bool((await turns(engine, conversation))[-1][1] != "in_progress")

    await wait_until(closed, what="the cancelled turn is closed")
    assert await turns(engine, conversation) == [(1, "completed", None), (2, "failed", "turn_aborted")]
    row = await conversation_row(engine, conversation)
    assert row is not None
    assert row["lease_token"] is None
    assert row["lease_expires_at"] is None
    assert await history(api, tenant, conversation) == stored_before
    aborted = (await turn_ids(engine, conversation))[2]
    (record,) = await audit(api, tenant, resource=aborted)
    assert (record["action"], record["outcome"], record["reason"]) == ("turn.create", "error", "turn_aborted")
    assert record["details"]["upstream_attempts"] == 0
    # Free again: the same key runs the turn now (no 409), and only that run is stored.
    retried = await take_turn(api, tenant.headers(), conversation, "never answered", **{IDEMPOTENCY_KEY: "cancel-1"})
    assert retried["status"] == "completed"
    assert retried["turn_number"] == 3
    assert user_texts(await history(api, tenant, conversation)) == ["before the cancel", "never answered"]


async def test_a_holder_that_lost_its_lease_stores_nothing_and_the_history_does_not_fork(
    api: httpx.AsyncClient, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A turn whose lease ran out while its model worked, and whose conversation another turn then took over, stores nothing when its reply arrives (409): the history is the takeover's, in one line, and the model accepts it on replay."""
    conversation = await open_conversation(api, tenant.headers(), PHI)
    await take_turn(api, tenant.headers(), conversation, "first")
    gemini.app.inject(FaultSpec(latency_ms=2500))  # the late holder's model call
    late = asyncio.create_task(post_turn(api, tenant, conversation, "the late holder's input"))
    await model_called(gemini, 2)
    await expire_lease(engine, conversation)  # its holder stopped renewing: presumed dead
    takeover = await take_turn(api, tenant.headers(), conversation, "the takeover's input")
    assert takeover["status"] == "completed"
    assert takeover["turn_number"] == 3

    assert_problem(await late, 409, "turn-in-progress")
    assert await turns(engine, conversation) == [
        (1, "completed", None),
        (2, "failed", "abandoned"),
        (3, "completed", None),
    ]
    steps = await history(api, tenant, conversation)
    assert [s["position"] for s in steps] == list(range(len(steps)))
    ids = await turn_ids(engine, conversation)
    assert {s["turn_id"] for s in steps} == {ids[1], ids[3]}
    assert user_texts(steps) == ["first", "the takeover's input"]
    row = await conversation_row(engine, conversation)
    assert row is not None
    assert row["step_count"] == len(steps)
    assert row["lease_token"] is None
    # The lost turn's outcome: closed by the takeover, and its late finish refused.
    assert outcomes(await audit(api, tenant, resource=ids[2])) == [
        ("turn.create", "error", "abandoned"),
        ("turn.create", "denied", "lease_lost"),
    ]
    after = await take_turn(api, tenant.headers(), conversation, "what did I say first?")
    assert after["output_text"] == 'You first said: "first".'


@pytest.fixture
async def impatient(ctx: ServiceContext, gemini: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    """The app with a short upstream timeout, so that a hanging hop times out within the test."""
    gemini.app.reset()
    upstream = make_upstream(gemini, attempts=3, timeout_seconds=UPSTREAM_TIMEOUT)
    own = dataclasses.replace(ctx, upstream=upstream, auth_failures=AuthFailures())
    # httpx types ASGI apps over plain mappings, Litestar over TypedDicts: the same protocol.
    transport = httpx.ASGITransport(app=cast(Any, create_app(own)))
    async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
        yield client
    await upstream.aclose()


@pytest.mark.parametrize("route", [PHI, FAQ], ids=["store-false", "provider-storage"])
async def test_a_continued_turn_whose_hop_hangs_fails_stores_nothing_and_ledgers_the_first_hop(
    impatient: httpx.AsyncClient,
    tenant: Tenant,
    gemini: RunningSimulator,
    engine: AsyncEngine,
    route: dict[str, Any],
) -> None:
    """When the continuation of a requires_continuation turn hangs past the upstream timeout on every attempt (with provider storage it gets one: a hung attempt is retried only without), the turn fails (504), nothing is stored, the first hop's interaction id is in the ledger, and the conversation is free."""
    conversation = await open_conversation(impatient, tenant.headers(), route)
    hung = 1 if route is FAQ else 3
    gemini.app.inject(FaultSpec(count=1))  # the first hop answers requires_continuation
    gemini.app.inject(FaultSpec(hang_seconds=UPSTREAM_TIMEOUT * 2.5, count=hung))  # its continuation hangs
    response = await post_turn(impatient, tenant, conversation, "tell me everything sim:continue 1", key="hop-1")
    body = assert_problem(response, 504, "upstream-failed")
    assert body["code"] == "upstream_timeout"
    (first_hop, *continuations) = gemini.app.create_requests()
    assert first_hop.response["status"] == "requires_continuation"
    assert len(continuations) == hung
    assert all("continuation_token" in c.body for c in continuations)  # the hop that hung was the continuation

    assert await turns(engine, conversation) == [(1, "failed", "upstream_timeout")]
    assert await history(impatient, tenant, conversation) == []
    (row,) = await ledger(engine, conversation)
    ids = await turn_ids(engine, conversation)
    assert (row["id"], row["turn_id"], row["stored"]) == (first_hop.response["id"], ids[1], route is FAQ)
    (record,) = await audit(impatient, tenant, resource=ids[1])
    assert (record["outcome"], record["reason"]) == ("error", "upstream_timeout")
    assert record["details"]["upstream_attempts"] == 1 + hung  # the first hop, then the continuation's
    # The conversation is free, the key too, and the failed turn left nothing to replay.
    again = await take_turn(
        impatient, tenant.headers(), conversation, "tell me everything sim:continue 1", **{IDEMPOTENCY_KEY: "hop-1"}
    )
    assert again["status"] == "completed"
    assert again["turn_number"] == 2
