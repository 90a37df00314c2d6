"""`custody serve`, `migrate`, `openapi` and `simulator`: running things."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import ConfigurationError
from ._common import say

__all__ = ["add_run_commands"]

_startup = logging.getLogger("custody.startup")


def _database_urls(settings: Settings) -> tuple[str, str]:
    """DATABASE_URL and CUSTODY_KEY_STORE_URL, or the zero-config embedded Postgres under the data
    dir and the key store's database in it; a deployment must name both."""
    from ..database import parse_database_url
    from ..key_store import KEY_STORE_VARIABLE

    if settings.database_url:
        parse_database_url(settings.database_url)  # a malformed URL is the first thing to hear about
        if not settings.key_store_url:
            raise ConfigurationError(
                f"{KEY_STORE_VARIABLE} is not set: with DATABASE_URL set, `custody migrate` prepares the key store "
                "too, a Postgres database of its own (on another server); create one and name it"
            )
        parse_database_url(settings.key_store_url, KEY_STORE_VARIABLE)
        return settings.database_url, settings.key_store_url
    from ..embedded_postgres import start_embedded_postgres
    from ..runtime import EMBEDDED_KEY_STORE

    postgres = start_embedded_postgres(settings.data_dir)
    say(f"custody: EMBEDDED DEFAULT: no DATABASE_URL, using the embedded Postgres in {postgres.data_path}")
    return postgres.url, settings.key_store_url or postgres.database_url(EMBEDDED_KEY_STORE)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from ..api import create_app
    from ..api.metrics import MetricsEndpoint
    from ..logs import configure_logging
    from ..runtime import build_runtime
    from ._server import DrainingServer

    settings = Settings.from_env()
    # Before anything logs: JSON lines on stdout in a deployment, text in the zero-config run.
    log_format = settings.resolved_log_format
    configure_logging(log_format, level=settings.log_level, access_log=settings.access_log)

    def announce(line: str) -> None:
        """A startup line: a log line where logs are JSON (the log shipper reads those), else for
        the person at the terminal, on stderr, as every command's messages are."""
        if log_format == "json":
            loud = line.startswith(("WARNING", "EMBEDDED DEFAULT"))
            _startup.log(logging.WARNING if loud else logging.INFO, line)
        else:
            say(f"custody: {line}")

    async def run() -> None:
        runtime = await build_runtime(settings)
        try:
            for line in runtime.announcements:
                announce(line)
            if runtime.demo_keys:
                say("custody: demo tenant 'demo'; API keys (shown once):")
                for role, key in runtime.demo_keys.items():
                    say(f"  {role:8} {key}")
            scrape = None
            if runtime.metrics is not None and runtime.metrics_token is not None:
                scrape = MetricsEndpoint(runtime.metrics_token, runtime.metrics.prometheus_text)
            app = create_app(runtime.ctx, max_body_bytes=settings.max_body_bytes, metrics_endpoint=scrape)
            runtime.start_checkpoints(settings.audit_checkpoint_seconds)
            runtime.start_reaper()
            runtime.start_background_turns()
            runtime.start_auth_failure_accounting()
            runtime.start_retention(settings.retention_interval_seconds)
            config = uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                # Custody's own logging (service/logs.py) formats uvicorn's lines too, and writes the
                # one access line per request itself: uvicorn's would hold the raw path and query.
                log_config=None,
                access_log=False,
                log_level="warning",
                lifespan="on",
                # X-Forwarded-For is believed only from the configured proxies; with none, proxy
                # headers are ignored (uvicorn would otherwise trust 127.0.0.1, or
                # FORWARDED_ALLOW_IPS, by default).
                proxy_headers=bool(settings.trusted_proxies),
                forwarded_allow_ips=list(settings.trusted_proxies),
                # The drain (DrainingServer) has already waited for the requests in flight; this
                # bounds uvicorn's own wait for whatever is left (a probe, a slow client).
                timeout_graceful_shutdown=max(1, round(settings.turn_store_wait_seconds)),
            )
            announce(f"serving on http://{settings.host}:{settings.port}")
            # uvicorn re-raises the stop signal once it has shut down; with the default handler
            # that would kill the process before the embedded Postgres and simulator are stopped.
            for stop_signal in (signal.SIGINT, signal.SIGTERM):
                signal.signal(stop_signal, lambda *_: None)
            # Everything loaded so far lives as long as the process: move it out of the
            # collector's reach, so full collections stop walking a million long-lived objects
            # (they cost 100+ ms pauses in the turn latency benchmark).
            gc.freeze()
            server = DrainingServer(
                config,
                drain=runtime.ctx.drain,
                drain_seconds=settings.drain_seconds,
                # A cancelled turn gives its conversation back within this (it waits this long at
                # most for the database to take the release).
                cancel_wait_seconds=settings.turn_store_wait_seconds,
                on_drain=runtime.begin_shutdown,
            )
            await server.serve()
        finally:
            await runtime.aclose()

    asyncio.run(run())
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from ..database import migrate
    from ..key_store import migrate_key_store

    url, key_store_url = _database_urls(Settings.from_env())
    migrate(url)
    migrate_key_store(key_store_url)
    say("custody: the database schema and the key store's are up to date")
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from ..api.app import openapi_document

    sys.stdout.write(openapi_document())
    return 0


def _simulator(args: argparse.Namespace) -> int:
    from ..simulator import SimulatorConfig, serve_forever

    config = SimulatorConfig(
        retention_seconds=args.retention_seconds,
        background_queued_seconds=args.background_queued_seconds,
        background_run_seconds=args.background_run_seconds,
        latency_ms=args.latency_ms,
        api_key=args.api_key,
        request_log_path=args.request_log,
        request_log_limit=args.request_log_limit,
    )
    say(
        f"custody simulator: Gemini Interactions API stand-in on http://{args.host}:{args.port}"
        " (set GOOGLE_GEMINI_BASE_URL to this address)"
    )
    serve_forever(config, host=args.host, port=args.port)
    return 0


def add_run_commands(commands: argparse._SubParsersAction[Any]) -> None:
    commands.add_parser("serve", help="run the REST API (configured by environment variables)").set_defaults(
        handler=_serve
    )
    commands.add_parser("migrate", help="bring the database schema, and the key store's, up to date").set_defaults(
        handler=_migrate
    )
    commands.add_parser("openapi", help="print the OpenAPI document (schemas/openapi.json)").set_defaults(
        handler=_openapi
    )
    sim = commands.add_parser("simulator", help="run the local Gemini Interactions API simulator")
    sim.add_argument("--host", default="127.0.0.1")
    sim.add_argument("--port", type=int, default=8765)
    sim.add_argument(
        "--retention-seconds",
        type=float,
        default=55 * 24 * 3600.0,
        help="how long stored interactions live (default: 55 days)",
    )
    sim.add_argument("--background-queued-seconds", type=float, default=0.2)
    sim.add_argument("--background-run-seconds", type=float, default=0.5)
    sim.add_argument("--latency-ms", type=float, default=0.0, help="latency added to every request")
    sim.add_argument("--api-key", default=None, help="accept only this API key")
    sim.add_argument(
        "--request-log-limit", type=int, default=1000, help="requests kept in memory for GET /_simulator/requests"
    )
    sim.add_argument(
        "--request-log",
        type=Path,
        default=None,
        help="also append every request to this JSON-lines file (off by default)",
    )
    sim.set_defaults(handler=_simulator)
