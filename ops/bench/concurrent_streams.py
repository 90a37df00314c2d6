"""Memory of one replica relaying 200 streamed turns at once, with readers fast, slow and gone.

Run: .venv/bin/python ops/bench/concurrent_streams.py [--streams 200] [--words 300] [--gap-ms 10]
         [--stall-seconds 5] [--cycles 3]

Starts `custody simulator` streaming every answer one event per --gap-ms (its `event_gap_ms`
fault: a model producing tokens), and one `custody serve` process as a deployment on a fresh
database of the local Postgres (ops/bench/turn_latency.py's machinery). Makes --streams
conversations, then runs rounds in which every conversation takes one turn at once, each on a
connection of its own, with an input of --words words (the simulated model echoes it, so the
answer is about as long: some --words / 3 text deltas):

- json: the turns answered as JSON (no streaming), for reference;
- fast: streamed, every client reading each event as it comes;
- slow: streamed, every client reading turn.started, then not reading at all for
  --stall-seconds (the service cannot send: its socket buffers fill), then the rest;
- gone: streamed, every client leaving after turn.started; the turns go on, and are stored.

The streamed rounds run --cycles times over (fast, slow, gone, fast, ...), so that memory that
grows from round to round would show.

After each round it waits until every turn of it is stored. Prints the replica's resident memory
(VmRSS of /proc/<pid>/status) at start, after making the conversations, its highest value sampled
during each round and after it, 35 s after the last round (an ended turn's events are kept 30 s),
and the peak (VmHWM); per round its length, the events and bytes
the clients read, and the errors. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
from side_by_side import Sampler, memory_kib, print_table
from turn_latency import Deployment, Replica, running_deployment, simulator_process


@dataclass
class RoundResult:
    name: str
    wall: float
    rss_peak: float
    rss_after: float
    events: int
    read_bytes: int
    errors: Counter[str]


def mib(pid: int, what: str = "VmRSS") -> float:
    return memory_kib(pid, what) / 1024


async def make_conversations(http: httpx.AsyncClient, count: int) -> list[str]:
    gate = asyncio.Semaphore(50)

    async def one() -> str:
        async with gate:
            created = await http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
            created.raise_for_status()
            return str(created.json()["id"])

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def run_round(
    replica: Replica, key: str, conversations: list[str], kind: str, number: int, args: argparse.Namespace
) -> RoundResult:
    words = " ".join(f"w{number}x{index}" for index in range(args.words))
    limits = httpx.Limits(max_connections=len(conversations), max_keepalive_connections=0)
    errors: Counter[str] = Counter()
    counts = {"events": 0, "bytes": 0}
    turn_ids: dict[str, str] = {}
    async with httpx.AsyncClient(
        base_url=replica.url, headers={"Authorization": f"Bearer {key}"}, timeout=600, limits=limits
    ) as http:

        async def turn(conversation: str) -> None:
            path = f"/v1/conversations/{conversation}/turns"
            body = {"input": f"round {number}: {words}"}
            try:
                if kind == "json":
                    response = await http.post(path, json=body)
                    if response.status_code != 200:
                        errors[str(response.status_code)] += 1
                    return
                async with http.stream("POST", path, json=body, headers={"Accept": "text/event-stream"}) as response:
                    if response.status_code != 200:
                        errors[str(response.status_code)] += 1
                        return
                    lines = response.aiter_lines()
                    async for line in lines:
                        counts["bytes"] += len(line) + 1
                        if line.startswith("data: "):
                            counts["events"] += 1
                            event = json.loads(line[6:])
                            if event["type"] == "turn.started":
                                turn_ids[conversation] = event["turn_id"]
                                if kind == "gone":
                                    return
                                if kind == "slow":
                                    await asyncio.sleep(args.stall_seconds)
                            elif event["type"] == "error":
                                errors[f"error {event['code']}"] += 1
            except httpx.HTTPError as exc:
                errors[type(exc).__name__] += 1

        pid = replica.process.pid
        with Sampler(gauges={"rss": lambda: mib(pid)}, interval=0.1) as sampler:
            await asyncio.gather(*(turn(c) for c in conversations))
            # Every turn of the round stored (a client that left did not stop its turn).
            for conversation, turn_id in turn_ids.items():
                while True:
                    view = await http.get(f"/v1/conversations/{conversation}/turns/{turn_id}")
                    if view.json().get("status") != "in_progress":
                        break
                    await asyncio.sleep(0.1)
    return RoundResult(kind, sampler.wall, sampler.peaks["rss"], mib(pid), counts["events"], counts["bytes"], errors)


async def main_async(args: argparse.Namespace, deployment: Deployment, replica: Replica) -> None:
    pid = replica.process.pid
    rss = {"at start": mib(pid)}
    async with httpx.AsyncClient(
        base_url=replica.url, headers={"Authorization": f"Bearer {deployment.key}"}, timeout=120
    ) as http:
        conversations = await make_conversations(http, args.streams)
    rss[f"after making {args.streams} conversations"] = mib(pid)
    results = []
    kinds = ["json", *(["fast", "slow", "gone"] * args.cycles)]
    for number, kind in enumerate(kinds, start=1):
        results.append(await run_round(replica, deployment.key, conversations, kind, number, args))
    # An ended turn's events stay in memory for 30 s, for clients that reconnect at once.
    await asyncio.sleep(35)
    rss["35 s after the last round"] = mib(pid)
    rss["peak (VmHWM)"] = mib(pid, "VmHWM")
    print(
        f"{args.streams} concurrent turns per round, inputs of {args.words} words, the model streaming one event "
        f"per {args.gap_ms} ms; slow readers stall {args.stall_seconds} s"
    )
    print_table(
        ["round", "wall s", "RSS peak MiB", "RSS after MiB", "events read", "KiB read", "errors"],
        [
            [
                f"{index} {r.name}",
                f"{r.wall:.1f}",
                f"{r.rss_peak:.1f}",
                f"{r.rss_after:.1f}",
                str(r.events),
                f"{r.read_bytes / 1024:.0f}",
                ", ".join(f"{k} x{v}" for k, v in r.errors.items()) or "0",
            ]
            for index, r in enumerate(results, start=1)
        ],
    )
    for moment, value in rss.items():
        print(f"RSS {moment}: {value:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--words", type=int, default=300, help="words in each input (the answer echoes them)")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="the simulated model's pause between events")
    parser.add_argument("--stall-seconds", type=float, default=5.0, help="how long a slow reader does not read")
    parser.add_argument("--cycles", type=int, default=3, help="rounds of fast, slow and gone readers")
    args = parser.parse_args()
    with simulator_process(request_log_limit=1) as (simulator, _):
        fault = {"event_gap_ms": args.gap_ms, "count": 10**9}
        httpx.post(f"{simulator}/_simulator/faults", json=fault).raise_for_status()
        # The default store wait would answer a JSON turn 503 when the database queue is long.
        with running_deployment(simulator, extra_env={"CUSTODY_TURN_STORE_WAIT_SECONDS": "300"}) as deployment:
            replica = deployment.add_replica()
            print(f"replica at {urlsplit(replica.url).netloc}, pid {replica.process.pid}")
            started = time.perf_counter()
            asyncio.run(main_async(args, deployment, replica))
            print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
