"""Scenario 2: the database is killed with SIGKILL, again and again, under concurrent turns that retry with their Idempotency-Key."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable

import httpx

from service.context import ServiceContext
from service.database import make_engine, make_sessions
from service.simulator import RunningSimulator

from ..conftest import CANARY, make_tenant
from .cluster import ThrowawayCluster
from .evidence import Evidence
from .figures import Figures
from .probes import history, turn_rows, user_texts
from .replicas import ReplicaSet

MODEL_LATENCY_MS = 100
# How long a client waits before trying its turn again; short, so that what the figures show is
# how long the service keeps a conversation blocked, not how patient the client was.
RETRY_DELAY_SECONDS = 0.25


def _problem(response: httpx.Response) -> str:
    """The problem type's last part, or what the body is when it is not problem+json."""
    try:
        return str(response.json()["type"]).rsplit(":", 1)[-1]
    except (ValueError, KeyError, TypeError):
        return f"non-problem body ({response.headers.get('content-type')})"


async def test_acknowledged_turns_survive_repeated_database_kills(
    cluster: ThrowawayCluster,
    cluster_database: str,
    ctx: ServiceContext,
    gemini: RunningSimulator,
    replica_set: ReplicaSet,
    model_latency: Callable[[float], None],
    evidence: Evidence,
    figures: Figures,
    full: bool,
) -> None:
    """Concurrent clients retrying their own turn with its Idempotency-Key while the database is SIGKILLed under them lose no acknowledged turn and store none twice, in order."""
    kills, total, conversations = (5, 300, 10) if full else (2, 60, 6)
    per_conversation = total // conversations
    engine = make_engine(cluster_database)
    tenant = await make_tenant(dataclasses.replace(ctx, sessions=make_sessions(engine)))
    await engine.dispose()
    (replica,) = await replica_set.start(1, database_url=cluster_database, label="kills")
    model_latency(MODEL_LATENCY_MS)
    headers = tenant.headers()

    acknowledged: dict[int, list[str]] = {c: [] for c in range(conversations)}
    acknowledged_at: dict[int, list[float]] = {c: [] for c in range(conversations)}
    turn_numbers: dict[str, int] = {}
    answers: Counter[str] = Counter()
    back_at: list[float] = []
    in_flight_at_kill: list[int] = []
    done = asyncio.Event()

    async with httpx.AsyncClient(timeout=120) as http:
        ids = []
        for c in range(conversations):
            created = await http.post(
                f"{replica.url}/v1/conversations",
                headers=headers,
                json={"route": "patient-intake", "data_classes": ["phi"], "subject": f"{CANARY} {c}"},
            )
            assert created.status_code == 201, created.text
            ids.append(created.json()["id"])

        async def turn(c: int, text: str, key: str) -> httpx.Response:
            """One turn, retried with its key until it is acknowledged."""
            while True:
                try:
                    response = await http.post(
                        f"{replica.url}/v1/conversations/{ids[c]}/turns",
                        headers=headers | {"Idempotency-Key": key},
                        json={"input": text},
                    )
                except httpx.TransportError as exc:
                    answers[type(exc).__name__] += 1
                    await asyncio.sleep(RETRY_DELAY_SECONDS)
                    continue
                if response.status_code == 200:
                    return response
                evidence.response("scenario 2 turn", response)
                answers[f"{response.status_code} {_problem(response)}"] += 1
                assert response.status_code == 409 or response.status_code >= 500, response.text
                await asyncio.sleep(RETRY_DELAY_SECONDS)

        async def client(c: int) -> None:
            for i in range(per_conversation):
                text = f"{CANARY} conversation {c} turn {i}"
                response = await turn(c, text, f"kills-{c}-{i}")
                acknowledged[c].append(text)
                acknowledged_at[c].append(time.monotonic())
                turn_numbers[f"kills-{c}-{i}"] = response.json()["turn_number"]

        def in_flight() -> int:
            return sum(1 for r in gemini.app.create_requests() if r.status is None)

        async def killer() -> None:
            for k in range(kills):
                threshold = total * (k + 1) // (kills + 1)
                # Polled: the clients' counters and the simulator's request log (kept by its own
                # thread) change without any event to wait on.
                while sum(map(len, acknowledged.values())) < threshold and not done.is_set():  # noqa: ASYNC110
                    await asyncio.sleep(0.01)
                # Land the kill while the model is answering some turn.
                deadline = time.monotonic() + 5
                while in_flight() == 0 and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(0.002)
                in_flight_at_kill.append(in_flight())
                await asyncio.to_thread(cluster.kill)
                await asyncio.sleep(1.0 + k % 3)  # down for 1 to 3 seconds
                await asyncio.to_thread(cluster.start)
                back_at.append(time.monotonic())

        started = time.monotonic()
        clients = asyncio.gather(*(client(c) for c in range(conversations)))
        killing = asyncio.create_task(killer())
        # Hang detection only: generous bounds, never a claim about speed.
        await asyncio.wait_for(clients, timeout=900 if full else 300)
        done.set()
        await asyncio.wait_for(killing, timeout=120)
        elapsed = time.monotonic() - started
        evidence.canary_turns += total

        # Every acknowledged turn, replayed with its key, answers what it answered the first time
        # without running again; then the histories are read and replayed to the strict model.
        rerun = 0
        for c in range(conversations):
            for i in range(per_conversation):
                replay = await turn(c, f"{CANARY} conversation {c} turn {i}", f"kills-{c}-{i}")
                rerun += replay.json()["turn_number"] != turn_numbers[f"kills-{c}-{i}"]
        stored = {c: user_texts(await history(http, replica.url, headers, ids[c])) for c in range(conversations)}
        firsts = []
        for c in range(conversations):
            final = await turn(c, f"{CANARY} what did I say first?", f"kills-{c}-final")
            firsts.append(final.json()["output_text"])
        evidence.canary_turns += conversations

    # A turn whose claim committed just before a kill is closed by the next claim on its
    # conversation; give any straggler the reaper's time (hang detection, generous bound).
    deadline = time.monotonic() + 60
    while True:
        rows = [t for c in ids for t in await turn_rows(cluster_database, c)]
        open_rows = sum(1 for t in rows if t["status"] == "in_progress")
        if not open_rows or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    await evidence.snapshot(cluster_database, "s2-killed-cluster", pg_dump=cluster.bin / "pg_dump")

    blocked = []
    for k, back in enumerate(back_at):
        for c in range(conversations):
            after = [t for t in acknowledged_at[c] if t >= back]
            if after:
                blocked.append((after[0] - back, k, c))
    lost = sum(1 for c in acknowledged for text in acknowledged[c] if text not in stored[c])
    duplicated = sum(n - 1 for c in stored for n in Counter(stored[c]).values() if n > 1)
    figures.record(
        "2. database SIGKILLed under load",
        f"{total} turns from {conversations} concurrent clients (one conversation each) against one `custody serve` "
        f"replica on a throwaway Postgres cluster SIGKILLed {kills} times (down 1-3 s each); every client retries its "
        f"own turn with its Idempotency-Key on 409/5xx/connection errors every {RETRY_DELAY_SECONDS:g} s; "
        f"model latency {MODEL_LATENCY_MS} ms",
        turns=total,
        kills=len(back_at),
        model_calls_in_flight_at_kills=in_flight_at_kill,
        acknowledged=sum(map(len, acknowledged.values())),
        lost=lost,
        duplicated=duplicated,
        replays_that_ran_again=rerun,
        longest_blocked_seconds=round(max(b for b, _, _ in blocked), 2) if blocked else None,
        median_blocked_seconds=round(sorted(b for b, _, _ in blocked)[len(blocked) // 2], 2) if blocked else None,
        refusals_and_errors=dict(sorted(answers.items())),
        open_turn_rows=open_rows,
        abandoned_turns_closed=sum(1 for t in rows if t["error_code"] == "abandoned"),
        seconds=round(elapsed, 1),
    )

    assert len(back_at) == kills
    assert sum(in_flight_at_kill) > 0, "no kill landed while the model was answering"
    assert lost == 0
    assert duplicated == 0
    assert rerun == 0
    for c in range(conversations):
        assert stored[c] == acknowledged[c], f"conversation {c}: the history is not the acknowledged inputs in order"
    assert firsts == [f'You first said: "{acknowledged[c][0]}".' for c in range(conversations)]
    assert open_rows == 0
    # Database errors are 503 (with Retry-After), never a 500 the client cannot tell from a bug.
    assert not [a for a in answers if a.startswith("500")], answers
