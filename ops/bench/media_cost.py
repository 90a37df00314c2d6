"""What a turn with a 5 MiB image costs, against a text turn and a direct post of the same body.

Run: .venv/bin/python ops/bench/media_cost.py [--samples 10] [--mib 5]

Starts `custody simulator` and `custody serve` as separate processes (see ops/bench/turn_latency.py:
a deployment on a fresh database of the local Postgres), the service with CUSTODY_MAX_BODY_BYTES
raised to fit the image, then measures, interleaved sample by sample, each on a new conversation of
the example's patient-intake route (which takes image/jpeg up to 5 MiB):
  - text: a first turn with a line of text;
  - image: a first turn with the same text and a JPEG-typed block of `--mib` MiB of random bytes
    (base64, as the API carries it: 4/3 as large on the wire, each way);
  - replay: a second, text-only turn of that conversation, which sends the stored image upstream
    again (every later turn of the conversation does);
and for each, `post`: the very body Custody sent upstream (read back from the simulator's request
log) posted again with httpx to the same simulator: the floor of the upstream hop. Prints median
and p90 of each and of what Custody adds (custody - post, sample by sample), and the service
process's peak RSS (VmHWM) after the text turns and after the media turns. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
from turn_latency import percentile, running_deployment, running_simulator

TEXT = "a photo of the rash on my arm, since Monday"


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set size (VmHWM), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def timed_turn(
    http: httpx.AsyncClient, upstream: httpx.AsyncClient, conversation: str, data: Any
) -> tuple[float, float]:
    """(through Custody, the same upstream body posted directly), ms."""
    started = time.perf_counter()
    answer = await http.post(f"/v1/conversations/{conversation}/turns", json={"input": data})
    custody = (time.perf_counter() - started) * 1000
    answer.raise_for_status()
    [sent] = (await upstream.get("/_simulator/requests")).json()
    body = json.dumps(sent["body"], ensure_ascii=False).encode()
    started = time.perf_counter()
    direct = await upstream.post(
        sent["path"], content=body, headers={"content-type": "application/json", "x-goog-api-key": "bench"}
    )
    post = (time.perf_counter() - started) * 1000
    direct.raise_for_status()
    return custody, post


async def measure(custody: str, key: str, simulator: str, pid: int, samples: int, size: int) -> None:
    times: dict[str, dict[str, list[float]]] = {k: {"custody": [], "post": []} for k in ("text", "image", "replay")}
    peaks: dict[str, float] = {}
    async with (
        httpx.AsyncClient(base_url=custody, headers={"Authorization": f"Bearer {key}"}, timeout=120) as http,
        httpx.AsyncClient(base_url=simulator, timeout=120) as upstream,
    ):

        async def conversation() -> str:
            created = await http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
            created.raise_for_status()
            return str(created.json()["id"])

        for sample in range(-2, samples):  # two warm-up rounds of text, not recorded
            results = await timed_turn(http, upstream, await conversation(), TEXT)
            if sample >= 0:
                times["text"]["custody"].append(results[0])
                times["text"]["post"].append(results[1])
        peaks["after text turns"] = peak_rss_mib(pid)
        for sample in range(-1, samples):
            image = base64.b64encode(os.urandom(size)).decode()
            blocks = [{"type": "text", "text": TEXT}, {"type": "image", "data": image, "mime_type": "image/jpeg"}]
            chat = await conversation()
            first = await timed_turn(http, upstream, chat, blocks)
            second = await timed_turn(http, upstream, chat, "and it itches at night")
            if sample >= 0:
                for kind, (through, post) in (("image", first), ("replay", second)):
                    times[kind]["custody"].append(through)
                    times[kind]["post"].append(post)
        peaks["after media turns"] = peak_rss_mib(pid)

    print(f"media cost, ms ({samples} samples; image {size} bytes, {len(image)} as base64; separate processes)")
    print(f"{'turn':>7} | {'post p50':>8} {'p90':>7} | {'custody p50':>11} {'p90':>7} | {'added p50':>9} {'p90':>7}")
    for kind, got in times.items():
        added = [c - p for c, p in zip(got["custody"], got["post"], strict=True)]
        print(
            f"{kind:>7} | {statistics.median(got['post']):>8.1f} {percentile(got['post'], 0.9):>7.1f} | "
            f"{statistics.median(got['custody']):>11.1f} {percentile(got['custody'], 0.9):>7.1f} | "
            f"{statistics.median(added):>9.1f} {percentile(added, 0.9):>7.1f}"
        )
    print("custody serve peak RSS (VmHWM): " + ", ".join(f"{k} {v:.0f} MiB" for k, v in peaks.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--mib", type=float, default=5.0)
    args = parser.parse_args()
    size = int(args.mib * 1024 * 1024)
    body_limit = str(-(-size // 3) * 4 + 1_000_000)
    with (
        running_simulator() as simulator,
        running_deployment(simulator, extra_env={"CUSTODY_MAX_BODY_BYTES": body_limit}) as deployment,
    ):
        replica = deployment.add_replica()
        asyncio.run(measure(replica.url, deployment.key, simulator, replica.process.pid, args.samples, size))


if __name__ == "__main__":
    main()
