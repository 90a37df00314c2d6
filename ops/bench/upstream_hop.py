"""The upstream hop alone: Upstream.create against a direct httpx post of the same body, and the old SDK path.

Run: .venv/bin/python ops/bench/upstream_hop.py [--samples 300] [--sizes 1,20,200]

Starts `custody simulator` in its own process (no added latency; pinned to CPU 0 where taskset
and a second CPU exist, this process on the others) and, for each history size N, sends a turn
whose input is N stored steps of about 1.2 KB each plus a new user input, store=false, with the
example policy's patient-intake settings (system instruction and a function tool). Interleaved
call by call (the order turning round each sample), it times:
  - post: the very body Upstream.create sends (built by its own `_request_body`), posted with
    httpx (one pooled client) and the reply parsed with json.loads: the floor of the hop;
  - sdk (before): what Upstream.create did before, the SDK's typed create with the history in
    `extra_body` (`with_raw_response`), and json.loads of the reply;
  - custody (now): Upstream.create with the steps as bytes (the body spliced together, sent
    through the SDK's request building and HTTP client, the reply split into step bytes).
The steps are encoded to bytes once per sample, outside the timings: the service stores them as
bytes and never encodes them on a turn. Prints median and p99 per call in ms; asserts nothing
about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from typing import Any

import httpx
from turn_latency import free_port, percentile, wait_ready

from service.config import EXAMPLE_POLICY, UpstreamSettings
from service.conversations import encode_json
from service.policy import load_policy
from service.upstream import Upstream, _request_body


def history(size: int) -> list[dict[str, Any]]:
    """`size` user inputs of about 1.2 KB of JSON each, every one different."""
    filler = "The patient reports intermittent headaches, worse in the morning, no fever. " * 15
    return [
        {"type": "user_input", "content": [{"type": "text", "text": f"turn {index}: {filler}"[:1150]}]}
        for index in range(size)
    ]


async def measure(base_url: str, size: int, samples: int) -> tuple[dict[str, list[float]], int]:
    settings = load_policy(EXAMPLE_POLICY).route("patient-intake").upstream_settings()
    upstream = Upstream(
        UpstreamSettings(api_key="bench", base_url=base_url, use_vertexai=False, project=None, location=None),
        attempts=1,
    )
    client = upstream._client  # the SDK client Upstream sends through, for the path it replaced
    times: dict[str, list[float]] = {"post": [], "sdk": [], "custody": []}
    body = b""
    async with httpx.AsyncClient(base_url=base_url, timeout=60) as http:

        async def post() -> None:
            answer = await http.post(
                "/v1/interactions",
                content=body,
                headers={"content-type": "application/json", "x-goog-api-key": "bench"},
            )
            answer.raise_for_status()
            json.loads(answer.content)

        async def sdk() -> None:
            raw = await client.aio.interactions.with_raw_response.create(
                **settings, store=False, extra_body={"input": steps}
            )
            json.loads(await raw.read())

        async def custody() -> None:
            await upstream.create(settings=settings, steps=encoded, store=False)

        calls = {"post": post, "sdk": sdk, "custody": custody}
        for sample in range(-20, samples):  # twenty warm-up rounds, not recorded
            steps = [*history(size), {"type": "user_input", "content": [{"type": "text", "text": f"sample {sample}"}]}]
            encoded = [encode_json(step) for step in steps]
            # The body Upstream.create sends for these steps, for the direct post.
            body = _request_body(settings, False, {}, b"[" + b",".join(encoded) + b"]")
            # The order turns round sample by sample, so that no path always follows the one
            # whose garbage the collector is still clearing.
            names = list(calls)
            names = names[sample % 3 :] + names[: sample % 3]
            for name in names:
                started = time.perf_counter()
                await calls[name]()
                if sample >= 0:
                    times[name].append((time.perf_counter() - started) * 1000)
    await upstream.aclose()
    return times, len(body)


async def main_async(args: argparse.Namespace, base_url: str) -> None:
    print(f"upstream hop, ms per call ({args.samples} calls per size; simulator in its own process, no added latency)")
    print(
        f"{'stored steps':>12} {'body KB':>8} | {'post p50':>8} {'p99':>6} | {'sdk p50':>7} {'p99':>6} | "
        f"{'custody p50':>11} {'p99':>6} | {'over post p50':>13}"
    )
    for size in args.sizes:
        times, body_bytes = await measure(base_url, size, args.samples)
        body_kb = body_bytes / 1024
        over = [c - p for c, p in zip(times["custody"], times["post"], strict=True)]
        print(
            f"{size:>12} {body_kb:>8.0f} | {statistics.median(times['post']):>8.2f} {percentile(times['post'], 0.99):>6.2f} | "
            f"{statistics.median(times['sdk']):>7.2f} {percentile(times['sdk'], 0.99):>6.2f} | "
            f"{statistics.median(times['custody']):>11.2f} {percentile(times['custody'], 0.99):>6.2f} | "
            f"{statistics.median(over):>13.2f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20, 200])
    args = parser.parse_args()
    port = free_port()
    command = [sys.executable, "-m", "service", "simulator", "--port", str(port), "--request-log-limit", "0"]
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        command = ["taskset", "-c", "0", *command]
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    try:
        base_url = f"http://127.0.0.1:{port}"
        wait_ready(f"{base_url}/_simulator/health", process)
        asyncio.run(main_async(args, base_url))
    finally:
        process.terminate()
        process.wait()


if __name__ == "__main__":
    main()
