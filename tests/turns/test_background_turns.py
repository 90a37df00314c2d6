"""Background turns: 202 at once, Custody polls the model and stores its answer as a foreground
turn's is stored; refused where the route or a data class forbids it; cancelled on request; and
resumed by another replica (or the same one restarted) when the one that started it stops."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import yaml
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.auth_failures import AuthFailures
from service.background import BackgroundTasks
from service.config import REPO_ROOT
from service.context import ServiceContext
from service.conversations import load_cipher, read_steps
from service.database import make_engine, make_sessions
from service.leases import reap_expired_leases
from service.models import Conversation
from service.policy import parse_policy
from service.simulator import RunningSimulator, SimulatorConfig, start_simulator
from service.turns import BackgroundTurns

from ..api.helpers import assert_problem, open_conversation, row_counts, take_turn
from ..conftest import CANARY, Tenant, asgi_transport, make_upstream
from .support import FAQ, PHI, audit, conversation_row, expire_lease, ledger, turns, wait_until

# A route like public-faq that also allows `pii`, a class that forbids provider storage.
MIXED = {"route": "faq-mixed", "data_classes": ["pii"]}
# Long enough that nothing finishes unless the test moves the simulator's clock.
RUN_SECONDS = 3600.0


@dataclasses.dataclass
class Instance:
    """One service instance: its context and an HTTP client to its app."""

    ctx: ServiceContext
    api: httpx.AsyncClient

    async def stop(self) -> None:
        """Stop as a replica that dies does: its pollers end, its leases are left to run out."""
        await self.ctx.polls.drain(timeout=0)


@pytest.fixture(scope="module")
def slow_gemini() -> Iterator[RunningSimulator]:
    """A simulator whose background interactions run until the test moves its clock."""
    with start_simulator(SimulatorConfig(retention_seconds=7 * 24 * 3600, background_run_seconds=RUN_SECONDS)) as sim:
        yield sim


def _policy() -> Any:
    document = yaml.safe_load((REPO_ROOT / "ops" / "policy.example.yaml").read_text(encoding="utf-8"))
    document["routes"]["faq-mixed"] = copy.deepcopy(document["routes"]["public-faq"]) | {
        "data_classes": ["public", "pii"]
    }
    return parse_policy(document, source="test")


@pytest.fixture
async def instances(
    ctx: ServiceContext, slow_gemini: RunningSimulator, database_url: str
) -> AsyncIterator[list[Instance]]:
    """Two service instances on the session database, each with its own engine, pollers and
    upstream client, under the example policy plus `faq-mixed`."""
    slow_gemini.app.reset(state=True)
    policy = _policy()
    made: list[Instance] = []
    engines = []
    clients = []
    try:
        for _ in range(2):
            engine = make_engine(database_url)
            engines.append(engine)
            own = dataclasses.replace(
                ctx,
                sessions=make_sessions(engine),
                policy=policy,
                upstream=make_upstream(slow_gemini, attempts=3, timeout_seconds=10),
                tasks=BackgroundTasks(),
                polls=BackgroundTasks(),
                auth_failures=AuthFailures(),
                turn_lease_seconds=3,
                background_poll_seconds=0.05,
            )
            client = httpx.AsyncClient(
                transport=asgi_transport(create_app(own, max_body_bytes=64_000)), base_url="http://custody.test"
            )
            clients.append(client)
            made.append(Instance(own, client))
        yield made
    finally:
        for instance in made:
            await instance.ctx.polls.drain(timeout=0)
            await instance.ctx.tasks.drain(timeout=10)
            await instance.ctx.upstream.aclose()
        for client in clients:
            await client.aclose()
        for engine in engines:
            await engine.dispose()


async def _start(
    api: httpx.AsyncClient, tenant: Tenant, conversation: str, data: Any, **headers: str
) -> httpx.Response:
    return await api.post(
        f"/v1/conversations/{conversation}/turns",
        json={"input": data, "background": True},
        headers=tenant.headers() | headers,
    )


async def _turn(api: httpx.AsyncClient, tenant: Tenant, conversation: str, turn_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/conversations/{conversation}/turns/{turn_id}", headers=tenant.headers())
    assert response.status_code == 200, response.text
    return dict(response.json())


async def _until_done(api: httpx.AsyncClient, tenant: Tenant, conversation: str, turn_id: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}

    async def done() -> bool:
        seen.update(await _turn(api, tenant, conversation, turn_id))
        return bool(seen["status"] != "in_progress")

    await wait_until(done, what="the background turn has ended")
    return seen


async def _stored_bytes(ctx: ServiceContext, conversation: str) -> list[bytes]:
    async with ctx.sessions() as session:
        row = await session.get(Conversation, conversation)
        assert row is not None
        return [step for _, _, step in await read_steps(session, await load_cipher(session, ctx, row))]


async def test_a_background_turn_answers_202_and_stores_what_a_foreground_turn_stores(
    instances: list[Instance], tenant: Tenant, slow_gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """202 with the turn id, in_progress and a Location; the interaction goes on the ledger with its upstream.store record at once; once the model is done the poll shows the result, and the history holds the input and the model's steps byte for byte as the provider sent them, laid out as a foreground turn's."""
    api, ctx = instances[0].api, instances[0].ctx
    foreground = await open_conversation(api, tenant.headers(), FAQ)
    answer = await take_turn(api, tenant.headers(), foreground, "What are your opening hours?")
    background = await open_conversation(api, tenant.headers(), FAQ)

    response = await _start(api, tenant, background, "What are your opening hours?")
    assert response.status_code == 202, response.text
    started = response.json()
    assert started["status"] == "in_progress"
    assert started["background"] is True
    assert started["result"] is None
    turn_id = started["turn_id"]
    assert response.headers["location"] == f"/v1/conversations/{background}/turns/{turn_id}"
    (create,) = [r for r in slow_gemini.app.create_requests() if r.body.get("background")]
    assert create.body["store"] is True
    interaction_id = create.response["id"]
    assert [row["id"] for row in await ledger(engine, background)] == [interaction_id]
    stores = await audit(api, tenant, action="upstream.store")
    assert interaction_id in [e["resource"]["id"] for e in stores]
    assert (await _turn(api, tenant, background, turn_id))["status"] == "in_progress"

    slow_gemini.app.advance(RUN_SECONDS + 1)
    done = await _until_done(api, tenant, background, turn_id)
    assert done["status"] == "completed"
    result = done["result"]
    assert result["turn_id"] == turn_id
    assert result["storage"]["store"] is True
    assert set(result) == set(answer)
    assert [s["type"] for s in result["steps"]] == [s["type"] for s in answer["steps"]]
    json.loads(result["output_text"])  # public-faq asks for JSON output

    # The input as a foreground turn stores it; the model's steps as the provider sent them.
    stored = await _stored_bytes(ctx, background)
    assert stored[0] == (await _stored_bytes(ctx, foreground))[0]
    polled = await ctx.upstream.get(interaction_id)
    assert polled is not None
    assert stored[1:] == polled[1]
    assert len(stored) == len(await _stored_bytes(ctx, foreground))
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text("SELECT pending_input, background_interaction_id FROM turns WHERE id = :t"), {"t": turn_id}
            )
        ).one()
    assert row.pending_input is None  # the sealed input is dropped once stored with the answer
    assert row.background_interaction_id == interaction_id
    assert (await conversation_row(engine, background) or {})["lease_token"] is None

    # The next (foreground) turn replays it: the simulator refuses any step not byte-identical.
    await take_turn(api, tenant.headers(), background, "And on Sundays?")


async def test_a_running_background_turn_refuses_new_turns(
    instances: list[Instance], tenant: Tenant, slow_gemini: RunningSimulator
) -> None:
    """While the model works, a new turn (foreground or background) gets 409 turn-in-progress; after it ends, turns are taken again."""
    api = instances[0].api
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    turn_id = (await _start(api, tenant, conversation, "first")).json()["turn_id"]
    second = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "second"}, headers=tenant.headers()
    )
    assert_problem(second, 409, "turn-in-progress")
    assert_problem(await _start(api, tenant, conversation, "third"), 409, "turn-in-progress")
    slow_gemini.app.advance(RUN_SECONDS + 1)
    assert (await _until_done(api, tenant, conversation, turn_id))["status"] == "completed"
    await take_turn(api, tenant.headers(), conversation, "now it is free")


@pytest.mark.parametrize(
    ("body", "reason"),
    [(PHI, "route_denies_background"), (MIXED, "data_class_denies")],
    ids=["route-without-background", "class-forbids-storage"],
)
async def test_background_is_refused_where_the_policy_forbids_it(
    instances: list[Instance],
    tenant: Tenant,
    slow_gemini: RunningSimulator,
    engine: AsyncEngine,
    body: dict[str, Any],
    reason: str,
) -> None:
    """On a route without background turns, or a conversation carrying a class that forbids provider storage, a background turn is refused with 422 background-not-permitted: nothing stored, nothing sent, the refusal audited."""
    api = instances[0].api
    conversation = await open_conversation(api, tenant.headers(), body)
    slow_gemini.app.reset()
    before = await row_counts(engine)
    refused = assert_problem(
        await _start(api, tenant, conversation, f"hello {CANARY}"), 422, "background-not-permitted"
    )
    assert CANARY not in json.dumps(refused)
    assert slow_gemini.app.creates() == []
    assert await row_counts(engine) == before
    (start,) = await audit(api, tenant, action="turn.start")
    assert (start["outcome"], start["reason"]) == ("denied", "background_not_permitted")
    assert start["details"]["storage_reason"] == reason


async def test_a_detected_class_that_forbids_storage_refuses_the_background_turn(
    instances: list[Instance], tenant: Tenant, slow_gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """An e-mail address (class pii, which forbids provider storage) in a public conversation's background turn would raise its classification: refused with 422 before anything is stored or sent."""
    api = instances[0].api
    conversation = await open_conversation(api, tenant.headers(), {"route": "faq-mixed", "data_classes": ["public"]})
    slow_gemini.app.reset()
    before = await row_counts(engine)
    assert_problem(
        await _start(api, tenant, conversation, "write to jane@example.com"), 422, "background-not-permitted"
    )
    assert slow_gemini.app.creates() == []
    assert await row_counts(engine) == before


