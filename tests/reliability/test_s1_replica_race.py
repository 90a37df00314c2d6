"""Scenario 1: fifty concurrent turns on one conversation, through three `custody serve` replicas."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import Counter
from collections.abc import Callable

import httpx

from service.context import ServiceContext

from ..conftest import CANARY, make_tenant
from .evidence import Evidence
from .figures import Figures
from .probes import audit_records, history, turn_rows, user_texts
from .replicas import ReplicaSet

CLIENTS = 50
REPLICAS = 3
# Clients start at random moments within this window: all at once, the first claim would hold
# the conversation while the other 49 are refused, and the test would prove little about order.
SPREAD_SECONDS = 3.0
MODEL_LATENCY_MS = 50


async def test_fifty_concurrent_turns_on_one_conversation_over_three_replicas(
    database_url: str,
    ctx: ServiceContext,
    replica_set: ReplicaSet,
    model_latency: Callable[[float], None],
    evidence: Evidence,
    figures: Figures,
) -> None:
    """Fifty turns sent concurrently to three replicas on one conversation leave one linear history: each 200 stored exactly once in turn-number order, each 409 stored not at all, every turn row closed with its turn.create record."""
    replicas = await replica_set.start(REPLICAS, database_url=database_url, label="race")
    tenant = await make_tenant(ctx)
    headers = tenant.headers()
    model_latency(MODEL_LATENCY_MS)
    rng = random.Random(1)
    async with httpx.AsyncClient(timeout=60) as http:
        created = await http.post(
            f"{replicas[0].url}/v1/conversations",
            headers=headers,
            json={"route": "patient-intake", "data_classes": ["phi"], "subject": CANARY, "metadata": {"note": CANARY}},
        )
        assert created.status_code == 201, created.text
        conversation = created.json()["id"]

        async def client(index: int) -> tuple[str, httpx.Response]:
            await asyncio.sleep(rng.uniform(0, SPREAD_SECONDS))
            text = f"{CANARY} client {index}"
            response = await http.post(
                f"{replicas[index % REPLICAS].url}/v1/conversations/{conversation}/turns",
                headers=headers | {"Idempotency-Key": f"race-{index}"},
                json={"input": text},
            )
            evidence.response("scenario 1 turn", response)
            return text, response

        started = time.monotonic()
        results = await asyncio.gather(*(client(i) for i in range(CLIENTS)))
        elapsed = time.monotonic() - started
        evidence.canary_turns += CLIENTS

        steps = await history(http, replicas[1].url, headers, conversation)
        verify = await http.get(f"{replicas[2].url}/v1/audit/verify", headers=tenant.headers("auditor"))
        evidence.response("scenario 1 verify", verify)

        statuses = Counter(response.status_code for _, response in results)
        accepted = sorted(
            (
                (response.json()["turn_number"], text, response.json()["turn_id"])
                for text, response in results
                if response.status_code == 200
            )
        )
        refused = [text for text, response in results if response.status_code == 409]
        refusal_types = Counter(response.json()["type"] for _, response in results if response.status_code == 409)
        stored = user_texts(steps)
        turns = await turn_rows(database_url, conversation)
        created_records = await audit_records(
            database_url, {"action": "turn.create", "details": {"conversation_id": conversation}}
        )
        refused_records = await audit_records(
            database_url,
            {
                "action": "turn.start",
                "outcome": "denied",
                "reason": "turn_in_progress",
                "resource": {"id": conversation},
            },
        )
        per_replica = Counter(i % REPLICAS for i, (_, r) in enumerate(results) if r.status_code == 200)
        figures.record(
            "1. three replicas, one conversation",
            f"{CLIENTS} turns sent concurrently (random start within {SPREAD_SECONDS:g} s) to {REPLICAS} "
            f"`custody serve` replicas on one Postgres, all on ONE conversation; model latency {MODEL_LATENCY_MS} ms",
            turns=CLIENTS,
            acknowledged=len(accepted),
            refused_409=len(refused),
            other_statuses=sum(n for s, n in statuses.items() if s not in (200, 409)),
            acknowledged_per_replica=dict(sorted(per_replica.items())),
            lost=sum(1 for _, text, _ in accepted if text not in stored),
            duplicated=sum(n - 1 for n in Counter(stored).values() if n > 1),
            refused_but_stored=sum(1 for text in refused if text in stored),
            open_turn_rows=sum(1 for t in turns if t["status"] == "in_progress"),
            seconds=round(elapsed, 2),
        )

        # Finally, the strict simulator accepts the whole replayed history only if nothing in it
        # was lost, reordered or altered.
        final = await http.post(
            f"{replicas[2].url}/v1/conversations/{conversation}/turns",
            headers=headers,
            json={"input": f"{CANARY} what did I say first?"},
        )
        evidence.response("scenario 1 final turn", final)
        evidence.canary_turns += 1

    assert set(statuses) <= {200, 409}, statuses
    assert refusal_types == Counter({"urn:custody:problem:turn-in-progress": len(refused)})
    assert len(accepted) >= 2, "the turns never overlapped, or none got through: the test proved nothing"
    assert refused, "the turns never overlapped, or none got through: the test proved nothing"
    # Refused turns take no number: the acknowledged ones are numbered 1..n, in the order stored.
    assert [number for number, _, _ in accepted] == list(range(1, len(accepted) + 1))
    assert [s["position"] for s in steps] == list(range(len(steps)))
    assert stored == [text for _, text, _ in accepted]
    assert not set(refused) & set(stored)
    # Each turn's steps are contiguous and belong to the acknowledged turn of that number.
    assert [s["turn_id"] for s in steps if s["step"]["type"] == "user_input"] == [t for _, _, t in accepted]
    runs = [steps[0]["turn_id"]] + [b["turn_id"] for a, b in itertools.pairwise(steps) if a["turn_id"] != b["turn_id"]]
    assert runs == [t for _, _, t in accepted]
    # Every turn row is closed, one per acknowledged turn, each with its turn.create record; every
    # refusal has its own record too.
    assert [(t["number"], t["status"]) for t in turns] == [(n, "completed") for n, _, _ in accepted]
    assert sorted((r["resource"]["id"], r["outcome"]) for r in created_records) == sorted(
        (t["id"], "success") for t in turns
    )
    assert len(refused_records) == len(refused)
    assert verify.status_code == 200, verify.text
    assert verify.json()["ok"] is True, verify.text
    assert final.status_code == 200, final.text
    assert final.json()["output_text"] == f'You first said: "{accepted[0][1]}".'
