"""Builds a running Custody from Settings: the database, keys, policy and Gemini client.

Zero-config defaults, each announced loudly: no DATABASE_URL starts an embedded Postgres under the
data dir (and migrates it); no API key starts the Gemini simulator in-process; no keyring
generates one (mode 0600) in the data dir. A DATABASE_URL or API key that is set but does not
work stops startup with a message saying so: there is never a silent fallback.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from .audit import Auditor, checkpoint_all
from .audit_chain import AuditSigner
from .auth import ROLES
from .config import Settings
from .context import ServiceContext
from .database import check_schema_current, make_engine, make_sessions, migrate
from .errors import ConfigurationError
from .key_rotation import FileKeyring
from .keyring import KeyringError, LocalKeyring
from .models import Tenant
from .policy import PolicyError, load_policy
from .telemetry import describe, tracer_provider_from_env
from .tenants import audited_create_tenant, audited_issue_key
from .upstream import Upstream

__all__ = ["Runtime", "build_runtime", "load_pepper"]

DEMO_TENANT = "demo"
logger = logging.getLogger("custody.runtime")


@dataclass
class Runtime:
    settings: Settings
    ctx: ServiceContext
    engine: AsyncEngine
    announcements: list[str] = field(default_factory=list)
    demo_keys: dict[str, str] = field(default_factory=dict)
    _closers: list[Any] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start_checkpoints(self, every_seconds: float) -> None:
        """Sign the audit chains' heads every `every_seconds` while the service runs."""
        signer = self.ctx.auditor.signer
        if every_seconds <= 0 or signer is None:
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(every_seconds)
                try:
                    await checkpoint_all(self.ctx.sessions, signer)
                except Exception as exc:  # noqa: BLE001 - a failed round is retried next time
                    logger.error("audit checkpoint failed (%s); will retry", type(exc).__name__)

        self._tasks.append(asyncio.get_running_loop().create_task(loop()))

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        await self.ctx.upstream.aclose()
        await self.engine.dispose()
        for close in reversed(self._closers):
            close()


def load_pepper(settings: Settings, announce: list[str]) -> bytes:
    """The secret that keys API-key and subject HMACs; generated (0600) in the data dir if absent."""
    path = Path(os.environ.get("CUSTODY_PEPPER_FILE", settings.data_dir / "api-key-pepper"))
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ConfigurationError(f"{path} is readable by group or others: run chmod 600 {path}")
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    announce.append(
        f"generated the API-key pepper at {path} (keep it with the keyring; losing it invalidates every API key)"
    )
    return data


def _load_keyring(settings: Settings, announce: list[str]) -> FileKeyring:
    try:
        if settings.keyring_path is not None:
            return FileKeyring(settings.keyring_path)
        path = settings.data_dir / "keyring.json"
        if not path.exists():
            settings.data_dir.mkdir(parents=True, exist_ok=True)
            LocalKeyring.generate(path)
            announce.append(
                f"EMBEDDED DEFAULT: generated a local keyring at {path} (set CUSTODY_KEYRING for a managed one)"
            )
        return FileKeyring(path)
    except KeyringError as exc:
        raise ConfigurationError(str(exc)) from None


async def _audit_role_warning(engine: AsyncEngine) -> str | None:
    """The append-only grants bind only a role that neither owns the audit tables nor is a
    superuser; say so loudly when the service runs as one (as the embedded default does)."""
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT r.rolsuper, t.tableowner = current_user FROM pg_roles r, pg_tables t "
                    "WHERE r.rolname = current_user AND t.tablename = 'audit_events'"
                )
            )
        ).one_or_none()
    if row is None or not (row[0] or row[1]):
        return None
    return (
        "WARNING: the database role is a superuser or owns the audit tables, so the append-only grants do "
        "not bind it (the triggers still do); in production run the service as a login role in custody_app"
    )


