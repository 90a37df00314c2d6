"""Latency Custody adds to a turn, against a direct post of the very same request body to the same simulator.

Run: .venv/bin/python ops/bench/turn_latency.py [--samples 40] [--sizes 1,20,200]

Starts `custody simulator` and `custody serve` as separate processes (the service as a deployment
on a fresh database of the local Postgres, the server of BENCH_ADMIN_URL, with secrets from
`custody secrets init`; ops/bench/keyrings.py reuses this to run it on another keyring),
then for each history size N: builds a conversation with N stored turns through Custody, and
measures, interleaved sample by sample,
  - custody: POST /v1/conversations/{id}/turns with a new input (auth, claim, decrypt N turns,
    the SDK call, encrypt and store, respond);
  - post (the floor of the upstream hop): the request body Custody sent upstream for that very
    turn (read back from the simulator's request log, which keeps the last request), posted again
    with httpx, with the same API key header, to the same simulator;
  - sdk: `client.aio.interactions.with_raw_response.create(input=<the same history and input>,
    store=False)`, what a backend would do with the SDK's typed path (its own validation costs
    more than a post: shown for reference).
Prints median, p90 and p99 of each, and of what Custody adds over the post (custody - post,
sample by sample). Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from google import genai

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if process.poll() is not None:
            raise SystemExit(f"{url} exited early")
        try:
            httpx.get(url).raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise SystemExit(f"{url} did not become ready")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def measure(
    custody: str, headers: dict[str, str], sdk: genai.Client, size: int, samples: int, simulator: str | None = None
) -> dict[str, list[float]]:
    """Timings, ms: `custody` and `direct` (the SDK call) per sample, and `post` (the same body
    Custody sent, posted again) when `simulator` is given."""
    async with (
        httpx.AsyncClient(base_url=custody, headers=headers, timeout=60) as http,
        httpx.AsyncClient(base_url=simulator or "http://unused", timeout=60) as upstream,
    ):
        created = await http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
        conversation = created.json()["id"]
        for index in range(size):
            (
                await http.post(
                    f"/v1/conversations/{conversation}/turns",
                    json={"input": f"setup turn {index}: the patient reports mild symptoms"},
                )
            ).raise_for_status()
        times: dict[str, list[float]] = {"direct": [], "custody": [], "post": []}
        for sample in range(-3, samples):  # three warm-up rounds, not recorded
            history: list[Any] = []
            cursor: int | None = 0
            while cursor is not None:
                page = (
                    await http.get(f"/v1/conversations/{conversation}/steps", params={"cursor": cursor, "limit": 500})
                ).json()
                history.extend(s["step"] for s in page["steps"])
                cursor = page["next_cursor"]
            text = f"sample {sample}: any update on my appointment?"
            steps = [*history, {"type": "user_input", "content": [{"type": "text", "text": text}]}]
            started = time.perf_counter()
            raw = await sdk.aio.interactions.with_raw_response.create(
                model="gemini-3-flash-preview", store=False, extra_body={"input": steps}
            )
            await raw.read()
            direct = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            (await http.post(f"/v1/conversations/{conversation}/turns", json={"input": text})).raise_for_status()
            through_custody = (time.perf_counter() - started) * 1000
            post = None
            if simulator is not None:
                # The body of the turn Custody just sent upstream, posted again as it was.
                [sent] = (await upstream.get("/_simulator/requests")).json()
                body = json.dumps(sent["body"], ensure_ascii=False).encode()
                started = time.perf_counter()
                answer = await upstream.post(
                    sent["path"],
                    content=body,
                    headers={"content-type": "application/json", "x-goog-api-key": "bench"},
                )
                answer.raise_for_status()
                post = (time.perf_counter() - started) * 1000
            if sample >= 0:
                times["direct"].append(direct)
                times["custody"].append(through_custody)
                if post is not None:
                    times["post"].append(post)
        return times


async def main_async(args: argparse.Namespace, custody: str, simulator: str, key: str) -> None:
    sdk = genai.Client(api_key="bench", http_options={"base_url": simulator, "retry_options": {"attempts": 1}})
    print(f"turn latency, ms ({args.samples} samples per size; Custody and simulator in separate processes)")
    print(
        f"{'stored turns':>12} | {'post p50':>8} {'p90':>6} {'p99':>6} | {'sdk p50':>7} {'p99':>6} | "
        f"{'custody p50':>11} {'p90':>6} {'p99':>6} | {'added p50':>9} {'p90':>6} {'p99':>6}"
    )
    for size in args.sizes:
        times = await measure(custody, {"Authorization": f"Bearer {key}"}, sdk, size, args.samples, simulator)
        added = [c - p for c, p in zip(times["custody"], times["post"], strict=True)]

        def cols(values: list[float], *quantiles: float) -> str:
            return " ".join(f"{percentile(values, q):>6.2f}" for q in quantiles)

        print(
            f"{size:>12} | {statistics.median(times['post']):>8.2f} {cols(times['post'], 0.9, 0.99)} | "
            f"{statistics.median(times['direct']):>7.2f} {cols(times['direct'], 0.99)} | "
            f"{statistics.median(times['custody']):>11.2f} {cols(times['custody'], 0.9, 0.99)} | "
            f"{statistics.median(added):>9.2f} {cols(added, 0.9, 0.99)}"
        )
        if args.slowest:
            worst = sorted(range(len(added)), key=added.__getitem__, reverse=True)[: args.slowest]
            print(
                "             slowest added (sample: custody/post ms): "
                + ", ".join(f"#{i}: {times['custody'][i]:.0f}/{times['post'][i]:.0f}" for i in worst)
            )


# The checkout this script belongs to: the services start from here unless told otherwise, so
# that its `service` package is the one imported (`python -m` puts the working directory first).
REPO = Path(__file__).resolve().parents[2]


@contextmanager
def simulator_process(
    latency_ms: float = 0.0, request_log_limit: int = 1
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`custody simulator` of this checkout in its own process, answering after `latency_ms`;
    yields its base URL and the process (the throughput benchmark reads its CPU time)."""
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "service", "simulator", "--port", str(port)),
            *("--latency-ms", str(latency_ms), "--request-log-limit", str(request_log_limit)),
        ],
        cwd=REPO,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(f"{url}/_simulator/health", process)
        yield url, process
    finally:
        process.terminate()
        process.wait()


