"""The database connection, and the migration state the service insists on."""

from __future__ import annotations

from datetime import datetime

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from .config import REPO_ROOT
from .errors import SchemaBehindError

__all__ = [
    "database_now",
    "alembic_config",
    "async_url",
    "check_schema_current",
    "make_engine",
    "make_sessions",
    "migrate",
]


def async_url(url: str) -> str:
    """`postgresql://…` as the asyncpg dialect wants it."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+asyncpg://" + url[len(prefix) :]
    raise ValueError("DATABASE_URL must be a postgresql:// URL")


def make_engine(url: str, **options: object) -> AsyncEngine:
    return create_async_engine(async_url(url), pool_pre_ping=True, **options)


def make_sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def database_now(session: AsyncSession) -> datetime:
    """The database's clock: leases compare against one clock, whichever replica asks."""
    now = await session.scalar(select(func.now()))
    assert isinstance(now, datetime)
    return now


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(REPO_ROOT / "migrations"))
    config.attributes["database_url"] = url
    return config


def migrate(url: str) -> None:
    """Bring the database to the newest migration (`custody migrate`)."""
    from alembic import command

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
