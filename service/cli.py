"""The `custody` command line: serve, migrate, tenants, keys, simulator."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Sequence

from .config import Settings
from .errors import ConfigurationError, CustodyError

__all__ = ["main"]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _database_url(settings: Settings) -> str:
    """DATABASE_URL, or the zero-config embedded Postgres under the data dir."""
    if settings.database_url:
        return settings.database_url
    from .embedded_postgres import start_embedded_postgres

    postgres = start_embedded_postgres(settings.data_dir)
    _say(f"EMBEDDED DEFAULT: no DATABASE_URL, using the embedded Postgres in {postgres.data_path}")
    return postgres.url


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api import create_app
    from .runtime import build_runtime

    settings = Settings.from_env()

    async def run() -> None:
        runtime = await build_runtime(settings)
        try:
            for line in runtime.announcements:
                _say(f"custody: {line}")
            if runtime.demo_keys:
                _say("custody: demo tenant 'demo'; API keys (shown once):")
                for role, key in runtime.demo_keys.items():
                    _say(f"  {role:8} {key}")
            app = create_app(runtime.ctx, max_body_bytes=settings.max_body_bytes)
            config = uvicorn.Config(app, host=settings.host, port=settings.port, access_log=False,
                                    log_level="warning", lifespan="on")
            _say(f"custody: serving on http://{settings.host}:{settings.port}")
            # uvicorn re-raises the stop signal once it has shut down; with the default handler
            # that would kill the process before the embedded Postgres and simulator are stopped.
            for stop_signal in (signal.SIGINT, signal.SIGTERM):
                signal.signal(stop_signal, lambda *_: None)
            await uvicorn.Server(config).serve()
        finally:
            await runtime.aclose()

    asyncio.run(run())
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from .database import migrate

    migrate(_database_url(Settings.from_env()))
    _say("custody: the database schema is up to date")
    return 0


def _with_session(work: Callable[[Any, bytes], Awaitable[None]]) -> None:
    from .database import check_schema_current, make_engine, make_sessions
    from .runtime import load_pepper

    settings = Settings.from_env()
    url = _database_url(settings)
    notes: list[str] = []
    pepper = load_pepper(settings, notes)
    for note in notes:
        _say(f"custody: {note}")

    async def run() -> None:
        engine = make_engine(url)
        try:
            await check_schema_current(engine, url)
            async with make_sessions(engine).begin() as session:
                await work(session, pepper)
        finally:
            await engine.dispose()

    asyncio.run(run())


def _tenants_create(args: argparse.Namespace) -> int:
    from .auth import create_tenant

    async def work(session: Any, pepper: bytes) -> None:
        tenant = await create_tenant(session, args.name)
        print(tenant.id)

    _with_session(work)
    return 0


def _keys_issue(args: argparse.Namespace) -> int:
    from .auth import issue_key

    async def work(session: Any, pepper: bytes) -> None:
        row, key = await issue_key(session, pepper, args.tenant, args.role)
        _say(f"custody: issued {row.id} ({args.role}) for tenant {args.tenant}; the key is shown once:")
        print(key)

    _with_session(work)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from .auth import revoke_key

    async def work(session: Any, pepper: bytes) -> None:
        await revoke_key(session, args.key_id)
        _say(f"custody: revoked {args.key_id}")

    _with_session(work)
    return 0


def _openapi(args: argparse.Namespace) -> int:
    from .api.app import openapi_document

    sys.stdout.write(openapi_document())
    return 0


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
    _say(f"custody simulator: Gemini Interactions API stand-in on http://{args.host}:{args.port}"
         " (set GOOGLE_GEMINI_BASE_URL to this address)")
    serve_forever(config, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="custody", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("serve", help="run the REST API (configured by environment variables)").set_defaults(handler=_serve)
    commands.add_parser("migrate", help="bring the database schema up to date").set_defaults(handler=_migrate)
    commands.add_parser("openapi", help="print the OpenAPI document (schemas/openapi.json)").set_defaults(handler=_openapi)

    tenants = commands.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    create = tenants.add_parser("create", help="create a tenant")
    create.add_argument("name")
    create.set_defaults(handler=_tenants_create)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    issue = keys.add_parser("issue", help="issue an API key (printed once)")
    issue.add_argument("--tenant", required=True)
    issue.add_argument("--role", required=True, choices=["backend", "auditor", "ops"])
    issue.set_defaults(handler=_keys_issue)
    revoke = keys.add_parser("revoke", help="revoke an API key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_keys_revoke)

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
    try:
        return int(args.handler(args))
    except ConfigurationError as exc:
        _say(f"custody: cannot start: {exc}")
        return 2
    except CustodyError as exc:
        _say(f"custody: {exc}")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
