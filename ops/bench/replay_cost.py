"""Replay cost per stored step: what Custody adds to a turn as its conversation grows to 1,000 steps.

Run: .venv/bin/python ops/bench/replay_cost.py [--steps 10,250,500,1000] [--samples 20] [--baseline REV]

Starts `custody simulator` (no added latency) and `custody serve` as a deployment on a fresh
database of the local Postgres (ops/bench/turn_latency.py's machinery). For each N of --steps a
conversation grows by short text turns (each stores 4 steps: the input, and the simulator's reply
of a thought, a step of a type the SDK does not know and the model's output) until it holds N
stored steps. Then samples are taken from all of them in turn (so that a change in the load of
this shared machine meets every point alike, rather than the points measured last): a sample is a
turn timed as the client sees it and then, as in turn_latency.py, the very body Custody sent
upstream for that turn (read back from the simulator's request log) posted again to the
simulator: the floor of the upstream hop. What Custody adds is the difference, sample by sample. A
sample's stored steps are those it replayed (the body's input less the new one): each sample adds
4 to its conversation, and the points' stored steps are the medians. Three turns on a
conversation of their own warm each service up first.

Prints per point the stored steps, and p50 of the post, of the turn and of what Custody adds (with
its p90); then the slope of each in microseconds per stored step, a least-squares line through
the points' medians: the added latency's slope is the replay cost per stored step (decrypting,
decoding and re-sending one more step of history on every turn).

With --baseline REV the same conversations are grown and measured on a service started from REV
(checked out in a temporary git worktree), sample by sample in turn with the current tree's, on
the same simulator; the ratio is current / baseline. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from side_by_side import Tree, print_table, ratio, trees
from turn_latency import percentile, running_deployment, simulator_process


@dataclass
class Sample:
    stored: int  # the steps of history the turn replayed
    custody: float  # ms
    post: float  # ms

    @property
    def added(self) -> float:
        return self.custody - self.post


@dataclass
class Side:
    tree: Tree
    http: httpx.AsyncClient
    conversations: list[str] = field(default_factory=list)  # one per point
    points: list[list[Sample]] = field(default_factory=list)


async def new_conversation(http: httpx.AsyncClient) -> str:
    created = await http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
    created.raise_for_status()
    return str(created.json()["id"])


async def grow(http: httpx.AsyncClient, conversation: str, target: int) -> None:
    """Turns, untimed, until the conversation holds at least `target` steps."""
    n = 0
    while True:
        found = await http.get(f"/v1/conversations/{conversation}")
        found.raise_for_status()
        if found.json()["step_count"] >= target:
            return
        n += 1
        turn = await http.post(
            f"/v1/conversations/{conversation}/turns", json={"input": f"growing {n}: any update on my appointment?"}
        )
        turn.raise_for_status()


async def sample(http: httpx.AsyncClient, conversation: str, upstream: httpx.AsyncClient, n: int) -> Sample:
    started = time.perf_counter()
    turn = await http.post(
        f"/v1/conversations/{conversation}/turns", json={"input": f"sample {n}: any update on my appointment?"}
    )
    turn.raise_for_status()
    custody = (time.perf_counter() - started) * 1000
    [sent] = (await upstream.get("/_simulator/requests")).json()
    request: dict[str, Any] = sent["body"]
    if request.get("store") is not False or not isinstance(request.get("input"), list):
        # With provider storage the history stays with the provider and is not replayed.
        raise SystemExit("Custody did not send the whole history with store=false: nothing to measure here")
    body = json.dumps(request, ensure_ascii=False).encode()
    started = time.perf_counter()
    answer = await upstream.post(
        sent["path"], content=body, headers={"content-type": "application/json", "x-goog-api-key": "bench"}
    )
    answer.raise_for_status()
    post = (time.perf_counter() - started) * 1000
    return Sample(len(request["input"]) - 1, custody, post)


async def main_async(args: argparse.Namespace, services: list[tuple[Tree, str, str]], simulator: str) -> list[Side]:
    async with contextlib.AsyncExitStack() as stack:
        upstream = await stack.enter_async_context(httpx.AsyncClient(base_url=simulator, timeout=120))
        sides = []
        for tree, url, key in services:
            http = await stack.enter_async_context(
                httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
            )
            sides.append(Side(tree, http, points=[[] for _ in args.steps]))
        n = 0
        for side in sides:
            # Warm-up, not recorded: three turns, each posted again, on a conversation of their own.
            warm_up = await new_conversation(side.http)
            for _ in range(3):
                n += 1
                await sample(side.http, warm_up, upstream, n)
            side.conversations = [await new_conversation(side.http) for _ in args.steps]
        # Growing is not measured: every conversation grows at the same time.
        await asyncio.gather(
            *(
                grow(side.http, conversation, target)
                for side in sides
                for conversation, target in zip(side.conversations, args.steps, strict=True)
            )
        )
        points = list(range(len(args.steps)))
        for index in range(args.samples):
            # The points and the trees in turn, each first as often as the others, so that a
            # change in the machine's load meets them all alike.
            for point in points[index % len(points) :] + points[: index % len(points)]:
                for side in sides if (index + point) % 2 else reversed(sides):
                    n += 1
                    side.points[point].append(await sample(side.http, side.conversations[point], upstream, n))
        return sides


def slope(xs: list[float], ys: list[float]) -> float:
    """µs per stored step of a least-squares line through (stored steps, ms)."""
    return statistics.linear_regression(xs, ys).slope * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--steps", type=lambda s: [int(x) for x in s.split(",")], default=[10, 250, 500, 1000], help="stored steps"
    )
    parser.add_argument("--samples", type=int, default=20, help="timed turns per point and tree")
    parser.add_argument("--baseline", metavar="REV", help="also run a service started from this git revision")
    args = parser.parse_args()
    if len(args.steps) < 2 or args.steps != sorted(args.steps):
        parser.error("--steps needs two or more increasing numbers")
    with (
        simulator_process(latency_ms=0.0, request_log_limit=1) as (simulator, _),
        trees(args.baseline) as checkouts,
        contextlib.ExitStack() as stack,
    ):
        services = []
        for tree in checkouts:
            deployment = stack.enter_context(running_deployment(simulator, cwd=tree.path))
            services.append((tree, deployment.add_replica().url, deployment.key))
        sides = asyncio.run(main_async(args, services, simulator))

    print(f"\nreplay cost: turn latency by stored steps, ms ({args.samples} samples per point and tree)")
    header = ["stored steps, p50"]
    for side in sides:
        header += [f"{side.tree.label}: post p50", "turn p50", "added p50", "p90"]
    if len(sides) > 1:
        header.append("added ratio")
    rows = []
    for point in range(len(args.steps)):
        row = [f"{statistics.median(s.stored for s in sides[0].points[point]):.0f}"]
        added = []
        for side in sides:
            samples = side.points[point]
            added.append(statistics.median(s.added for s in samples))
            row += [
                f"{statistics.median(s.post for s in samples):.2f}",
                f"{statistics.median(s.custody for s in samples):.2f}",
                f"{added[-1]:.2f}",
                f"{percentile([s.added for s in samples], 0.9):.2f}",
            ]
        if len(sides) > 1:
            row.append(ratio(added[0], added[1]))
        rows.append(row)
    print_table(header, rows)

    print("\nslope, µs per stored step (least squares through the points' medians)")
    slopes = []
    for side in sides:
        xs = [statistics.median(s.stored for s in samples) for samples in side.points]
        slopes.append(
            {
                what: slope(xs, [statistics.median(getattr(s, what) for s in samples) for samples in side.points])
                for what in ("post", "custody", "added")
            }
        )
    names = {"post": "the post (the floor)", "custody": "the turn through Custody", "added": "added by Custody"}
    table = [[names[what], *(f"{s[what]:.1f}" for s in slopes)] for what in ("post", "custody", "added")]
    if len(sides) > 1:
        for row, what in zip(table, ("post", "custody", "added"), strict=True):
            row.append(ratio(slopes[0][what], slopes[1][what]))
    print_table(["", *(side.tree.label for side in sides), *(["ratio"] if len(sides) > 1 else [])], table)


if __name__ == "__main__":
    main()
