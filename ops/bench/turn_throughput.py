"""Turn throughput and CPU per turn, with 1 and 2 replicas, against the simulator at zero latency.

Run: .venv/bin/python ops/bench/turn_throughput.py [--seconds 15] [--warmup 3] [--clients 32]
         [--replicas 1,2] [--turns-per-conversation 10] [--baseline REV]

Starts `custody simulator` (no added latency) and a deployment on a fresh database of the local
Postgres (ops/bench/turn_latency.py's machinery); a replica is one `custody serve` process, and
the second one runs on the same database. 32 clients in this process, each one request at a
time, are spread over the replicas and post short text turns for the given time after a warm-up;
each client moves to a new conversation every 10 turns, so that the replayed history stays short
(0 to 36 steps) however long the run (the conversations are made before the timed window).

Prints, per replica count: turns/s, p50 and p99 of a turn as the client sees it, and the CPU
time per turn of the Custody processes (/proc/<pid>/stat), of the simulator, of the Postgres
backends serving the deployment's two databases (found by their process titles every 0.1 s; one
that ends within the window counts up to its last sample), and of this load generator; then where the
machine's cores went (CPU seconds per second of each, and what other processes on the machine
used meanwhile: on a shared machine turns/s moves with them, the CPU time per turn much less). Then
the ceiling: the same clients posting to the simulator directly, each time the body Custody sent
for the fifth turn of a conversation (its history is near the runs' average), with the requests
the simulator answers per second of its own CPU time (here the load generator's httpx costs more).

With --baseline REV the same runs go against a service started from REV (checked out in a
temporary git worktree), interleaved with the current tree's, on the same simulator; the ratio is
current / baseline. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
from side_by_side import PostgresBackends, Sampler, Tree, print_table, ratio, trees
from turn_latency import Deployment, Replica, percentile, running_deployment, simulator_process

TEXT = "turn {n}: any update on my appointment?"


@dataclass
class Loop:
    """What a closed loop did within its window: each request's latency in ms, and the failures."""

    latencies: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall: float = 0.0


async def closed_loop(clients: int, seconds: float, one: Callable[[int], Awaitable[float | str]]) -> Loop:
    """`clients` tasks, each calling `one(its index)` back to back until `seconds` have passed;
    `one` returns its request's latency in ms, or what went wrong (the status)."""
    loop = Loop()
    deadline = time.perf_counter() + seconds

    async def client(index: int) -> None:
        while time.perf_counter() < deadline:
            try:
                outcome = await one(index)
            except httpx.HTTPError as exc:
                outcome = type(exc).__name__
            if isinstance(outcome, str):
                loop.errors[outcome] += 1
            else:
                loop.latencies.append(outcome)

    started = time.perf_counter()
    await asyncio.gather(*(client(index) for index in range(clients)))
    loop.wall = time.perf_counter() - started
    return loop


@dataclass
class Client:
    http: httpx.AsyncClient
    conversation: str = ""
    turns_in_it: int = 0
    spares: list[str] = field(default_factory=list)
    made_in_window: int = 0


@dataclass
class Run:
    loop: Loop
    sampler: Sampler
    made_in_window: int


async def new_conversation(http: httpx.AsyncClient) -> str:
    created = await http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
    created.raise_for_status()
    return str(created.json()["id"])


async def custody_run(
    deployment: Deployment, replicas: list[Replica], simulator_pid: int, args: argparse.Namespace
) -> Run:
    headers = {"Authorization": f"Bearer {deployment.key}"}
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with contextlib.AsyncExitStack() as stack:
        https = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=replica.url, headers=headers, timeout=60, limits=limits)
            )
            for replica in replicas
        ]
        clients = [Client(https[index % len(https)]) for index in range(args.clients)]
        window = False

        async def turn(index: int) -> float | str:
            client = clients[index]
            if not client.conversation or client.turns_in_it >= args.turns_per_conversation:
                if client.spares:
                    client.conversation = client.spares.pop()
                else:
                    client.conversation = await new_conversation(client.http)
                    client.made_in_window += window
                client.turns_in_it = 0
            client.turns_in_it += 1
            started = time.perf_counter()
            response = await client.http.post(
                f"/v1/conversations/{client.conversation}/turns", json={"input": TEXT.format(n=client.turns_in_it)}
            )
            if response.status_code != 200:
                client.turns_in_it = args.turns_per_conversation  # start afresh on another conversation
                return str(response.status_code)
            return (time.perf_counter() - started) * 1000

        warm = await closed_loop(args.clients, args.warmup, turn)
        # Enough conversations made now for the window at 1.5 times the warm-up's pace, so that
        # the window measures turns, not conversations being created.
        expected = len(warm.latencies) / warm.wall * args.seconds * 1.5 / args.clients
        per_client = math.ceil(expected / args.turns_per_conversation) + 1

        async def make_spares(client: Client) -> None:
            client.spares = [await new_conversation(client.http) for _ in range(per_client)]

        await asyncio.gather(*(make_spares(client) for client in clients))
        window = True
        with Sampler(
            {
                "custody": lambda: [replica.process.pid for replica in replicas],
                "simulator": lambda: [simulator_pid],
                "postgres": PostgresBackends(deployment.databases).pids,
                "load generator": lambda: [os.getpid()],
            },
            # A backend whose connection the pool closes counts up to its last sample: sample often.
            interval=0.1,
        ) as sampler:
            loop = await closed_loop(args.clients, args.seconds, turn)
        return Run(loop, sampler, sum(client.made_in_window for client in clients))


