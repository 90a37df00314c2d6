"""Scenario 3: a replica dies after the model answered and before its reply was committed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx

from service.context import ServiceContext
from service.simulator import FaultSpec, RunningSimulator

from ..conftest import CANARY, Tenant, make_tenant
from .evidence import Evidence
from .figures import Figures
from .netcut import CuttableLink
from .probes import audit_records, history, turn_rows, user_texts
from .replicas import ReplicaSet

LEASE_SECONDS = 3
MODEL_LATENCY_MS = 1500


# The bound is a parameter, not the caller's asyncio.timeout, so that a hang fails naming `what`.
async def _wait_for(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:  # noqa: ASYNC109
    """Poll until `condition()` (sync or async) is truthy; hang detection, generous bound."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


async def _open(http: httpx.AsyncClient, base: str, tenant: Tenant, evidence: Evidence) -> str:
    """A conversation with one stored turn, so that the interrupted turn is not the first."""
    created = await http.post(
        f"{base}/v1/conversations",
        headers=tenant.headers(),
        json={"route": "patient-intake", "data_classes": ["phi"], "metadata": {"note": CANARY}},
    )
    assert created.status_code == 201, created.text
    conversation = str(created.json()["id"])
    first = await http.post(
        f"{base}/v1/conversations/{conversation}/turns",
        headers=tenant.headers(),
        json={"input": f"{CANARY} first"},
    )
    assert first.status_code == 200, first.text
    evidence.canary_turns += 1
    return conversation


async def _key_records(database_url: str, turn_id: str) -> int:
    """How many Idempotency-Key records of this turn hold its stored response."""
    connection = await asyncpg.connect(database_url)
    try:
        return int(
            await connection.fetchval(
                "SELECT count(*) FROM idempotency_records WHERE turn_id = $1 AND response IS NOT NULL", turn_id
            )
        )
    finally:
        await connection.close()


async def _retry_until_acknowledged(
    http: httpx.AsyncClient, url: str, headers: dict[str, str], body: dict[str, Any], evidence: Evidence
) -> tuple[httpx.Response, Counter[str]]:
    """What a client does: the same request, with its Idempotency-Key, until it is answered."""
    refusals: Counter[str] = Counter()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        response = await http.post(url, headers=headers, json=body)
        if response.status_code == 200:
            return response, refusals
        evidence.response("scenario 3 retry", response)
        assert response.status_code in (409, 503), response.text
        refusals[str(response.json()["type"]).rsplit(":", 1)[-1]] += 1
        await asyncio.sleep(0.1)
    raise AssertionError("the retried turn was never acknowledged")