async def _connect(url: str) -> AsyncEngine:
    engine = make_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - reported by type: the message could carry the password
        await engine.dispose()
        raise ConfigurationError(
            f"cannot connect to the database at DATABASE_URL ({type(exc).__name__}); "
            "check the URL and that the server is running"
        ) from None
    return engine


def load_signer(settings: Settings, announce: list[str]) -> AuditSigner:
    """The Ed25519 key that signs audit checkpoints; generated (0600) in the data dir if absent.

    Keep it away from the database's host and backups: it is what proves the log was not
    rewritten by someone who could write to the database.
    """
    path = Path(os.environ.get("CUSTODY_AUDIT_SIGNING_KEY", settings.data_dir / "audit-signing-key.pem"))
    try:
        signer, generated = AuditSigner.load_or_generate(path)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if generated:
        announce.append(f"generated the audit checkpoint signing key at {path} (key id {signer.key_id})")
    return signer


async def build_runtime(settings: Settings, *, demo_keys: bool = True) -> Runtime:
    settings.check()
    announce: list[str] = []
    closers: list[Any] = []
    url = settings.database_url
    embedded = url is None
    if url is None:
        from .embedded_postgres import start_embedded_postgres

        postgres = await asyncio.to_thread(start_embedded_postgres, settings.data_dir)
        closers.append(postgres.stop)
        url = postgres.url
        announce.append(f"EMBEDDED DEFAULT: no DATABASE_URL, using an embedded Postgres in {postgres.data_path}")
        await asyncio.to_thread(migrate, url)
    engine = await _connect(url)
    await check_schema_current(engine, url)
    if warning := await _audit_role_warning(engine):
        announce.append(warning)

    keyring = _load_keyring(settings, announce)
    pepper = load_pepper(settings, announce)
    try:
        policy = load_policy(settings.policy_path)
    except PolicyError as exc:
        raise ConfigurationError(f"invalid policy: {exc}") from None
    announce.append(f"policy {settings.policy_path} ({policy.version}), routes: {', '.join(sorted(policy.routes))}")

    if settings.upstream.configured:
        upstream = Upstream(
            settings.upstream, attempts=settings.upstream_attempts, timeout_seconds=settings.upstream_timeout_seconds
        )
        await upstream.verify()
    else:
        from .simulator import start_simulator

        simulator = start_simulator()
        closers.append(simulator.stop)
        upstream = Upstream(
            settings.upstream,
            attempts=settings.upstream_attempts,
            timeout_seconds=settings.upstream_timeout_seconds,
            base_url=simulator.base_url,
            api_key="simulator",
        )
        announce.append(
            f"EMBEDDED DEFAULT: no GEMINI_API_KEY, calling the local Gemini SIMULATOR at {simulator.base_url}"
        )

    signer = load_signer(settings, announce)
    provider = tracer_provider_from_env()
    closers.append(provider.shutdown)
    announce.append(describe())
    ctx = ServiceContext(
        sessions=make_sessions(engine),
        keyring=keyring,
        policy=policy,
        upstream=upstream,
        auditor=Auditor(provider.get_tracer("custody"), signer),
        pepper=pepper,
        turn_lease_seconds=settings.turn_lease_seconds,
    )
    runtime = Runtime(settings, ctx, engine, announce, _closers=closers)
    if embedded and demo_keys:
        runtime.demo_keys = await _issue_demo_keys(ctx)
    return runtime


async def _issue_demo_keys(ctx: ServiceContext) -> dict[str, str]:
    """The zero-config run's demo tenant, with a fresh key of each role printed at startup."""
    keys: dict[str, str] = {}
    async with ctx.sessions.begin() as session:
        if await session.scalar(select(Tenant).where(Tenant.name == DEMO_TENANT)) is None:
            await audited_create_tenant(session, DEMO_TENANT, via="zero-config")
        for role in ROLES:
            _, keys[role] = await audited_issue_key(session, ctx.pepper, DEMO_TENANT, role, via="zero-config")
    return keys