async def test_cancel_stops_the_turn_upstream_and_locally(
    instances: list[Instance], tenant: Tenant, slow_gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """Cancel: the turn ends failed/cancelled with nothing stored, the lease and Idempotency-Key are free (the key runs a new turn), the interaction is cancelled upstream, and the cancel is audited; a second cancel is 409."""
    api = instances[0].api
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    started = await _start(api, tenant, conversation, "never answered", **{"Idempotency-Key": "bg-cancel-1"})
    turn_id = started.json()["turn_id"]
    (create,) = slow_gemini.app.create_requests()
    interaction_id = create.response["id"]

    response = await api.post(f"/v1/conversations/{conversation}/turns/{turn_id}/cancel", headers=tenant.headers())
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["error_code"]) == ("failed", "cancelled")
    assert slow_gemini.app.store.get(interaction_id).status(slow_gemini.app.clock.now()) == "cancelled"
    assert await turns(engine, conversation) == [(1, "failed", "cancelled")]
    assert (await conversation_row(engine, conversation) or {})["step_count"] == 0
    view = await _turn(api, tenant, conversation, turn_id)
    assert (view["status"], view["error_code"], view["result"]) == ("failed", "cancelled", None)
    (record,) = [e for e in await audit(api, tenant, action="turn.create") if e["resource"]["id"] == turn_id]
    assert record["details"]["closed_by"] == "cancel"

    assert_problem(
        await api.post(f"/v1/conversations/{conversation}/turns/{turn_id}/cancel", headers=tenant.headers()),
        409,
        "turn-not-running",
    )
    # The key is free again: the same request runs a new turn, and the conversation takes it.
    again = await _start(api, tenant, conversation, "never answered", **{"Idempotency-Key": "bg-cancel-1"})
    assert again.status_code == 202, again.text
    assert again.json()["turn_id"] != turn_id
    slow_gemini.app.advance(RUN_SECONDS + 1)
    assert (await _until_done(api, tenant, conversation, again.json()["turn_id"]))["status"] == "completed"
    # Cancelling a foreground (or finished) turn is 409 as well.
    assert_problem(
        await api.post(
            f"/v1/conversations/{conversation}/turns/{again.json()['turn_id']}/cancel", headers=tenant.headers()
        ),
        409,
        "turn-not-running",
    )