async def test_a_replica_killed_between_the_answer_and_the_commit(
    database_url: str,
    ctx: ServiceContext,
    gemini: RunningSimulator,
    replica_set: ReplicaSet,
    model_latency: Callable[[float], None],
    evidence: Evidence,
    figures: Figures,
) -> None:
    """A replica SIGKILLed while its finishing transaction waits on the conversation row leaves nothing stored; the client's retry with its Idempotency-Key on another replica stores exactly one answer, and the abandoned turn is closed with its outcome on record."""
    doomed, survivor = await replica_set.start(
        2, database_url=database_url, label="s3", env={"CUSTODY_TURN_LEASE_SECONDS": str(LEASE_SECONDS)}
    )
    tenant = await make_tenant(ctx)
    headers = tenant.headers() | {"Idempotency-Key": "interrupted-turn"}
    body = {"input": f"{CANARY} interrupted"}
    async with httpx.AsyncClient(timeout=60) as http:
        conversation = await _open(http, survivor.url, tenant, evidence)
        turns_url = f"/v1/conversations/{conversation}/turns"
        gemini.app.faults.clear()
        gemini.app.inject(FaultSpec(latency_ms=MODEL_LATENCY_MS, count=1))
        calls_before = len(gemini.app.creates())
        first = asyncio.create_task(http.post(doomed.url + turns_url, headers=headers, json=body))
        # The claim has committed once the model is called.
        await _wait_for(lambda: len(gemini.app.creates()) > calls_before, "the model call")

        holder = await asyncpg.connect(database_url)
        # pg_stat_activity is a snapshot taken once per transaction: watch from outside the lock's.
        observer = await asyncpg.connect(database_url)
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM conversations WHERE id = $1 FOR UPDATE", conversation)
        waiting = await _wait_for(
            lambda: observer.fetchrow(
                "SELECT pid, query FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock' "
                # The finish: one statement that updates the row and appends the steps.
                "AND query LIKE '%UPDATE conversations%INSERT INTO steps%' AND ($2 = ANY(pg_blocking_pids(pid)) OR "
                # Queued behind the replica's own lease renewal, which waits on us.
                "EXISTS (SELECT 1 FROM unnest(pg_blocking_pids(pid)) b WHERE $2 = ANY(pg_blocking_pids(b))))",
                doomed.name,
                holder.get_server_pid(),
            ),
            "the finishing transaction to wait on the row lock",
        )
        answered = [r for r in gemini.app.create_requests()[calls_before:] if r.status == 200]
        lease_left = await observer.fetchval(
            "SELECT extract(epoch FROM lease_expires_at - clock_timestamp()) FROM conversations WHERE id = $1",
            conversation,
        )
        doomed.kill()
        killed_at = time.monotonic()
        try:
            lost = await first
            evidence.response("scenario 3 killed replica", lost)
            first_outcome = f"HTTP {lost.status_code}"
        except httpx.TransportError as exc:
            first_outcome = type(exc).__name__
        await lock.rollback()
        released_at = time.monotonic()
        retried, refusals = await _retry_until_acknowledged(http, survivor.url + turns_url, headers, body, evidence)
        acknowledged_at = time.monotonic()
        replayed = await http.post(survivor.url + turns_url, headers=headers, json=body)
        evidence.response("scenario 3 replay", replayed)
        evidence.canary_turns += 1
        steps = await history(http, survivor.url, tenant.headers(), conversation)
        await holder.close()
        await observer.close()

    turns = await turn_rows(database_url, conversation)
    abandoned = [t for t in turns if t["number"] == 2]
    outcome = await audit_records(database_url, {"action": "turn.create", "resource": {"id": abandoned[0]["id"]}})
    model_calls = sum(1 for r in gemini.app.creates()[calls_before:] if r and body["input"] in str(r.get("input")))
    figures.record(
        "3. replica killed between answer and commit",
        f"two `custody serve` replicas (lease {LEASE_SECONDS} s); the test holds the conversation row lock while the "
        f"model answers ({MODEL_LATENCY_MS} ms) so the first replica's finishing transaction waits on it, checks that "
        "in pg_stat_activity, SIGKILLs that replica, releases the lock; the client retries with its Idempotency-Key "
        "on the second replica",
        turns=1,
        kills=1,
        finishing_transaction_waited=waiting is not None,
        first_replica_answer=first_outcome,
        lease_left_at_kill_seconds=round(float(lease_left), 2),
        retry_refusals=dict(refusals),
        stored_answers=user_texts(steps).count(body["input"]),
        model_calls_for_the_turn=model_calls,
        blocked_seconds=round(acknowledged_at - killed_at, 2),
        blocked_after_release_seconds=round(acknowledged_at - released_at, 2),
        abandoned_outcome=[(r["outcome"], r["reason"], r["details"].get("closed_by")) for r in outcome],
    )

    assert answered, "the model had not answered when the replica was killed"
    assert first_outcome != "HTTP 200"
    assert retried.json()["status"] == "completed"
    assert replayed.status_code == 200
    assert replayed.json()["turn_id"] == retried.json()["turn_id"]
    # Exactly one stored answer: the first replica's reply died with it.
    assert user_texts(steps) == [f"{CANARY} first", body["input"]]
    assert [s["position"] for s in steps] == list(range(len(steps)))
    assert len({s["turn_id"] for s in steps}) == 2
    assert [(t["number"], t["status"], t["error_code"]) for t in turns] == [
        (1, "completed", None),
        (2, "failed", "abandoned"),
        (3, "completed", None),
    ]
    assert [(r["outcome"], r["reason"]) for r in outcome] == [("error", "abandoned")]
    assert outcome[0]["details"]["closed_by"] in ("takeover", "reaper")
    assert outcome[0]["actor"]["key_id"] is not None  # recorded against the key that started it


