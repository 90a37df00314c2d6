"""1,000 concurrent conversations against one replica, the model answering after 500 ms.

Run: .venv/bin/python ops/bench/concurrent_conversations.py [--conversations 1000] [--rounds 2]
         [--latency-ms 500] [--env NAME=VALUE ...] [--baseline REV]

Starts `custody simulator` answering every request after --latency-ms, and one `custody serve`
process as a deployment on a fresh database of the local Postgres (ops/bench/turn_latency.py's
machinery). Makes the conversations, then runs rounds: in each, every conversation's own client
task posts one short text turn, all at once (one httpx connection each), and the round ends when
the last answer is in. Prints the replica's resident memory (VmRSS of /proc/<pid>/status) at
start, after making the conversations, after each round and at the end (2 s after the last
round), and its peak (VmHWM); per round its length, p50 and p99 of a turn, the replica's CPU time
(/proc/<pid>/stat: a replica is one process, so 1.00 core means it is CPU-bound) and the errors
(by status and problem type, or exception); and the most connections the replica held at once to
the model and to Postgres.

The service's own limits meet this load before the model does. When this was written only one of
them was a setting: CUSTODY_TURN_STORE_WAIT_SECONDS, how long a caller waits for the reply to be
stored before a 503 (10 s by default); here the wait is the queue for the database, so the run
sets it to 300 s (--env CUSTODY_TURN_STORE_WAIT_SECONDS=10 restores the default).
The others are fixed: uvicorn's listen backlog is its default (2048: the 1,000 connections fit);
the database pool is SQLAlchemy's default (5 connections and 10 more on demand, a request waiting
up to 30 s for one, then 503 database-unavailable); the lease of a turn lapses after 10 s unless
renewed (a renewal waits for the same pool; a lost lease is 409 turn-in-progress); the
google-genai SDK's HTTP pool to the model holds 100 connections (so at most 100 turns wait on the
model at once, 200 turns/s at 500 ms). The peaks printed show which ones the run reached; a
setting added later can be given with --env (printed with the results, for both trees). The
failed-authentication limits do not apply (every key is valid). The client's open-files limit is
raised to its hard limit, and the replica's inherited one printed.

With --baseline REV the same rounds go against a service started from REV (checked out in a
temporary git worktree), round by round in turn with the current tree's, on the same simulator;
the ratio is current / baseline. Asserts nothing about speed.

A round is 1,000 turns, so it lasts as long as the replica needs for them: when this was written
about 80 s (some 12 turns/s), the whole run about 3.5 minutes per tree; --conversations 300 gives
a quicker look.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from side_by_side import Sampler, Tree, connections, memory_kib, open_files_limit, print_table, ratio, trees
from turn_latency import ADMIN_URL, Deployment, Replica, percentile, running_deployment, simulator_process

POSTGRES_PORT = urlsplit(ADMIN_URL).port or 5432


@dataclass
class Side:
    """One tree's service under load and what was seen of it."""

    tree: Tree
    deployment: Deployment
    replica: Replica
    conversations: list[str] = field(default_factory=list)
    rss: dict[str, float] = field(default_factory=dict)  # MiB, by moment
    rounds: list[Round] = field(default_factory=list)
    making: float = 0.0  # seconds it took to make the conversations


@dataclass
class Round:
    wall: float
    latencies: list[float]
    errors: Counter[str]
    peaks: dict[str, float]
    cpu: float  # the replica's CPU seconds in the round


def mib(pid: int, what: str = "VmRSS") -> float:
    return memory_kib(pid, what) / 1024


async def make_conversations(side: Side, count: int) -> float:
    """`count` conversations, 100 being made at a time; returns the seconds it took."""
    gate = asyncio.Semaphore(100)
    async with httpx.AsyncClient(
        base_url=side.replica.url, headers={"Authorization": f"Bearer {side.deployment.key}"}, timeout=120
    ) as http:

        async def one() -> str:
            async with gate:
                created = await http.post(
                    "/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]}
                )
                created.raise_for_status()
                return str(created.json()["id"])

        started = time.perf_counter()
        side.conversations = list(await asyncio.gather(*(one() for _ in range(count))))
    return time.perf_counter() - started


def problem(response: httpx.Response) -> str:
    """A failed turn by its status and the problem's type (and code), e.g. `503 database-unavailable`."""
    try:
        body = response.json()
        kind = str(body.get("type", "")).rsplit(":", 1)[-1]
        code = body.get("code")
    except (ValueError, AttributeError):
        kind, code = "", None
    return " ".join(str(part) for part in (response.status_code, kind, code) if part)


async def run_round(side: Side, number: int, simulator_port: int, args: argparse.Namespace) -> Round:
    """Every conversation posts one turn at once, each on a connection of its own, opened for the
    round (as clients arriving; a connection kept from the round before could meet the server's
    keep-alive timeout and fail on the client's side)."""
    limits = httpx.Limits(max_connections=args.conversations, max_keepalive_connections=args.conversations)
    async with httpx.AsyncClient(
        base_url=side.replica.url,
        headers={"Authorization": f"Bearer {side.deployment.key}"},
        timeout=args.timeout,
        limits=limits,
    ) as http:

        async def turn(conversation: str) -> float | str:
            started = time.perf_counter()
            try:
                response = await http.post(
                    f"/v1/conversations/{conversation}/turns",
                    json={"input": f"round {number}: any update on my appointment?"},
                )
            except httpx.HTTPError as exc:
                return type(exc).__name__
            return (time.perf_counter() - started) * 1000 if response.status_code == 200 else problem(response)

        pid = side.replica.process.pid
        with Sampler(
            {"replica": lambda: [pid]},
            gauges={
                "connections to the model": lambda: connections(pid, simulator_port),
                "connections to Postgres": lambda: connections(pid, POSTGRES_PORT),
            },
            interval=0.25,
        ) as sampler:
            outcomes = await asyncio.gather(*(turn(conversation) for conversation in side.conversations))
    return Round(
        sampler.wall,
        [o for o in outcomes if isinstance(o, float)],
        Counter(o for o in outcomes if isinstance(o, str)),
        sampler.peaks,
        sampler.cpu["replica"],
    )


