"""Time to first event, and latency added per event, of a streamed turn through Custody against
streaming the same request directly from the simulator.

Run: .venv/bin/python ops/bench/stream_latency.py [--samples 40] [--words 60] [--gap-ms 5]

Starts `custody simulator` streaming every answer one event per --gap-ms (its `event_gap_ms`
fault), and one `custody serve` process as a deployment on a fresh database of the local Postgres
(ops/bench/turn_latency.py's machinery). For each sample, interleaved, on a new conversation (one
input step, so Custody sends the same body a direct client would, but for the route's settings):

- direct: POST the simulator's create with `"stream": true, "store": false` and the same input,
  reading the SSE with httpx; the time each model event (step.start, step.delta, step.stop)
  arrives, from the request's start;
- custody: POST /v1/conversations/{id}/turns with `Accept: text/event-stream`; the time turn.started
  arrives (the first event: Custody sends it once the turn is claimed, before calling the model),
  and the time each relayed model event arrives.

Prints median, p90 and p99 over the samples of: the time to the first event (Custody's
turn.started; the direct stream's interaction.created), to the first model event and to the last;
and, per model event, what Custody adds: its arrival through Custody minus the same event's arrival
directly (event i of the sample against event i of the direct sample next to it); and how that
grows from the first model event to the last (the per-event cost of the relay, without the turn's
fixed costs). Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import httpx
from turn_latency import percentile, running_deployment, simulator_process

MODEL_EVENTS = ("step.start", "step.delta", "step.stop")


async def timed_events(response: httpx.Response, started: float, kind_of: str) -> list[tuple[str, float]]:
    """(event type, ms since `started`) of each event as it arrives."""
    arrivals: list[tuple[str, float]] = []
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event: dict[str, Any] = json.loads(line[6:])
            arrivals.append((str(event[kind_of]), (time.perf_counter() - started) * 1000))
    return arrivals


async def direct(http: httpx.AsyncClient, text: str) -> list[tuple[str, float]]:
    body = {
        "model": "gemini-3-flash-preview",
        "store": False,
        "stream": True,
        "input": [{"type": "user_input", "content": [{"type": "text", "text": text}]}],
    }
    started = time.perf_counter()
    async with http.stream(
        "POST", "/v1beta/interactions", json=body, headers={"x-goog-api-key": "bench", "accept": "text/event-stream"}
    ) as response:
        response.raise_for_status()
        return await timed_events(response, started, "event_type")


async def through_custody(http: httpx.AsyncClient, text: str) -> list[tuple[str, float]]:
    created = await http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
    conversation = created.json()["id"]
    started = time.perf_counter()
    async with http.stream(
        "POST",
        f"/v1/conversations/{conversation}/turns",
        json={"input": text},
        headers={"Accept": "text/event-stream"},
    ) as response:
        response.raise_for_status()
        return await timed_events(response, started, "type")


def model_times(arrivals: list[tuple[str, float]]) -> list[float]:
    return [at for kind, at in arrivals if kind in MODEL_EVENTS]


async def main_async(args: argparse.Namespace, custody: str, key: str, simulator: str) -> None:
    rows: dict[str, list[float]] = {
        name: []
        for name in (
            "direct: first event",
            "custody: first event (turn.started)",
            "direct: first model event",
            "custody: first model event",
            "direct: last model event",
            "custody: last model event",
        )
    }
    added: list[float] = []
    growth: list[float] = []
    words = " ".join(f"word{index}" for index in range(args.words))
    async with (
        httpx.AsyncClient(base_url=custody, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http,
        httpx.AsyncClient(base_url=simulator, timeout=60) as upstream,
    ):
        events = 0
        for sample in range(-3, args.samples):  # three warm-up rounds, not recorded
            text = f"sample {sample}: {words}"
            plain = await direct(upstream, text)
            relayed = await through_custody(http, text)
            plain_model, relayed_model = model_times(plain), model_times(relayed)
            if len(plain_model) != len(relayed_model):
                raise SystemExit(f"the streams differ: {len(plain_model)} model events direct, {len(relayed_model)}")
            if sample < 0:
                continue
            events = len(plain_model)
            rows["direct: first event"].append(plain[0][1])
            rows["custody: first event (turn.started)"].append(relayed[0][1])
            rows["direct: first model event"].append(plain_model[0])
            rows["custody: first model event"].append(relayed_model[0])
            rows["direct: last model event"].append(plain_model[-1])
            rows["custody: last model event"].append(relayed_model[-1])
            differences = [r - p for r, p in zip(relayed_model, plain_model, strict=True)]
            added.extend(differences)
            growth.append((differences[-1] - differences[0]) / max(1, len(differences) - 1))
    print(
        f"streamed turn latency, ms ({args.samples} samples, {events} model events each, the model streaming one "
        f"event per {args.gap_ms} ms; Custody and simulator in separate processes)"
    )
    print(f"{'':>40} | {'p50':>8} {'p90':>8} {'p99':>8}")

    def line(name: str, values: list[float]) -> None:
        print(
            f"{name:>40} | {statistics.median(values):>8.2f} "
            f"{percentile(values, 0.9):>8.2f} {percentile(values, 0.99):>8.2f}"
        )

    for name, values in rows.items():
        line(name, values)
    line("added per model event (custody - direct)", added)
    line("growth of that per event, first to last", growth)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--words", type=int, default=60, help="words in each input (the answer echoes them)")
    parser.add_argument("--gap-ms", type=float, default=5.0, help="the simulated model's pause between events")
    args = parser.parse_args()
    with simulator_process(request_log_limit=1) as (simulator, _):
        fault = {"event_gap_ms": args.gap_ms, "count": 10**9}
        httpx.post(f"{simulator}/_simulator/faults", json=fault).raise_for_status()
        with running_deployment(simulator) as deployment:
            replica = deployment.add_replica()
            asyncio.run(main_async(args, replica.url, deployment.key, simulator))


if __name__ == "__main__":
    main()
