"""Turns against a model service that fails some requests: the share that succeed, and their
latency, with Custody's retries, per-attempt timeout and deadline.

Run: .venv/bin/python ops/bench/upstream_faults.py [--turns 600] [--clients 8] [--rate-503 0.05]
     [--rate-hang 0.01] [--attempt-timeout 5] [--baseline REV]

Starts `custody simulator` and, for each checkout (this one, and with --baseline REV that
revision in a temporary git worktree), a `custody serve` deployment on a fresh database of the
local Postgres (ops/bench/turn_latency.py's machinery) with CUSTODY_UPSTREAM_TIMEOUT_SECONDS set
to --attempt-timeout and everything else at its defaults (3 attempts; a 180 s turn deadline;
the breaker opening after 5 failures in a row for 30 s). The simulator then fails requests at
random (a seeded draw, the same sequence for each side): --rate-503 of them with 503, --rate-hang
of them by holding the request for a minute. --clients clients take --turns turns in all on
conversations of the example policy's patient-intake route (store=false, so every failure may be
retried), 10 turns per conversation. The two sides run one after the other.

Prints per side: turns that succeeded (HTTP 200), the failures by status and problem code, and
p50/p90/p99/max of the turn as the client sees it, successes and failures together. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import statistics
import time
from typing import Any

import httpx
from side_by_side import Tree, print_table, trees
from turn_latency import percentile, running_deployment, simulator_process

INTAKE = {"route": "patient-intake", "data_classes": ["phi"]}


async def run_side(url: str, key: str, args: argparse.Namespace) -> tuple[list[float], collections.Counter[str]]:
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in range(args.turns):
        queue.put_nowait(n)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=300) as http:

        async def client() -> None:
            conversation, taken = "", 10
            while True:
                try:
                    n = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                if taken == 10:
                    created = await http.post("/v1/conversations", json=INTAKE)
                    created.raise_for_status()
                    conversation, taken = created.json()["id"], 0
                started = time.perf_counter()
                response = await http.post(
                    f"/v1/conversations/{conversation}/turns", json={"input": f"turn {n}: any news?"}
                )
                latencies.append((time.perf_counter() - started) * 1000)
                taken += 1
                if response.status_code == 200:
                    outcomes["ok"] += 1
                else:
                    body: Any = response.json()
                    outcomes[f"{response.status_code} {body.get('code', body.get('type', '?'))}"] += 1

        await asyncio.gather(*(client() for _ in range(args.clients)))
    return latencies, outcomes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=600)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rate-503", type=float, default=0.05)
    parser.add_argument("--rate-hang", type=float, default=0.01)
    parser.add_argument("--attempt-timeout", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--baseline", metavar="REV", help="also run a service started from this git revision")
    args = parser.parse_args()
    results: dict[str, tuple[Tree, list[float], collections.Counter[str]]] = {}
    env = {"CUSTODY_UPSTREAM_TIMEOUT_SECONDS": str(args.attempt_timeout)}
    with (
        simulator_process(request_log_limit=1) as (simulator, _),
        trees(args.baseline) as checkouts,
        httpx.Client(base_url=simulator) as admin,
    ):
        for tree in checkouts:
            with contextlib.ExitStack() as stack:
                deployment = stack.enter_context(running_deployment(simulator, extra_env=env, cwd=tree.path))
                replica = deployment.add_replica()
                rates = [
                    {"probability": args.rate_503, "fault": {"status": 503}},
                    {"probability": args.rate_hang, "fault": {"hang_seconds": 60.0}},
                ]
                admin.post("/_simulator/fault-rates", json={"seed": args.seed, "rates": rates}).raise_for_status()
                latencies, outcomes = asyncio.run(run_side(replica.url, deployment.key, args))
                admin.post("/_simulator/fault-rates", json={"rates": []}).raise_for_status()
                results[tree.label] = (tree, latencies, outcomes)
    print(
        f"\n{args.turns} turns, {args.clients} clients, {args.rate_503:.0%} 503s and {args.rate_hang:.0%} hangs, "
        f"{args.attempt_timeout:g} s per attempt"
    )
    rows = []
    for label, (tree, latencies, outcomes) in results.items():
        ok = outcomes["ok"]
        failures = ", ".join(f"{name}: {count}" for name, count in sorted(outcomes.items()) if name != "ok") or "-"
        rows.append(
            [
                f"{label} ({tree.revision})",
                f"{ok}/{len(latencies)} = {ok / len(latencies):.2%}",
                *(f"{percentile(latencies, q):.0f}" for q in (0.5, 0.9, 0.99)),
                f"{max(latencies):.0f}",
                f"{statistics.mean(latencies):.0f}",
                failures,
            ]
        )
    print_table(["side", "succeeded", "p50 ms", "p90 ms", "p99 ms", "max ms", "mean ms", "failures"], rows)


if __name__ == "__main__":
    main()
