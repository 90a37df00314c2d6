"""Simulator throughput: non-streaming creates with a 10-step input, simulator pinned to one core.

Run: .venv/bin/python ops/bench/simulator_throughput.py [--requests 3000] [--concurrency 16]

The simulator runs as `custody simulator` in its own process on CPU 0 (taskset); the load comes
from this process on the other CPU, as raw HTTP (httpx) and through the async google-genai SDK.
Prints requests/s; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from typing import Any

import httpx
from google import genai

MODEL = "gemini-3-flash-preview"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(port: int) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "service", "simulator", "--port", str(port), "--request-log-limit", "0"]
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        command = ["taskset", "-c", "0", *command]
        os.sched_setaffinity(0, set(range(1, os.cpu_count() or 2)))
    process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/_simulator/health").raise_for_status()
            return process
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("simulator did not start")


async def run_raw(base: str, body: bytes, total: int, concurrency: int) -> float:
    async with httpx.AsyncClient(
        base_url=base,
        headers={"x-goog-api-key": "k", "content-type": "application/json"},
        limits=httpx.Limits(max_connections=concurrency),
    ) as http:
        remaining = total

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                response = await http.post("/v1/interactions", content=body)
                response.raise_for_status()

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return total / (time.perf_counter() - start)


async def run_sdk(base: str, steps: list[dict[str, Any]], total: int, concurrency: int) -> float:
    client = genai.Client(api_key="k", http_options={"base_url": base, "retry_options": {"attempts": 1}})
    remaining = total

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await client.aio.interactions.create(model=MODEL, input=steps, store=False)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start(port)
    try:
        steps = build_history(base)
        body = json.dumps({"model": MODEL, "input": steps, "store": False}).encode()
        asyncio.run(run_raw(base, body, 200, args.concurrency))  # warm-up
        raw = asyncio.run(run_raw(base, body, args.requests, args.concurrency))
        sdk = asyncio.run(run_sdk(base, steps, args.requests // 3, args.concurrency))
    finally:
        process.terminate()
        process.wait()
    print("simulator throughput, 10-step input, non-streaming, simulator on one core:")
    print(f"  raw HTTP (httpx, {args.concurrency} concurrent): {raw:8.0f} requests/s")
    print(f"  google-genai async SDK ({args.concurrency} concurrent): {sdk:8.0f} requests/s")


def build_history(base: str) -> list[dict[str, Any]]:
    """Ten replayable steps: two user inputs and the model's three-step reply, another input and
    reply, and the new user input."""

    def user(text: str) -> dict[str, Any]:
        return {"type": "user_input", "content": [{"type": "text", "text": text}]}

    history: list[dict[str, Any]] = [user("hello"), user("I have a question about my bill")]
    with httpx.Client(base_url=base, headers={"x-goog-api-key": "k"}) as http:
        for follow_up in ("why was I charged twice?", "what did I say first?"):
            reply = http.post("/v1/interactions", json={"model": MODEL, "input": history, "store": False})
            reply.raise_for_status()
            history.extend(reply.json()["steps"])
            history.append(user(follow_up))
    del history[-1]
    history.append(user("what did I say first?"))
    if len(history) != 10:
        raise SystemExit(f"the replayed history has {len(history)} steps, not 10: the benchmark would measure another load")
    return history


if __name__ == "__main__":
    main()
