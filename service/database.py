"""The database connection, and the migration state the service insists on."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote

import asyncpg
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, select
from sqlalchemy.engine import Connection, CursorResult
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from .config import MIGRATIONS_DIR
from .errors import ConfigurationError, SchemaBehindError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "PostgresTarget",
    "alembic_config",
    "check_schema_current",
    "database_now",
    "make_engine",
    "make_sessions",
    "migrate",
    "parse_database_url",
    "read_only_session",
    "run_sql",
]

# asyncpg would wait a minute (and libpq forever) for a server that does not answer; a dead
# database should stop startup or `custody migrate` within seconds. The URL may set its own.
DEFAULT_CONNECT_TIMEOUT = 5.0
_SCHEMES = {"postgresql", "postgres"}
# Only a scheme of this shape is echoed back in the error; anything else may be a mangled secret.
_SCHEME_SHAPE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]{0,30}")
_ACCEPTED = (
    "a postgresql:// (or postgres://) URL in libpq's form, "
    "e.g. postgresql://user:password@host:5432/dbname?sslmode=require"
)


@dataclass(frozen=True)
class PostgresTarget:
    """Where to connect: the DSN as asyncpg's own parser takes it, and the connect timeout."""

    dsn: str = field(repr=False)  # it may hold the password
    timeout: float | None  # seconds; None waits indefinitely (connect_timeout=0, as in libpq)


def parse_database_url(url: str, variable: str = "DATABASE_URL") -> PostgresTarget:
    """DATABASE_URL (or `variable`: CUSTODY_KEY_STORE_URL) in libpq's URL form, made ready for
    `asyncpg.connect`; messages name `variable`.

    asyncpg's DSN parser understands libpq's parameters (sslmode, sslrootcert, sslcert, sslkey,
    host naming a socket directory, port, options, application_name, target_session_attrs...),
    whereas SQLAlchemy's asyncpg dialect would pass each one to connect() as a keyword argument and
    fail. So the URL goes to asyncpg whole, less a `+asyncpg` driver marker and connect_timeout
    (which asyncpg would send to the server as a setting it does not have).
    """
    scheme, separator, rest = url.strip().partition("://")
    if not separator or scheme.lower().removesuffix("+asyncpg") not in _SCHEMES:
        # The URL itself is never repeated: it may carry the password.
        got = f", not {scheme}://" if separator and _SCHEME_SHAPE.fullmatch(scheme) else ""
        raise ConfigurationError(f"{variable} must be {_ACCEPTED}{got}")
    location, _, query = rest.partition("?")
    timeout: float | None = DEFAULT_CONNECT_TIMEOUT
    kept: list[str] = []
    for item in query.split("&") if query else []:
        name, _, value = item.partition("=")
        if unquote(name) == "connect_timeout":
            timeout = _connect_timeout(unquote(value), variable)
        elif item:
            kept.append(item)
    dsn = "postgresql://" + location + ("?" + "&".join(kept) if kept else "")
    return PostgresTarget(dsn=dsn, timeout=timeout)


def _connect_timeout(value: str, variable: str) -> float | None:
    """libpq's connect_timeout: whole seconds, at least 2; zero or negative waits indefinitely."""
    try:
        seconds = int(value)
    except ValueError:
        raise ConfigurationError(f"{variable}: connect_timeout must be a whole number of seconds") from None
    return None if seconds <= 0 else float(max(seconds, 2))


def make_engine(url: str, *, variable: str = "DATABASE_URL", **options: Any) -> AsyncEngine:
    """An engine on DATABASE_URL (or the key store's URL, named `variable` in messages); a URL
    that is not Postgres's is refused here, before any connect."""
    target = parse_database_url(url, variable)

    async def connect() -> Any:
        return await asyncpg.connect(target.dsn, timeout=target.timeout)

    # The URL here only picks the dialect: every connection comes from `connect`.
    return create_async_engine("postgresql+asyncpg://", async_creator=connect, pool_pre_ping=True, **options)


def make_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@asynccontextmanager
async def read_only_session(sessions: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """A session for a single read on a connection in autocommit: no BEGIN and ROLLBACK around it,
    two round trips fewer than a transaction (authentication does one read per request)."""
    bind = sessions.kw.get("bind")
    if not isinstance(bind, AsyncEngine):
        raise TypeError("the session factory is not bound to an engine")
    async with bind.connect() as connection:
        await connection.execution_options(isolation_level="AUTOCOMMIT")
        async with AsyncSession(bind=connection, expire_on_commit=False) as session:
            yield session


async def run_sql(session: AsyncSession, sql: str, *parameters: Any) -> CursorResult[Any]:
    """Run SQL written for the driver (`$1`-style parameters) in the session's transaction: for
    the turn path's hot statements, which skip SQLAlchemy's statement building and the ORM, and
    which asyncpg prepares once per connection. Errors come back as SQLAlchemy's, as from any
    other statement (a lost connection invalidates it in the pool, a constraint is an
    IntegrityError)."""
    connection = await session.connection()
    return await connection.exec_driver_sql(sql, parameters)


async def database_now(session: AsyncSession) -> datetime:
    """The database's clock: leases compare against one clock, whichever replica asks."""
    now = await session.scalar(select(func.now()))
    if not isinstance(now, datetime):
        raise TypeError(f"now() answered {type(now).__name__}, not a timestamp")
    return now


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["database_url"] = url
    return config


def migrate(url: str) -> None:
    """Bring the database to the newest migration (`custody migrate`)."""
    from alembic import command

    # Refuse a malformed URL with its message before Alembic gets to it.
    parse_database_url(url)
    command.upgrade(alembic_config(url), "head")


def _current_and_head(connection: Connection, url: str) -> tuple[str | None, str | None]:
    current = MigrationContext.configure(connection).get_current_revision()
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    return current, head


async def check_schema_current(engine: AsyncEngine, url: str) -> None:
    """Refuse to run on a database whose schema is behind (or ahead of) this code."""
    async with engine.connect() as connection:
        current, head = await connection.run_sync(_current_and_head, url)
    if current != head:
        raise SchemaBehindError(current, head)