@contextmanager
def running_simulator(latency_ms: float = 0.0) -> Iterator[str]:
    """`custody simulator` in its own process; yields its base URL. Its log keeps the last
    request: the turn latency reads back the body Custody sent."""
    with simulator_process(latency_ms, request_log_limit=1) as (url, _):
        yield url


@dataclass
class Replica:
    url: str
    process: subprocess.Popen[bytes]


@dataclass
class Deployment:
    """A database (and its key store) with a tenant and a backend key, and the `custody serve`
    processes started on it, all from the checkout `cwd`."""

    env: dict[str, str]
    key: str
    cwd: Path
    databases: tuple[str, str]
    replicas: list[Replica] = field(default_factory=list)

    def add_replica(self) -> Replica:
        """Another `custody serve` process on the same database, on a port of its own, once ready.
        Its logs are discarded."""
        env = self.env | {"CUSTODY_PORT": str(free_port())}
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env=env,
            cwd=self.cwd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        replica = Replica(f"http://127.0.0.1:{env['CUSTODY_PORT']}", process)
        self.replicas.append(replica)
        wait_ready(f"{replica.url}/readyz", process)
        return replica


def _cli(command: list[str], env: dict[str, str], cwd: Path) -> str:
    """`custody <command>`'s output; its own message if it fails (a setting it refuses, say)."""
    done = subprocess.run([sys.executable, "-m", "service", *command], env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"custody {' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
    return done.stdout.strip()


@contextmanager
def running_deployment(
    simulator: str,
    keyring_env: dict[str, str] | None = None,
    extra_env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> Iterator[Deployment]:
    """A deployment on a fresh database of the local Postgres, with secrets made by `custody
    secrets init` (`keyring_env` replaces its keyring file, e.g. with the CUSTODY_PKCS11_*
    settings; `extra_env` adds settings), calling `simulator`, every command run from the
    checkout `cwd`; no replica runs until `add_replica`. Stops them all and drops the databases."""
    database = f"custody_bench_{secrets.token_hex(4)}"
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + database

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(ADMIN_URL)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{database}"'))
    asyncio.run(admin(f'CREATE DATABASE "{database}_keys"'))
    try:
        with tempfile.TemporaryDirectory() as scratch:
            made = subprocess.run(
                [sys.executable, "-m", "service", "secrets", "init", f"{scratch}/secrets"],
                cwd=cwd,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            env = os.environ | dict(line.split("=", 1) for line in made.split())
            if keyring_env is not None:
                env = {k: v for k, v in env.items() if k != "CUSTODY_KEYRING"} | keyring_env
            env |= {
                "DATABASE_URL": url,
                "CUSTODY_KEY_STORE_URL": f"{url}_keys",
                "CUSTODY_DATA_DIR": scratch,
                "GEMINI_API_KEY": "bench",
                "GOOGLE_GEMINI_BASE_URL": simulator,
            }
            env |= extra_env or {}
            for command in (["migrate"], ["tenants", "create", "bench"]):
                _cli(command, env, cwd)
            key = _cli(["keys", "issue", "--tenant", "bench", "--role", "backend"], env, cwd)
            deployment = Deployment(env, key, cwd, (database, f"{database}_keys"))
            try:
                yield deployment
            finally:
                for replica in deployment.replicas:
                    replica.process.terminate()
                for replica in deployment.replicas:
                    replica.process.wait()
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}_keys" WITH (FORCE)'))


@contextmanager
def running_custody(
    simulator: str, keyring_env: dict[str, str] | None = None, extra_env: dict[str, str] | None = None
) -> Iterator[tuple[str, str]]:
    """`custody serve` in its own process, as a deployment on a fresh database of the local
    Postgres (see `running_deployment`), calling `simulator`; yields (its URL, a backend key)."""
    with running_deployment(simulator, keyring_env, extra_env) as deployment:
        yield deployment.add_replica().url, deployment.key


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--slowest", type=int, default=0, help="also list the N slowest samples per size")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20, 200])
    args = parser.parse_args()
    with running_simulator() as simulator, running_custody(simulator) as (custody, key):
        asyncio.run(main_async(args, custody, simulator, key))


if __name__ == "__main__":
    main()
