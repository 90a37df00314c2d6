"""The `custody` command line: serve, migrate, tenants, keys, simulator."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

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
            runtime.start_checkpoints(settings.audit_checkpoint_seconds)
            runtime.start_reaper()
            runtime.start_auth_failure_accounting()
            config = uvicorn.Config(
                app,
                host=settings.host,
                port=settings.port,
                access_log=False,
                log_level="warning",
                lifespan="on",
                # X-Forwarded-For is believed only from the configured proxies; with none, proxy
                # headers are ignored (uvicorn would otherwise trust 127.0.0.1, or
                # FORWARDED_ALLOW_IPS, by default).
                proxy_headers=bool(settings.trusted_proxies),
                forwarded_allow_ips=list(settings.trusted_proxies),
            )
            _say(f"custody: serving on http://{settings.host}:{settings.port}")
            # uvicorn re-raises the stop signal once it has shut down; with the default handler
            # that would kill the process before the embedded Postgres and simulator are stopped.
            for stop_signal in (signal.SIGINT, signal.SIGTERM):
                signal.signal(stop_signal, lambda *_: None)
            # Everything loaded so far lives as long as the process: move it out of the
            # collector's reach, so full collections stop walking a million long-lived objects
            # (they cost 100+ ms pauses in the turn latency benchmark).
            gc.freeze()
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
    from .secret_files import load_pepper

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


# CLI actions are audited in the same transaction as the change; the actor is the operator at
# the console (no API key), recorded as `via: cli`.


def _tenants_create(args: argparse.Namespace) -> int:
    from .tenants import audited_create_tenant

    async def work(session: Any, pepper: bytes) -> None:
        tenant = await audited_create_tenant(session, args.name, via="cli")
        print(tenant.id)

    _with_session(work)
    return 0


def _keys_issue(args: argparse.Namespace) -> int:
    from .tenants import audited_issue_key

    async def work(session: Any, pepper: bytes) -> None:
        row, key = await audited_issue_key(session, pepper, args.tenant, args.role, via="cli")
        _say(f"custody: issued {row.id} ({args.role}) for tenant {args.tenant}; the key is shown once:")
        print(key)

    _with_session(work)
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    from .tenants import audited_revoke_key

    async def work(session: Any, pepper: bytes) -> None:
        await audited_revoke_key(session, args.key_id, via="cli")
        _say(f"custody: revoked {args.key_id}")

    _with_session(work)
    return 0


def _keyring_rotate(args: argparse.Namespace) -> int:
    from .database import make_engine, make_sessions
    from .key_rotation import rewrap_data_keys
    from .keyring_sentinels import ensure_current_sentinel
    from .secret_files import load_keyring

    settings = Settings.from_env()
    keyring = load_keyring(settings, [])
    if not args.rewrap_only:
        version = keyring.rotate()
        _say(f"custody: {keyring.path} now has KEK version {version} as current")
    url = _database_url(settings)

    async def run() -> None:
        engine = make_engine(url)
        try:
            sessions = make_sessions(engine)
            # The new version's sentinel first: a replica started with a stale keyring file then
            # refuses to start instead of failing on the first rewrapped conversation.
            async with sessions.begin() as session:
                await ensure_current_sentinel(session, keyring)
            result = await rewrap_data_keys(sessions, keyring)
            print(f"rewrapped {result.rewrapped} data keys under KEK version {result.version}")
        finally:
            await engine.dispose()

    asyncio.run(run())
    return 0


def _secrets_init(args: argparse.Namespace) -> int:
    from .secret_files import init_secrets

    created = init_secrets(args.directory)
    _say(f"custody: created the keyring, the pepper and the audit signing key in {args.directory} (mode 0600)")
    _say("custody: set these variables for every replica and keep a copy of the files apart from database backups:")
    for line in created.as_environment():
        print(line)
    return 0


def _audit_checkpoint(args: argparse.Namespace) -> int:
    from .audit import checkpoint_all
    from .database import make_engine, make_sessions
    from .secret_files import load_signer

    settings = Settings.from_env()
    signer = load_signer(settings, [])
    url = _database_url(settings)

    async def run() -> None:
        engine = make_engine(url)
        try:
            for checkpoint in await checkpoint_all(make_sessions(engine), signer):
                print(f"{checkpoint.chain}: signed seq {checkpoint.seq} ({checkpoint.head_hash[:16]}...)")
                if args.out is not None:
                    # A copy outside the database: whoever can rewrite the tables cannot reach it.
                    with args.out.open("a", encoding="utf-8") as out:
                        out.write(json.dumps(checkpoint.as_json(), separators=(",", ":")) + "\n")
        finally:
            await engine.dispose()

    asyncio.run(run())
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from .audit_chain import ChainVerdict

    def report(verdict: ChainVerdict) -> bool:
        if verdict.ok:
            print(
                f"{verdict.chain}: ok, {verdict.checked} records, head seq {verdict.head_seq}"
                + (f", signed checkpoint at {verdict.checkpoint_seq}" if verdict.checkpoint_seq else "")
            )
        else:
            print(f"{verdict.chain}: FIRST BAD RECORD seq {verdict.first_bad}: {verdict.reason}")
        return verdict.ok

    # Exit 1 means a record or the proof fails; 2 means the input could not be checked at all (a
    # wrong or unreadable file, a missing header): a mistake, reported in one line.
    if args.header is not None and args.header_file is not None:
        _say("custody: give the export header once: --header or --header-file")
        return 2
    if args.file is None and (args.header is not None or args.header_file is not None):
        _say("custody: --header and --header-file go with --file (a FHIR export to verify offline)")
        return 2
    if args.file is not None:
        from .audit_export import ExportUnreadable, header_token_in, verify_export

        reading: Path = args.file
        try:
            pem = None
            if args.public_key is not None:
                reading = args.public_key
                pem = args.public_key.read_bytes()
            token = args.header
            if args.header_file is not None:
                reading = args.header_file
                token = header_token_in(args.header_file.read_text(encoding="utf-8"))
            reading = args.file
            with args.file.open(encoding="utf-8") as lines:
                verdict, key_source = verify_export(lines, public_key_pem=pem, fhir_header=token)
        except OSError as exc:
            _say(f"custody: cannot read {reading}: {exc.strerror or exc}")
            return 2
        except UnicodeDecodeError:
            _say(f"custody: {reading} is not UTF-8 text: not an export, header or key")
            return 2
        except ExportUnreadable as exc:
            _say(f"custody: cannot verify {args.file}: {exc}")
            return 2
        _say(f"custody: checkpoints checked with {key_source}")
        return 0 if report(verdict) else 1

    from .audit import AuditEntry, append, chains, verify_chain
    from .audit_chain import Checkpoint
    from .secret_files import load_signer

    signer = load_signer(Settings.from_env(), [])
    kept_outside: list[Checkpoint] = []
    if args.checkpoints is not None:
        with args.checkpoints.open(encoding="utf-8") as lines:
            kept_outside = [Checkpoint(**json.loads(line)) for line in lines if line.strip()]
    results: list[bool] = []

    async def work(session: Any, pepper: bytes) -> None:
        for chain in [args.chain] if args.chain else await chains(session):
            verdict = await verify_chain(session, chain, signer, extra_checkpoints=kept_outside)
            results.append(report(verdict))
            await append(
                session,
                AuditEntry(
                    "audit.verify",
                    None,
                    resource_type="audit_log",
                    resource_id=chain,
                    chain=chain,
                    details={
                        "ok": verdict.ok,
                        "checked": verdict.checked,
                        "first_bad_seq": verdict.first_bad,
                        "via": "cli",
                    },
                ),
            )

    _with_session(work)
    return 0 if all(results) else 1


def _audit_export(args: argparse.Namespace) -> int:
    from .audit import AuditEntry, append, utc_instant
    from .audit_export import export_header, export_lines, export_range, header_token
    from .errors import InvalidInput
    from .models import AuditChainHead
    from .secret_files import load_signer

    signer = load_signer(Settings.from_env(), [])

    def instant(value: str | None) -> str | None:
        return None if value is None else utc_instant(datetime.fromisoformat(value.replace("Z", "+00:00")))

    since, until = instant(args.since), instant(args.until)

    async def work(session: Any, pepper: bytes) -> None:
        if await session.get(AuditChainHead, args.chain) is None:
            raise InvalidInput(f"no audit chain named {args.chain!r} (a tenant id, or `system`)")
        span = await export_range(session, args.chain, since, until)
        header = await export_header(session, span, signer)
        await append(
            session,
            AuditEntry(
                "audit.export",
                None,
                resource_type="audit_log",
                resource_id=args.chain,
                chain=args.chain,
                details={"format": args.format, "via": "cli", "first_seq": span.first_seq, "last_seq": span.last_seq},
            ),
        )
        if args.format == "fhir":
            _say(f"custody: export header (base64url JSON): {header_token(header)}")
        async for line in export_lines(session, header, fhir=args.format == "fhir"):
            sys.stdout.write(line)

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
        request_log_limit=args.request_log_limit,
    )
    _say(
        f"custody simulator: Gemini Interactions API stand-in on http://{args.host}:{args.port}"
        " (set GOOGLE_GEMINI_BASE_URL to this address)"
    )
    serve_forever(config, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="custody", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    commands.add_parser("serve", help="run the REST API (configured by environment variables)").set_defaults(
        handler=_serve
    )
    commands.add_parser("migrate", help="bring the database schema up to date").set_defaults(handler=_migrate)
    commands.add_parser("openapi", help="print the OpenAPI document (schemas/openapi.json)").set_defaults(
        handler=_openapi
    )

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

    secrets = commands.add_parser("secrets", help="create the secrets a deployment needs").add_subparsers(
        dest="action", required=True
    )
    init = secrets.add_parser(
        "init", help="create the keyring, pepper and audit signing key in DIR and print the variables to set"
    )
    init.add_argument("directory", type=Path, metavar="DIR")
    init.set_defaults(handler=_secrets_init)

    keyring = commands.add_parser("keyring", help="rotate the key-encryption key").add_subparsers(
        dest="action", required=True
    )
    rotate = keyring.add_parser("rotate", help="add a new KEK version and rewrap every data key under it")
    rotate.add_argument("--rewrap-only", action="store_true", help="finish an interrupted rewrap; add no version")
    rotate.set_defaults(handler=_keyring_rotate)

    audit = commands.add_parser("audit", help="verify, export and checkpoint the audit log").add_subparsers(
        dest="action", required=True
    )
    verify = audit.add_parser(
        "verify", help="recompute the hash chains (or an export file) and name the first bad record"
    )
    verify.add_argument("--chain", help="one chain (a tenant id, or `system`); default: all")
    verify.add_argument(
        "--file",
        type=Path,
        help="verify an export offline instead of the database (exit 1: it fails; 2: it cannot be read)",
    )
    verify.add_argument("--public-key", type=Path, help="PEM of the audit signing key to pin (with --file)")
    verify.add_argument(
        "--header",
        metavar="TOKEN",
        help="with --file, for a FHIR export: its header token (X-Custody-Export-Header, or as `audit export` prints)",
    )
    verify.add_argument(
        "--header-file",
        type=Path,
        metavar="FILE",
        help="as --header, read from FILE: the token alone, or the response headers saved by `curl -D FILE`",
    )
    verify.add_argument(
        "--checkpoints", type=Path, help="checkpoints kept outside the database (`audit checkpoint --out`)"
    )
    verify.set_defaults(handler=_audit_verify)
    export = audit.add_parser("export", help="export a chain's records with the proof to verify them")
    export.add_argument("--chain", required=True)
    export.add_argument("--since", help="ISO 8601 with a timezone, e.g. 2026-11-24T00:00:00Z")
    export.add_argument("--until")
    export.add_argument("--format", choices=["ndjson", "fhir"], default="ndjson")
    export.set_defaults(handler=_audit_export)
    checkpoint = audit.add_parser("checkpoint", help="sign every chain's head now")
    checkpoint.add_argument("--out", type=Path, help="also append the new checkpoints to this file (keep it elsewhere)")
    checkpoint.set_defaults(handler=_audit_checkpoint)

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
    except Exception as exc:
        from .database_errors import database_unreachable

        if not database_unreachable(exc):
            raise
        # The type only: a driver's message can quote the URL, password included.
        _say(f"custody: cannot reach the database at DATABASE_URL ({type(exc).__name__}); is it running?")
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
