"""Runs every benchmark in ops/bench and prints their figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    for script in (
        "simulator_throughput.py",
        "turn_latency.py",
        "upstream_hop.py",
        "turn_throughput.py",
        "concurrent_conversations.py",
        "replay_cost.py",
        "media_cost.py",
        "observability.py",
        "keyrings.py",
        "expiry_layer.py",
        "detectors.py",
        "retention.py",
        "audit_append.py",
        "stream_latency.py",
        "concurrent_streams.py",
    ):
        print(f"== {script}", flush=True)
        subprocess.run([sys.executable, str(HERE / script)], check=True)
