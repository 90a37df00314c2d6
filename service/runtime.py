"""Builds a running Custody from Settings: the database, keys, policy and Gemini client.

Zero-config defaults, each announced loudly, only when DATABASE_URL is unset: an embedded
Postgres under the data dir (migrated) with the key store as a second database in it, the Gemini
simulator in-process, and generated secrets (keyring, pepper, audit signing key; mode 0600) in
the data dir. A deployment (DATABASE_URL set) must name every secret, its key store
(CUSTODY_KEY_STORE_URL) and real Gemini credentials (or ask for the simulator explicitly); a
DATABASE_URL, key or keyring that is set but does not work stops startup with a message saying
so: there is never a silent fallback.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from .audit import Auditor, checkpoint_all
from .auth import ROLES
from .auth_failures import AuthFailureLimits, AuthFailures
from .config import Settings
from .context import ServiceContext
from .conversations import recompute_deadlines
from .crypto import DataKeyCache, Keyring, Pkcs11Keyring, verify_keyring
from .database import check_schema_current, make_engine, make_sessions, migrate
from .errors import ConfigurationError
from .key_store import (
    KEY_STORE_VARIABLE,
    ExpiryKeyStore,
    check_key_store_current,
    migrate_key_store,
    verify_key_store,
)
from .leases import reap_expired_leases
from .metrics_export import MetricsExport, load_metrics_token, metrics_export_from_env
from .models import Tenant
from .policy import PolicyError, load_policy, media_body_warnings
from .retention import RunSummary, run_retention
from .secret_files import keyring_source, load_keyring, load_pepper, load_retired_keys, load_signer
from .telemetry import describe, tracer_provider_from_env
from .tenants import create_tenant, issue_key
from .turns import BackgroundTurns
from .upstream import Upstream

__all__ = ["Runtime", "build_runtime"]

DEMO_TENANT = "demo"
# The zero-config run's key store: a second database in the same embedded Postgres.
EMBEDDED_KEY_STORE = "custody_keys"
logger = logging.getLogger("custody.runtime")
# How long `aclose` lets a running retention run reach the end of its batch before cancelling it.
_RETENTION_STOP_SECONDS = 10.0


class ShutdownRequested(Exception):
    """Raised at a batch boundary of the periodic retention run when the service stops: the run
    ends there (its record gives the reason `shutdown_requested`) and the next one carries on."""


@dataclass
class Runtime:
    settings: Settings
    ctx: ServiceContext
    engine: AsyncEngine
    announcements: list[str] = field(default_factory=list)
    demo_keys: dict[str, str] = field(default_factory=dict)
    # Where the metrics go, and the token GET /metrics asks for (None: /metrics is not served).
    metrics: MetricsExport | None = None
    metrics_token: bytes | None = field(default=None, repr=False)
    _closers: list[Any] = field(default_factory=list)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _retention_task: asyncio.Task[None] | None = None
    _retention_stop: asyncio.Event = field(default_factory=asyncio.Event)

    def start_checkpoints(self, every_seconds: float) -> None:
        """Sign the audit chains' heads every `every_seconds` while the service runs."""
        if every_seconds <= 0 or self.ctx.auditor.signer is None:
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(every_seconds)
                try:
                    await checkpoint_all(self.ctx.auditor, self.ctx.sessions)
                except Exception as exc:  # noqa: BLE001 - a failed round is retried next time
                    logger.error("audit checkpoint failed (%s); will retry", type(exc).__name__)

        self._tasks.append(asyncio.get_running_loop().create_task(loop()))

    def start_reaper(self) -> None:
        """Close abandoned turns (their holder died) about once a lease length, in every replica."""
        every = self.ctx.turn_lease_seconds

        async def loop() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    if closed := await reap_expired_leases(self.ctx):
                        logger.warning("closed %d abandoned turn(s)", closed)
                except Exception as exc:  # noqa: BLE001 - a failed round is retried next time
                    logger.error("reaping abandoned turns failed (%s); will retry", type(exc).__name__)

        self._tasks.append(asyncio.get_running_loop().create_task(loop()))

    def start_background_turns(self) -> None:
        """Resume the background turns whose replica died or stopped (their lease ran out): every
        replica looks about every third of a lease length, at once at startup."""
        every = self.ctx.turn_lease_seconds / 3
        turns = BackgroundTurns(self.ctx)

        async def loop() -> None:
            while True:
                try:
                    if resumed := await turns.resume_orphans():
                        logger.info("resumed %d background turn(s)", resumed)
                except Exception as exc:  # noqa: BLE001 - a failed round is retried next time
                    logger.error("resuming background turns failed (%s); will retry", type(exc).__name__)
                await asyncio.sleep(every)

        self._tasks.append(asyncio.get_running_loop().create_task(loop()))

    def start_auth_failure_accounting(self) -> None:
        """Write the summary records of failed authentications as their windows close (what is
        left is written by `aclose`)."""
        failures = self.ctx.auth_failures
        # A summary is written within a few seconds of its window's end.
        every = min(5.0, failures.limits.window_seconds)

        async def loop() -> None:
            while True:
                await asyncio.sleep(every)
                try:
                    await failures.flush(self.ctx.auditor, self.ctx.sessions)
                except Exception as exc:  # noqa: BLE001 - unwritten summaries are retried next time
                    logger.error("failed-authentication summaries not written (%s); will retry", type(exc).__name__)

        self._tasks.append(asyncio.get_running_loop().create_task(loop()))

    def start_retention(self, every_seconds: float) -> None:
        """Bring retention deadlines up to the policy now (so a changed policy is picked up at
        startup), then run the retention runner as `scheduler` at once and every `every_seconds`
        (0: the recompute only). Every replica may run it: runners share the work safely. A
        failed round is logged by its type and retried next time; `aclose` ends a running round
        at its next batch."""

        async def loop() -> None:
            try:
                if recomputed := await recompute_deadlines(self.ctx):
                    logger.warning(
                        "retention deadlines of %d conversation(s) recomputed for policy %s",
                        recomputed,
                        self.ctx.policy.version,
                    )
            except Exception as exc:  # noqa: BLE001 - every run and start recomputes first
                logger.error(
                    "recomputing retention deadlines failed (%s); the next run or start retries", type(exc).__name__
                )
            while every_seconds > 0 and not self._retention_stop.is_set():
                await self._retention_round()
                try:
                    await asyncio.wait_for(self._retention_stop.wait(), timeout=every_seconds)
                except TimeoutError:
                    pass

        self._retention_task = asyncio.get_running_loop().create_task(loop())

    async def _retention_round(self) -> None:
        def stop_at_batch_end(_: RunSummary) -> None:
            if self._retention_stop.is_set():
                raise ShutdownRequested

        try:
            summary = await run_retention(self.ctx, started_by="scheduler", progress=stop_at_batch_end)
        except ShutdownRequested:
            return
        except Exception as exc:  # noqa: BLE001 - a failed round is retried next time
            logger.error("retention run failed (%s); will retry", type(exc).__name__)
            return
        level = logging.WARNING if summary.failed or summary.provider_pending else logging.INFO
        logger.log(
            level,
            "retention run %s: %d purged, %d skipped, %d failed; provider copies %d deleted, %d failed, %d pending",
            summary.run_id,
            summary.purged,
            summary.skipped,
            summary.failed,
            summary.provider_deleted,
            summary.provider_failed,
            summary.provider_pending,
        )

    def begin_shutdown(self) -> None:
        """The replica has begun to drain: a running retention round ends at its next batch while
        the requests in flight finish (`aclose` then waits for it)."""
        self._retention_stop.set()

    async def _stop_retention(self) -> None:
        """Let a running retention round end at its batch boundary, or cancel it after a bound
        (the next run, in any replica, finds what is left)."""
        task = self._retention_task
        if task is None:
            return
        self._retention_stop.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout=_RETENTION_STOP_SECONDS)
        except TimeoutError:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _flush_auth_failures(self) -> None:
        """At shutdown: every open window's summary, so no failed attempt goes unaccounted."""
        failures = self.ctx.auth_failures
        try:
            await failures.flush(self.ctx.auditor, self.ctx.sessions, final=True)
        except Exception as exc:  # noqa: BLE001 - shutting down anyway; say what was lost
            logger.error(
                "%d failed-authentication summaries could not be written at shutdown (%s)",
                failures.pending(),
                type(exc).__name__,
            )

    async def aclose(self) -> None:
        await self._stop_retention()
        for task in self._tasks:
            task.cancel()
        # Wait for them, so no periodic flush is still writing when the final one runs.
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Background turns are not waited for (the model may take minutes): their pollers stop,
        # and their leases run out for another replica, or this one restarted, to resume them.
        await self.ctx.polls.drain(timeout=0)
        await self._flush_auth_failures()
        # Replies the model already gave are stored (or their leases released) before we go.
        await self.ctx.tasks.drain(timeout=self.settings.turn_store_wait_seconds)
        await self.ctx.upstream.aclose()
        await self.engine.dispose()
        await self.ctx.expiry_keys.aclose()
        for close in reversed(self._closers):
            close()


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