async def test_a_holder_that_lost_its_lease_leaves_the_new_turns_idempotency_key_alone(
    database_url: str,
    ctx: ServiceContext,
    gemini: RunningSimulator,
    replica_set: ReplicaSet,
    model_latency: Callable[[float], None],
    evidence: Evidence,
    figures: Figures,
) -> None:
    """A replica cut off from the database past its lease, whose turn the client's retry took over on another replica, does not free the retried turn's Idempotency-Key when it comes back: a replay returns the stored turn instead of running it again."""
    server = urlsplit(database_url)
    credentials = server.netloc.rpartition("@")[0] + "@" if "@" in server.netloc else ""
    with CuttableLink(server.hostname or "127.0.0.1", server.port or 5432) as link:
        cut_off, direct = await asyncio.gather(
            replica_set.start(
                1,
                database_url=server._replace(netloc=f"{credentials}127.0.0.1:{link.port}").geturl(),
                label="s3-cut",
                env={
                    "CUSTODY_TURN_LEASE_SECONDS": str(LEASE_SECONDS),
                    "CUSTODY_TURN_STORE_WAIT_SECONDS": "1",
                    "CUSTODY_TURN_STORE_RETRY_SECONDS": "120",
                },
            ),
            replica_set.start(
                1, database_url=database_url, label="s3-direct", env={"CUSTODY_TURN_LEASE_SECONDS": str(LEASE_SECONDS)}
            ),
        )
        a, b = cut_off[0], direct[0]
        tenant = await make_tenant(ctx)
        headers = tenant.headers() | {"Idempotency-Key": "taken-over-turn"}
        body = {"input": f"{CANARY} taken over"}
        async with httpx.AsyncClient(timeout=60) as http:
            conversation = await _open(http, b.url, tenant, evidence)
            turns_url = f"/v1/conversations/{conversation}/turns"
            gemini.app.faults.clear()
            # The cut-off replica's call, then the retry's, long enough for the first to come back meanwhile.
            gemini.app.inject(FaultSpec(latency_ms=1000, count=1))
            gemini.app.inject(FaultSpec(latency_ms=8000, count=1))
            calls = len(gemini.app.creates())
            first = asyncio.create_task(http.post(a.url + turns_url, headers=headers, json=body))
            await _wait_for(lambda: len(gemini.app.creates()) > calls, "the first model call")
            link.cut()
            unavailable = await first
            evidence.response("scenario 3b first attempt", unavailable)
            holder = await asyncpg.connect(database_url)
            try:
                await _wait_for(
                    lambda: holder.fetchval(
                        "SELECT lease_expires_at < clock_timestamp() FROM conversations WHERE id = $1", conversation
                    ),
                    "the cut-off replica's lease to run out",
                )
            finally:
                await holder.close()
            retry = asyncio.create_task(http.post(b.url + turns_url, headers=headers, json=body))
            await _wait_for(lambda: len(gemini.app.creates()) > calls + 1, "the retry's model call")
            link.restore()
            first_turn = (await turn_rows(database_url, conversation))[1]
            # The cut-off replica's finish finds the lease gone and is refused (its record says so).
            await _wait_for(
                lambda: audit_records(
                    database_url,
                    {"action": "turn.create", "outcome": "denied", "resource": {"id": first_turn["id"]}},
                ),
                "the cut-off replica to come back and give up its turn",
            )
            retried = await retry
            assert retried.status_code == 200, retried.text
            key_records = await _key_records(database_url, retried.json()["turn_id"])
            replayed = await http.post(b.url + turns_url, headers=headers, json=body)
            evidence.response("scenario 3b replay", replayed)
            evidence.canary_turns += 1
            steps = await history(http, b.url, tenant.headers(), conversation)

    stored = user_texts(steps).count(body["input"])
    first_outcomes = await audit_records(database_url, {"action": "turn.create", "resource": {"id": first_turn["id"]}})
    figures.record(
        "3b. holder that lost its lease comes back",
        f"replica A reaches Postgres through a relay the test cuts while A's model call ({1000} ms) runs; past A's "
        f"lease ({LEASE_SECONDS} s) the client retries with its Idempotency-Key on replica B, which takes the turn over; "
        "the link is restored while B's model call runs; then the client replays the key",
        turns=1,
        first_attempt=f"HTTP {unavailable.status_code}",
        retried_turn_key_records_with_response=key_records,
        first_turn_outcomes=[(r["outcome"], r["reason"]) for r in first_outcomes],
        replay_ran_the_turn_again=replayed.json().get("turn_id") != retried.json()["turn_id"],
        stored_answers=stored,
        duplicated=stored - 1,
    )
    assert unavailable.status_code == 503
    # The retried turn stored its response under its key; the returning replica's release of its
    # own (lost) turn must not have deleted that key's record while the retry was running.
    assert key_records == 1, "the retried turn's Idempotency-Key record was deleted while it ran"
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["turn_id"] == retried.json()["turn_id"], "the replay ran the turn a second time"
    assert stored == 1
