"""Bytes sent upstream per turn: a conversation chained onto the provider's copy of its history
(`previous_interaction_id`) against the same conversation replayed in full every turn.

Run: .venv/bin/python ops/bench/chained_bytes.py [--turns 50] [--report 10,50]

Starts `custody simulator` and two `custody serve` deployments on fresh databases of the local
Postgres (ops/bench/turn_latency.py's machinery), both under the example policy, on its
`public-faq` route (the one whose route and class permit provider storage, so both send
store=true). One chains as Custody does by default; the other has
CUSTODY_PROVIDER_CHAIN_MAX_AGE_SECONDS=0, so that no copy is ever young enough to chain onto and
every turn replays the whole history. Each takes --turns short text turns, side by side; after each
turn the size of the request body Custody sent is read back from the simulator's request log.

Prints, at each turn of --report: that turn's body in bytes for both, their ratio, and the bytes
sent over all turns so far; and the median time of a turn as the client sees it over the last
ten turns up to that point. Asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack

import httpx
from turn_latency import running_deployment, simulator_process

FAQ = {"route": "public-faq", "data_classes": ["public"]}


def last_body_bytes(simulator: httpx.Client) -> int:
    (request,) = simulator.get("/_simulator/requests").json()
    return int(request["body_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--report", type=lambda s: [int(x) for x in s.split(",")], default=[10, 50])
    args = parser.parse_args()
    sides = {"chained": {}, "replayed": {"CUSTODY_PROVIDER_CHAIN_MAX_AGE_SECONDS": "0"}}
    with ExitStack() as stack:
        url, _ = stack.enter_context(simulator_process(request_log_limit=1))
        simulator = stack.enter_context(httpx.Client(base_url=url))
        clients: dict[str, httpx.Client] = {}
        for name, env in sides.items():
            deployment = stack.enter_context(running_deployment(url, extra_env=env))
            replica = deployment.add_replica()
            clients[name] = stack.enter_context(
                httpx.Client(base_url=replica.url, headers={"Authorization": f"Bearer {deployment.key}"}, timeout=60)
            )
        conversations = {}
        for name, client in clients.items():
            created = client.post("/v1/conversations", json=FAQ)
            created.raise_for_status()
            conversations[name] = created.json()["id"]
        sent: dict[str, list[int]] = {name: [] for name in sides}
        took: dict[str, list[float]] = {name: [] for name in sides}
        for n in range(1, args.turns + 1):
            for name, client in clients.items():
                started = time.perf_counter()
                turn = client.post(
                    f"/v1/conversations/{conversations[name]}/turns",
                    json={"input": f"question {n}: when is the branch on Main Street open on Saturdays?"},
                )
                took[name].append((time.perf_counter() - started) * 1000)
                turn.raise_for_status()
                sent[name].append(last_body_bytes(simulator))
        print(
            f"{'turn':>5} {'chained B':>10} {'replayed B':>11} {'ratio':>7} {'sum chained':>12} "
            f"{'sum replayed':>13} {'ratio':>7} {'p50 ms ch/rep (last 10)':>24}"
        )
        for n in args.report:
            if n > args.turns:
                continue
            chained, replayed = sent["chained"][n - 1], sent["replayed"][n - 1]
            total_c, total_r = sum(sent["chained"][:n]), sum(sent["replayed"][:n])
            window = slice(max(0, n - 10), n)
            p50 = [statistics.median(took[name][window]) for name in sides]
            print(
                f"{n:>5} {chained:>10,} {replayed:>11,} {chained / replayed:>7.3f} {total_c:>12,} {total_r:>13,} "
                f"{total_c / total_r:>7.3f} {p50[0]:>11.1f} / {p50[1]:.1f}"
            )


if __name__ == "__main__":
    main()