async def test_cancel_tolerates_an_interaction_that_has_finished_upstream(
    instances: list[Instance], tenant: Tenant, slow_gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """The model finished but no poller stored it yet (its replica stopped): cancel still closes the turn locally and stores nothing."""
    first = instances[0]
    conversation = await open_conversation(first.api, tenant.headers(), FAQ)
    turn_id = (await _start(first.api, tenant, conversation, "finished upstream")).json()["turn_id"]
    await first.stop()
    slow_gemini.app.advance(RUN_SECONDS + 1)
    response = await first.api.post(
        f"/v1/conversations/{conversation}/turns/{turn_id}/cancel", headers=tenant.headers()
    )
    assert response.status_code == 200, response.text
    assert await turns(engine, conversation) == [(1, "failed", "cancelled")]
    assert (await conversation_row(engine, conversation) or {})["step_count"] == 0


async def test_another_instance_resumes_a_background_turn_after_the_first_stops(
    instances: list[Instance], tenant: Tenant, slow_gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """The instance that started a background turn stops mid-run; its lease runs out; the reaper and a new turn leave the turn alone (409); the second instance takes the lease over, polls, and stores the answer, which both instances then show."""
    first, second = instances
    conversation = await open_conversation(first.api, tenant.headers(), FAQ)
    turn_id = (await _start(first.api, tenant, conversation, "survive a restart")).json()["turn_id"]
    await first.stop()
    await expire_lease(engine, conversation)

    # Neither the reaper nor a new turn's takeover closes it as abandoned.
    assert await reap_expired_leases(second.ctx, grace_seconds=0) == 0
    blocked = await second.api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "meanwhile"}, headers=tenant.headers()
    )
    assert_problem(blocked, 409, "turn-in-progress")
    assert await turns(engine, conversation) == [(1, "in_progress", None)]

    assert await BackgroundTurns(second.ctx).resume_orphans() == 1
    slow_gemini.app.advance(RUN_SECONDS + 1)
    done = await _until_done(second.api, tenant, conversation, turn_id)
    assert done["status"] == "completed"
    assert (await _turn(first.api, tenant, conversation, turn_id))["result"] == done["result"]
    assert len(await _stored_bytes(second.ctx, conversation)) == 1 + len(done["result"]["steps"])
    # Once done, there is nothing left to resume.
    assert await BackgroundTurns(first.ctx).resume_orphans() == 0