async def main_async(
    args: argparse.Namespace, checkouts: list[tuple[Tree, Deployment, Replica]], simulator_port: int
) -> list[Side]:
    sides = [Side(tree, deployment, replica) for tree, deployment, replica in checkouts]
    for side in sides:
        side.rss["at start"] = mib(side.replica.process.pid)
    for side in sides:
        side.making = await make_conversations(side, args.conversations)
        side.rss[f"after making {args.conversations} conversations"] = mib(side.replica.process.pid)
    for number in range(1, args.rounds + 1):
        # Round by round in turn, so that both trees meet the same state of the machine.
        for side in sides if number % 2 else reversed(sides):
            side.rounds.append(await run_round(side, number, simulator_port, args))
            side.rss[f"after round {number}"] = mib(side.replica.process.pid)
    await asyncio.sleep(2)
    for side in sides:
        side.rss["peak (VmHWM)"] = mib(side.replica.process.pid, "VmHWM")
        side.rss["at end (2 s after the last round)"] = mib(side.replica.process.pid)
    return sides


def errors(counter: Counter[str]) -> str:
    return ", ".join(f"{what} x{count}" for what, count in counter.most_common()) or "0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--latency-ms", type=float, default=500.0, help="the simulator's delay before each answer")
    parser.add_argument("--timeout", type=float, default=600.0, help="the client's timeout for one turn, s")
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="a setting for the services (repeatable)"
    )
    parser.add_argument("--baseline", metavar="REV", help="also run a service started from this git revision")
    args = parser.parse_args()
    # A turn whose reply waits longer than CUSTODY_TURN_STORE_WAIT_SECONDS (10 s by default) to be
    # stored is answered 503 (its reply is stored later): under this load the wait is the queue for
    # the database, and the default would turn most turns into errors rather than latency. 300 s is
    # the most it may be without raising CUSTODY_TURN_STORE_RETRY_SECONDS too.
    extra_env = {"CUSTODY_TURN_STORE_WAIT_SECONDS": "300"} | dict(item.split("=", 1) for item in args.env)
    # One socket per conversation here, and as many in the replica: raise the soft limit on open
    # files (inherited by the services) as far as the hard limit allows.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with (
        simulator_process(latency_ms=args.latency_ms, request_log_limit=0) as (simulator, _),
        trees(args.baseline) as checkouts,
        contextlib.ExitStack() as stack,
    ):
        started = []
        for tree in checkouts:
            deployment = stack.enter_context(running_deployment(simulator, extra_env=extra_env, cwd=tree.path))
            started.append((tree, deployment, deployment.add_replica()))
        sides = asyncio.run(main_async(args, started, urlsplit(simulator).port or 80))
        files = {side.tree.label: open_files_limit(side.replica.process.pid) for side in sides}

    print(
        f"\n{args.conversations} concurrent conversations against one replica, the simulator answering after "
        f"{args.latency_ms:g} ms; {args.rounds} rounds of one turn per conversation, all at once"
    )
    print(f"settings given to the services: {extra_env}; open files limit: {files}")
    labels = [side.tree.label for side in sides]
    header = ["", *labels, *(["ratio"] if len(sides) > 1 else [])]

    def row(name: str, values: list[float], digits: int = 0) -> list[str]:
        cells = [f"{value:.{digits}f}" for value in values]
        return [name, *cells, *([ratio(values[0], values[1])] if len(values) > 1 else [])]

    rows = [row(f"RSS {moment}, MiB", [side.rss[moment] for side in sides]) for moment in sides[0].rss]
    rows.append(row(f"making {args.conversations} conversations, s", [side.making for side in sides], 1))
    for index in range(args.rounds):
        rounds = [side.rounds[index] for side in sides]
        rows.append(row(f"round {index + 1}: length, s", [r.wall for r in rounds], 1))
        rows.append(row(f"round {index + 1}: turn p50, ms", [statistics.median(r.latencies or [0]) for r in rounds]))
        rows.append(row(f"round {index + 1}: turn p99, ms", [percentile(r.latencies or [0], 0.99) for r in rounds]))
        rows.append(row(f"round {index + 1}: replica CPU, cores", [r.cpu / r.wall for r in rounds], 2))
        per_turn = [r.cpu * 1000 / args.conversations for r in rounds]
        rows.append(row(f"round {index + 1}: replica CPU per turn posted, ms", per_turn, 1))
        rows.append(
            [f"round {index + 1}: errors", *(errors(r.errors) for r in rounds), *([""] if len(sides) > 1 else [])]
        )
    every = [[latency for r in side.rounds for latency in r.latencies] for side in sides]
    rows.append(row("all rounds: turn p50, ms", [statistics.median(e or [0]) for e in every]))
    rows.append(row("all rounds: turn p99, ms", [percentile(e or [0], 0.99) for e in every]))
    rows.append(
        row(
            "all rounds: turns/s",
            [len(e) / sum(r.wall for r in s.rounds) for e, s in zip(every, sides, strict=True)],
            1,
        )
    )
    for gauge in sides[0].rounds[0].peaks:
        rows.append(row(f"most {gauge} at once", [max(r.peaks[gauge] for r in side.rounds) for side in sides]))
    print_table(header, rows)


if __name__ == "__main__":
    main()
