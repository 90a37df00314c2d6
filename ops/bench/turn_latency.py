"""Latency Custody adds to a turn, against the direct SDK call to the same simulator.

Run: .venv/bin/python ops/bench/turn_latency.py [--samples 40] [--sizes 1,20,200] [--observability]

Starts `custody simulator` and `custody serve` as separate processes (the service on a fresh
database on the local Postgres, DATABASE_URL of the benchmark's choosing via BENCH_ADMIN_URL),
then for each history size N: builds a conversation with N stored turns through Custody, and
measures, interleaved sample by sample,
  - direct: `client.aio.interactions.with_raw_response.create(input=<the same N-turn history +
    a new input>, store=False)` straight to the simulator (what a backend would do without Custody);
  - custody: POST /v1/conversations/{id}/turns with a new input (auth, claim, decrypt N turns,
    the same SDK call, encrypt and store, respond).
Prints median and p99 of both and of the difference. Asserts nothing about speed.

The baseline service runs with metrics and logs off (no scrape token, no OTLP endpoint: the
instruments are no-ops; text logs, no access line). With `--observability` a second `custody
serve` runs beside it on the same database with both on: JSON lines with an access line per
request, written to a file as a container's stdout would be, and the Prometheus reader behind
every instrument (scraped once at the end, to show it was live). Each sample then also takes a
turn through it, in alternating order with the baseline's, and the figures add its p50/p99 and
its ratio to the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
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


async def open_with_history(http: httpx.AsyncClient, size: int) -> str:
    """A conversation with `size` stored turns."""
    created = await http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
    conversation = str(created.json()["id"])
    for index in range(size):
        (
            await http.post(
                f"/v1/conversations/{conversation}/turns",
                json={"input": f"setup turn {index}: the patient reports mild symptoms"},
            )
        ).raise_for_status()
    return conversation


async def timed_turn(http: httpx.AsyncClient, conversation: str, text: str) -> float:
    started = time.perf_counter()
    (await http.post(f"/v1/conversations/{conversation}/turns", json={"input": text})).raise_for_status()
    return (time.perf_counter() - started) * 1000


async def measure(
    services: dict[str, str], headers: dict[str, str], sdk: genai.Client, size: int, samples: int
) -> dict[str, list[float]]:
    """`services`: name -> base URL of a Custody process (`custody`, and `observed` if running)."""
    clients = {name: httpx.AsyncClient(base_url=url, headers=headers, timeout=60) for name, url in services.items()}
    try:
        conversations = {name: await open_with_history(http, size) for name, http in clients.items()}
        http, conversation = clients["custody"], conversations["custody"]
        times: dict[str, list[float]] = {"direct": [], **{name: [] for name in services}}
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
            # The Custody processes in alternating order, so neither always goes first.
            order = list(services) if sample % 2 == 0 else list(reversed(services))
            through = {name: await timed_turn(clients[name], conversations[name], text) for name in order}
            if sample >= 0:
                times["direct"].append(direct)
                for name, value in through.items():
                    times[name].append(value)
        return times
    finally:
        for client in clients.values():
            await client.aclose()


async def main_async(args: argparse.Namespace, services: dict[str, str], simulator: str, key: str) -> None:
    sdk = genai.Client(api_key="bench", http_options={"base_url": simulator, "retry_options": {"attempts": 1}})
    print(f"turn latency, ms ({args.samples} samples per size; Custody and simulator in separate processes)")
    observed = "observed" in services
    print(
        f"{'stored turns':>12} | {'direct p50':>10} {'p99':>7} | {'custody p50':>11} {'p99':>7} | {'added p50':>9} {'p99':>7}"
        + (f" | {'observed p50':>12} {'p99':>7} | {'ratio p50':>9} {'p99':>5}" if observed else "")
    )
    for size in args.sizes:
        times = await measure(services, {"Authorization": f"Bearer {key}"}, sdk, size, args.samples)
        added = [c - d for c, d in zip(times["custody"], times["direct"], strict=True)]
        line = (
            f"{size:>12} | {statistics.median(times['direct']):>10.2f} {percentile(times['direct'], 0.99):>7.2f} | "
            f"{statistics.median(times['custody']):>11.2f} {percentile(times['custody'], 0.99):>7.2f} | "
            f"{statistics.median(added):>9.2f} {percentile(added, 0.99):>7.2f}"
        )
        if observed:
            on, off = times["observed"], times["custody"]
            line += (
                f" | {statistics.median(on):>12.2f} {percentile(on, 0.99):>7.2f} | "
                f"{statistics.median(on) / statistics.median(off):>9.3f} {percentile(on, 0.99) / percentile(off, 0.99):>5.2f}"
            )
        print(line)
        if args.slowest:
            worst = sorted(range(len(added)), key=added.__getitem__, reverse=True)[: args.slowest]
            print(
                "             slowest added (sample: custody/direct ms): "
                + ", ".join(f"#{i}: {times['custody'][i]:.0f}/{times['direct'][i]:.0f}" for i in worst)
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--slowest", type=int, default=0, help="also list the N slowest samples per size")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20, 200])
    parser.add_argument(
        "--observability",
        action="store_true",
        help="also run a second service with metrics (/metrics) and JSON logs (access line per request) on",
    )
    args = parser.parse_args()

    database = f"custody_bench_{secrets.token_hex(4)}"
    url = ADMIN_URL.rsplit("/", 1)[0] + "/" + database

    async def admin(sql: str) -> None:
        connection = await asyncpg.connect(ADMIN_URL)
        try:
            await connection.execute(sql)
        finally:
            await connection.close()

    asyncio.run(admin(f'CREATE DATABASE "{database}"'))
    processes: list[subprocess.Popen[bytes]] = []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            # A deployment: its three secrets named (made here), and a model service (the simulator
            # started below; the CLI commands never call it).
            env = os.environ | {"DATABASE_URL": url, "CUSTODY_DATA_DIR": scratch, "GEMINI_API_KEY": "bench"}
            made = subprocess.run(
                [sys.executable, "-m", "service", "secrets", "init", str(Path(scratch) / "secrets")],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            env |= dict(line.split("=", 1) for line in made.splitlines() if "=" in line)
            subprocess.run([sys.executable, "-m", "service", "migrate"], env=env, check=True, capture_output=True)
            subprocess.run(
                [sys.executable, "-m", "service", "tenants", "create", "bench"],
                env=env,
                check=True,
                capture_output=True,
            )
            key = subprocess.run(
                [sys.executable, "-m", "service", "keys", "issue", "--tenant", "bench", "--role", "backend"],
                env=env,
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
            sim_port, custody_port = free_port(), free_port()
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service", "simulator", "--port", str(sim_port), "--request-log-limit", "0"],
                    stderr=subprocess.DEVNULL,
                )
            )
            simulator = f"http://127.0.0.1:{sim_port}"
            wait_ready(f"{simulator}/_simulator/health", processes[-1])
            env |= {"GOOGLE_GEMINI_BASE_URL": simulator}
            # The baseline: metrics and logs off (no scrape token and no OTLP endpoint: no-op
            # instruments; text logs without an access line).
            quiet = {name: value for name, value in env.items() if not name.startswith("OTEL_")} | {
                "CUSTODY_PORT": str(custody_port),
                "CUSTODY_LOG_FORMAT": "text",
                "CUSTODY_ACCESS_LOG": "false",
            }
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service", "serve"],
                    env=quiet,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            services = {"custody": f"http://127.0.0.1:{custody_port}"}
            wait_ready(f"{services['custody']}/readyz", processes[-1])
            log_path = Path(scratch) / "observed.log"
            token = secrets.token_hex(32)
            if args.observability:
                token_path = Path(scratch) / "metrics-token"
                token_path.write_text(token)
                token_path.chmod(0o600)
                observed_port = free_port()
                loud = quiet | {
                    "CUSTODY_PORT": str(observed_port),
                    "CUSTODY_LOG_FORMAT": "json",
                    "CUSTODY_ACCESS_LOG": "true",
                    "CUSTODY_METRICS_TOKEN_FILE": str(token_path),
                    # Its own data dir: the two processes share nothing but the database.
                    "CUSTODY_DATA_DIR": str(Path(scratch) / "observed"),
                }
                with log_path.open("w") as log:
                    processes.append(
                        subprocess.Popen(
                            [sys.executable, "-m", "service", "serve"], env=loud, stdout=log, stderr=subprocess.DEVNULL
                        )
                    )
                services["observed"] = f"http://127.0.0.1:{observed_port}"
                wait_ready(f"{services['observed']}/readyz", processes[-1])
            asyncio.run(main_async(args, services, simulator, key))
            if args.observability:
                scraped = httpx.get(f"{services['observed']}/metrics", headers={"Authorization": f"Bearer {token}"})
                series = [line for line in scraped.text.splitlines() if line and not line.startswith("#")]
                lines = log_path.read_text().splitlines()
                print(
                    f"observed: /metrics {scraped.status_code}, {len(series)} series, {len(scraped.content)} bytes; "
                    f"{len(lines)} JSON log lines ({sum(len(line) + 1 for line in lines)} bytes)"
                )
    finally:
        for process in processes:
            process.terminate()
            process.wait()
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