async def test_resume_leaves_a_turn_whose_lease_is_live(
    instances: list[Instance], tenant: Tenant, slow_gemini: RunningSimulator
) -> None:
    """A background turn its instance still follows (live lease) is not taken by another instance's sweep."""
    first, second = instances
    conversation = await open_conversation(first.api, tenant.headers(), FAQ)
    turn_id = (await _start(first.api, tenant, conversation, "still followed")).json()["turn_id"]
    assert await BackgroundTurns(second.ctx).resume_orphans() == 0
    slow_gemini.app.advance(RUN_SECONDS + 1)
    assert (await _until_done(first.api, tenant, conversation, turn_id))["status"] == "completed"


async def test_turn_reads_are_tenant_scoped_and_hostile_ids_get_problems(
    instances: list[Instance], tenant: Tenant, new_tenant: Any, slow_gemini: RunningSimulator
) -> None:
    """Another tenant's turn is 404 (as a missing one); malformed, unknown and hostile turn ids are 404 problem+json, a bad body 400, on both new endpoints."""
    api = instances[0].api
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    turn_id = (await _start(api, tenant, conversation, "mine")).json()["turn_id"]
    other = await new_tenant()
    for path in (f"/v1/conversations/{conversation}/turns/{turn_id}",):
        assert_problem(await api.get(path, headers=other.headers()), 404, "conversation-not-found")
        assert_problem(await api.post(path + "/cancel", headers=other.headers()), 404, "conversation-not-found")
    for bad in ("turn_0", "turn_" + "0" * 30, "x" * 500, "%00", "turn_%27%20OR%201=1", "..%2F..%2Fetc"):
        path = f"/v1/conversations/{conversation}/turns/{bad}"
        response = await api.get(path, headers=tenant.headers())
        assert response.status_code == 404, (bad, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
        response = await api.post(path + "/cancel", headers=tenant.headers())
        assert response.status_code in (404, 405), (bad, response.text)
        assert response.headers["content-type"].startswith("application/problem+json")
    assert_problem(
        await api.get(f"/v1/conversations/conv_nope/turns/{turn_id}", headers=tenant.headers()),
        404,
        "conversation-not-found",
    )
    malformed = await api.post(
        f"/v1/conversations/{conversation}/turns", json={"input": "x", "background": "yes"}, headers=tenant.headers()
    )
    assert_problem(malformed, 400, "malformed-request")
    assert (await _turn(api, tenant, conversation, turn_id))["status"] == "in_progress"
    slow_gemini.app.advance(RUN_SECONDS + 1)
    await _until_done(api, tenant, conversation, turn_id)


async def test_the_canary_never_reaches_records_logs_or_bodies(
    instances: list[Instance],
    tenant: Tenant,
    slow_gemini: RunningSimulator,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A background turn carrying the canary, its poll, its result read and a cancelled one: no audit record, log line or error body holds it."""
    api = instances[0].api
    caplog.set_level(logging.DEBUG)
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    turn_id = (await _start(api, tenant, conversation, f"tell me about {CANARY}")).json()["turn_id"]
    slow_gemini.app.advance(RUN_SECONDS + 1)
    done = await _until_done(api, tenant, conversation, turn_id)
    assert done["status"] == "completed"
    cancelled = (await _start(api, tenant, conversation, f"again {CANARY}")).json()["turn_id"]
    bodies = [
        (await api.post(f"/v1/conversations/{conversation}/turns/{cancelled}/cancel", headers=tenant.headers())).text,
        (await api.post(f"/v1/conversations/{conversation}/turns/{cancelled}/cancel", headers=tenant.headers())).text,
        (await _start(api, tenant, await open_conversation(api, tenant.headers(), PHI), CANARY)).text,
    ]
    assert all(CANARY not in body for body in bodies)
    assert CANARY not in json.dumps(await audit(api, tenant))
    assert CANARY not in caplog.text


async def test_a_background_turn_chains_like_a_foreground_one(
    instances: list[Instance], tenant: Tenant, slow_gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """A background turn after a stored turn sends only its input, chained onto that turn's copy; the turn after it chains onto the background interaction; each turn records how its history went."""
    api = instances[0].api
    conversation = await open_conversation(api, tenant.headers(), FAQ)
    await take_turn(api, tenant.headers(), conversation, "What are your opening hours?")
    (first,) = slow_gemini.app.create_requests()
    slow_gemini.app.reset()
    response = await _start(api, tenant, conversation, "And on Sundays?")
    assert response.status_code == 202, response.text
    (started,) = slow_gemini.app.create_requests()
    assert started.body["previous_interaction_id"] == first.response["id"]
    assert len(started.body["input"]) == 1
    slow_gemini.app.advance(RUN_SECONDS + 1)
    assert (await _until_done(api, tenant, conversation, response.json()["turn_id"]))["status"] == "completed"
    slow_gemini.app.reset()
    await take_turn(api, tenant.headers(), conversation, "And holidays?")
    (after,) = slow_gemini.app.create_requests()
    assert after.body["previous_interaction_id"] == started.response["id"]
    async with engine.connect() as connection:
        sent = (
            await connection.execute(
                text("SELECT history_sent FROM turns WHERE conversation_id = :c ORDER BY number"), {"c": conversation}
            )
        ).scalars()
        assert list(sent) == ["replayed", "chained", "chained"]
