"""The `custody` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

__all__ = ["main"]


def _simulator(args: argparse.Namespace) -> int:
    from .simulator import SimulatorConfig, serve_forever

    config = SimulatorConfig(
        retention_seconds=args.retention_seconds,
        background_queued_seconds=args.background_queued_seconds,
        background_run_seconds=args.background_run_seconds,
        latency_ms=args.latency_ms,
        api_key=args.api_key,
        request_log_path=args.request_log,
    )
    print(f"custody simulator: Gemini Interactions API stand-in on http://{args.host}:{args.port}"
          " (set GOOGLE_GEMINI_BASE_URL to this address)", file=sys.stderr)
    serve_forever(config, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="custody", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    sim = commands.add_parser("simulator", help="run the local Gemini Interactions API simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument("--retention-seconds", type=float, default=55 * 24 * 3600.0,
                     help="how long stored interactions live (default: 55 days)")
    sim.add_argument("--background-queued-seconds", type=float, default=0.2)
    sim.add_argument("--background-run-seconds", type=float, default=0.5)
    sim.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every request")
    sim.add_argument("--api-key", default=None, help="accept only this API key")
    sim.add_argument("--request-log", type=Path, default=None,
                     help="also append every request to this JSON-lines file (off by default)")
    sim.set_defaults(handler=_simulator)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))


if __name__ == "__main__":
    raise SystemExit(main())
