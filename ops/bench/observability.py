"""What metrics and JSON logs cost a turn: two `custody serve` processes side by side, one with both off.

Run: .venv/bin/python ops/bench/observability.py [--samples 40] [--sizes 1,20,200]

Starts `custody simulator` and two `custody serve` processes (each a deployment on a fresh database
of the local Postgres, as ops/bench/turn_latency.py runs it):
  - quiet: no scrape token and no OTLP endpoint (the instruments are no-ops), text logs, no access
    line;
  - observed: `/metrics` served (a scrape token file), JSON log lines with an access line per
    request (written to a discarded stdout, as a container's would be).
For each history size, the two are measured one after the other with turn_latency's `measure`
(each sample a direct SDK call of the same history to the simulator, then the turn through the
service), and the table gives both services' p50 and p99 and the ratio of their p50s. /metrics is
scraped once at the end, to show the instruments were live. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import tempfile
from pathlib import Path

import httpx
from google import genai
from turn_latency import measure, percentile, running_custody, running_simulator


async def main_async(args: argparse.Namespace, services: dict[str, tuple[str, str]], simulator: str, token: str) -> None:
    sdk = genai.Client(api_key="bench", http_options={"base_url": simulator, "retry_options": {"attempts": 1}})
    print(f"turn through Custody, ms ({args.samples} samples per size), metrics and JSON logs off vs on")
    print(f"{'stored turns':>12} | {'off p50':>8} {'p99':>7} | {'on p50':>8} {'p99':>7} | {'on/off p50':>10}")
    for size in args.sizes:
        p50: dict[str, float] = {}
        p99: dict[str, float] = {}
        for name, (url, key) in services.items():
            times = await measure(url, {"Authorization": f"Bearer {key}"}, sdk, size, args.samples)
            p50[name], p99[name] = statistics.median(times["custody"]), percentile(times["custody"], 0.99)
        print(
            f"{size:>12} | {p50['off']:>8.2f} {p99['off']:>7.2f} | {p50['on']:>8.2f} {p99['on']:>7.2f} | "
            f"{p50['on'] / p50['off']:>10.3f}"
        )
    url, _ = services["on"]
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        scraped = await http.get("/metrics", headers={"Authorization": f"Bearer {token}"})
    series = [line for line in scraped.text.splitlines() if line and not line.startswith("#")]
    print(f"/metrics of the observed service: HTTP {scraped.status_code}, {len(series)} series")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 20, 200])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        token = secrets.token_urlsafe(32)
        token_file = Path(scratch) / "metrics-token"
        token_file.write_text(token, encoding="utf-8")
        os.chmod(token_file, 0o600)
        quiet = {"CUSTODY_LOG_FORMAT": "text", "CUSTODY_ACCESS_LOG": "false"}
        observed = {"CUSTODY_LOG_FORMAT": "json", "CUSTODY_ACCESS_LOG": "true", "CUSTODY_METRICS_TOKEN_FILE": str(token_file)}
        clean = {name: value for name, value in os.environ.items() if name.startswith("OTEL_")}
        for name in clean:
            os.environ.pop(name)
        with (
            running_simulator() as simulator,
            running_custody(simulator, extra_env=quiet) as off,
            running_custody(simulator, extra_env=observed) as on,
        ):
            asyncio.run(main_async(args, {"off": off, "on": on}, simulator, token))


if __name__ == "__main__":
    main()