async def _connect(url: str, variable: str = "DATABASE_URL", **pool: Any) -> AsyncEngine:
    engine = make_engine(url, variable=variable, **pool)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - reported by type: the message could carry the password
        await engine.dispose()
        what = "the key store" if variable == KEY_STORE_VARIABLE else "the database"
        raise ConfigurationError(
            f"cannot connect to {what} at {variable} ({type(exc).__name__}); "
            "check the URL and that the server is running"
        ) from None
    return engine


async def _open_key_store(url: str, sessions: async_sessionmaker[AsyncSession], keyring: Keyring) -> ExpiryKeyStore:
    """The key store at `url`, reachable, migrated, and proven to be this database's."""
    store = ExpiryKeyStore(await _connect(url, KEY_STORE_VARIABLE))
    try:
        await check_key_store_current(store.engine, url)
        await verify_key_store(store, sessions, keyring)
    except BaseException:
        await store.aclose()
        raise
    return store


async def build_runtime(settings: Settings, *, demo_keys: bool = True, verify_upstream: bool = True) -> Runtime:
    """The whole service from its settings; the CLI builds its runtime here too (without the demo
    keys, and without asking Gemini whether the key works: a CLI command does not call the model)."""
    settings.check()
    if not settings.deployment:
        # Before any secret is generated in the data dir: a zero-config run that cannot start
        # leaves nothing behind.
        from .embedded_postgres import check_installed

        check_installed()
    announce: list[str] = []
    closers: list[Any] = []
    # The secrets first: a deployment missing one stops here, before anything is started.
    keyring = load_keyring(settings, announce)
    if isinstance(keyring, Pkcs11Keyring):
        closers.append(keyring.close)  # its session, and the process's login to the token
        announce.append(f"KEKs in the HSM: {keyring.source}, versions {keyring.versions()}")
    pepper = load_pepper(settings, announce)
    signer = load_signer(settings, announce)
    retired_keys = load_retired_keys(settings, signer, announce)
    if not settings.upstream.configured and settings.deployment and not settings.use_simulator:
        raise ConfigurationError(
            "no Gemini credentials: set GEMINI_API_KEY (or GOOGLE_API_KEY, or the Vertex AI variables); "
            "with DATABASE_URL set the simulator runs only when asked for with CUSTODY_USE_SIMULATOR=true"
        )
    try:
        policy = load_policy(settings.policy_path)
    except PolicyError as exc:
        raise ConfigurationError(f"invalid policy: {exc}") from None
    announce.extend(media_body_warnings(policy, settings.max_body_bytes))

    url, key_store_url = settings.database_url, settings.key_store_url
    if url is None:
        from .embedded_postgres import start_embedded_postgres

        postgres = await asyncio.to_thread(start_embedded_postgres, settings.data_dir)
        closers.append(postgres.stop)
        url = postgres.url
        announce.append(f"EMBEDDED DEFAULT: no DATABASE_URL, using an embedded Postgres in {postgres.data_path}")
        await asyncio.to_thread(migrate, url)
        if key_store_url is None:
            key_store_url = await asyncio.to_thread(postgres.database_url, EMBEDDED_KEY_STORE)
            announce.append(
                f"EMBEDDED DEFAULT: no {KEY_STORE_VARIABLE}, keeping the expiry keys in the database "
                f"{EMBEDDED_KEY_STORE} of the same embedded Postgres (a backup of its data dir holds both)"
            )
        await asyncio.to_thread(migrate_key_store, key_store_url)
    elif key_store_url is None:
        raise ConfigurationError(
            f"{KEY_STORE_VARIABLE} is not set: with DATABASE_URL set, Custody needs a key store, a Postgres "
            "database of its own (on another server) for the expiry keys that make purges reach backups; "
            "create one and run `custody migrate`"
        )
    # The pool holds CUSTODY_DATABASE_POOL_SIZE connections, and as many again when a burst needs them.
    engine = await _connect(url, pool_size=settings.database_pool_size, max_overflow=settings.database_pool_size)
    await check_schema_current(engine, url)
    if warning := await _audit_role_warning(engine):
        announce.append(warning)
    sessions = make_sessions(engine)
    await verify_keyring(sessions, keyring, source=keyring_source(keyring))
    try:
        expiry_keys = await _open_key_store(key_store_url, sessions, keyring)
    except BaseException:
        await engine.dispose()
        raise
    announce.append(f"policy {settings.policy_path} ({policy.version}), routes: {', '.join(sorted(policy.routes))}")

    # The tracer and meter providers, side by side: explicit ones, never the global providers.
    provider = tracer_provider_from_env()
    closers.append(provider.shutdown)
    announce.append(describe())
    metrics_token = load_metrics_token(settings, announce)
    metrics = metrics_export_from_env(
        prometheus=metrics_token is not None, tenant_labels=settings.metrics_tenant_labels
    )
    closers.append(metrics.shutdown)
    announce.append(metrics.description)
    metrics.metrics.observe_pool(engine.sync_engine)

    if settings.upstream.configured:
        upstream = Upstream(
            settings.upstream,
            attempts=settings.upstream_attempts,
            timeout_seconds=settings.upstream_timeout_seconds,
            metrics=metrics.metrics,
            breaker_failures=settings.upstream_breaker_failures,
            breaker_open_seconds=settings.upstream_breaker_open_seconds,
        )
        if verify_upstream:
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
            metrics=metrics.metrics,
            breaker_failures=settings.upstream_breaker_failures,
            breaker_open_seconds=settings.upstream_breaker_open_seconds,
        )
        why = "CUSTODY_USE_SIMULATOR is set" if settings.use_simulator else "EMBEDDED DEFAULT: no GEMINI_API_KEY"
        announce.append(f"{why}, calling the local Gemini SIMULATOR at {simulator.base_url}")

    ctx = ServiceContext(
        sessions=sessions,
        keyring=keyring,
        policy=policy,
        upstream=upstream,
        auditor=Auditor(provider.get_tracer("custody"), signer, retired_keys, metrics=metrics.metrics),
        pepper=pepper,
        expiry_keys=expiry_keys,
        turn_lease_seconds=settings.turn_lease_seconds,
        turn_store_retry_seconds=settings.turn_store_retry_seconds,
        turn_store_wait_seconds=settings.turn_store_wait_seconds,
        provider_chain_max_age_seconds=settings.provider_chain_max_age_seconds,
        turn_deadline_seconds=settings.turn_deadline_seconds,
        background_poll_seconds=settings.background_poll_seconds,
        data_keys=DataKeyCache(settings.data_key_cache_size, settings.data_key_cache_seconds),
        auth_failures=AuthFailures(
            AuthFailureLimits(
                per_source=settings.auth_failure_limit,
                per_key=settings.auth_failure_key_limit,
                window_seconds=settings.auth_failure_window_seconds,
            )
        ),
        metrics=metrics.metrics,
    )
    runtime = Runtime(settings, ctx, engine, announce, metrics=metrics, metrics_token=metrics_token, _closers=closers)
    if not settings.deployment and demo_keys:
        runtime.demo_keys = await _issue_demo_keys(ctx)
    return runtime


async def _issue_demo_keys(ctx: ServiceContext) -> dict[str, str]:
    """The zero-config run's demo tenant, with a fresh key of each role printed at startup."""
    keys: dict[str, str] = {}
    async with ctx.sessions.begin() as session:
        if await session.scalar(select(Tenant).where(Tenant.name == DEMO_TENANT)) is None:
            await create_tenant(ctx.auditor, session, DEMO_TENANT, operator=None, via="zero-config")
        for role in ROLES:
            _, keys[role] = await issue_key(
                ctx.auditor, session, ctx.pepper, DEMO_TENANT, role, operator=None, via="zero-config"
            )
    return keys