async def fifth_turn_body(deployment: Deployment, simulator: str) -> bytes:
    """The body Custody sent upstream for the fifth turn of a new conversation (the simulator's
    request log keeps the last request)."""
    replica = deployment.replicas[0]
    async with httpx.AsyncClient(
        base_url=replica.url, headers={"Authorization": f"Bearer {deployment.key}"}, timeout=60
    ) as http:
        conversation = await new_conversation(http)
        for n in range(1, 6):
            turn = await http.post(f"/v1/conversations/{conversation}/turns", json={"input": TEXT.format(n=n)})
            turn.raise_for_status()
        [sent] = (await http.get(f"{simulator}/_simulator/requests")).json()
    return json.dumps(sent["body"], ensure_ascii=False).encode()


async def ceiling_run(simulator: str, simulator_pid: int, body: bytes, args: argparse.Namespace) -> Run:
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(
        base_url=simulator,
        headers={"content-type": "application/json", "x-goog-api-key": "bench"},
        timeout=60,
        limits=limits,
    ) as http:

        async def post(_: int) -> float | str:
            started = time.perf_counter()
            response = await http.post("/v1/interactions", content=body)
            return (time.perf_counter() - started) * 1000 if response.status_code == 200 else str(response.status_code)

        await closed_loop(args.clients, args.warmup, post)
        with Sampler({"simulator": lambda: [simulator_pid], "load generator": lambda: [os.getpid()]}) as sampler:
            loop = await closed_loop(args.clients, args.seconds, post)
        return Run(loop, sampler, 0)


def rows(run: Run, unit: str) -> dict[str, float]:
    """The figures of one run, by row name."""
    loop, sampler = run.loop, run.sampler
    done = max(1, len(loop.latencies))
    figures = {
        f"{unit}/s": len(loop.latencies) / loop.wall,
        f"{unit} p50, ms": statistics.median(loop.latencies) if loop.latencies else math.nan,
        f"{unit} p99, ms": percentile(loop.latencies, 0.99) if loop.latencies else math.nan,
        "errors": sum(loop.errors.values()),
    }
    for name, seconds in sampler.cpu.items():
        figures[f"CPU ms per {unit}: {name}"] = seconds * 1000 / done
    for name, seconds in sampler.cpu.items():
        figures[f"cores busy: {name}"] = seconds / sampler.wall
    figures["cores busy: other processes"] = (sampler.machine - sum(sampler.cpu.values())) / sampler.wall
    figures["cores busy: whole machine"] = sampler.machine / sampler.wall
    return figures


def cell(name: str, value: float) -> str:
    if name == "errors" or name.startswith("requests per"):
        return f"{value:.0f}"
    return f"{value:.2f}" if name.startswith(("cores", "CPU")) else f"{value:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0, help="length of each timed window")
    parser.add_argument("--warmup", type=float, default=3.0, help="untimed turns before each window")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--replicas", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    parser.add_argument("--turns-per-conversation", type=int, default=10)
    parser.add_argument("--baseline", metavar="REV", help="also run a service started from this git revision")
    args = parser.parse_args()
    runs: dict[tuple[int, str], Run] = {}
    with (
        simulator_process(latency_ms=0.0, request_log_limit=1) as (simulator, simulator_process_),
        trees(args.baseline) as checkouts,
        contextlib.ExitStack() as stack,
    ):
        deployments: list[tuple[Tree, Deployment]] = [
            (tree, stack.enter_context(running_deployment(simulator, cwd=tree.path))) for tree in checkouts
        ]
        for count in args.replicas:
            for tree, deployment in deployments:
                while len(deployment.replicas) < count:
                    deployment.add_replica()
                replicas = deployment.replicas[:count]
                runs[count, tree.label] = asyncio.run(custody_run(deployment, replicas, simulator_process_.pid, args))
        body = asyncio.run(fifth_turn_body(deployments[0][1], simulator))
        ceiling = asyncio.run(ceiling_run(simulator, simulator_process_.pid, body, args))

    print(
        f"\nturn throughput: {args.clients} clients, short text turns, a new conversation every "
        f"{args.turns_per_conversation} turns, simulator at 0 ms; {args.seconds:g} s per run after "
        f"{args.warmup:g} s of warm-up; {os.cpu_count()} cores"
    )
    labels = [tree.label for tree in checkouts]
    header = [""]
    for count in args.replicas:
        header += [f"{label} x{count}" for label in labels] + (["ratio"] if len(labels) > 1 else [])
    table: dict[str, list[str]] = {}
    for count in args.replicas:
        figures = [rows(runs[count, label], "turn") for label in labels]
        for name in figures[0]:
            table.setdefault(name, []).extend(cell(name, f[name]) for f in figures)
            if len(labels) > 1:
                table[name].append(ratio(figures[0][name], figures[1][name]))
    print_table(header, [[name, *cells] for name, cells in table.items()])
    failed = {
        f"{label} x{count}": dict(runs[count, label].loop.errors)
        for count in args.replicas
        for label in labels
        if runs[count, label].loop.errors
    }
    if failed:
        print(f"errors by status or exception: {failed}")
    made = {f"{label} x{count}": runs[count, label].made_in_window for count in args.replicas for label in labels}
    if any(made.values()):
        print(f"conversations made inside the window (counted in its CPU): {made}")
    steps = len(json.loads(body)["input"])
    print(f"\nceiling: the same {args.clients} clients posting to the simulator directly ({steps}-step input)")
    alone = rows(ceiling, "request")
    # What the simulator could answer on one core of its own: the load generator (httpx in this
    # process) and the machine's other processes share the two cores here.
    alone["requests per CPU second of the simulator"] = len(ceiling.loop.latencies) / ceiling.sampler.cpu["simulator"]
    print_table(["", "simulator"], [[name, cell(name, value)] for name, value in alone.items()])
    if ceiling.loop.errors:
        print(f"errors by status or exception: {dict(ceiling.loop.errors)}")


if __name__ == "__main__":
    main()
