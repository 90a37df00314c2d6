"""Alembic environment: async engine, one transaction per migration, under an advisory lock."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from service.database import make_engine
from service.models import Base

# Several replicas may start at once; only one migrates, the others wait and find nothing to do.
MIGRATION_LOCK = 0x6375_7374_6F64_79  # "custody"


def _run(connection: Connection) -> None:
    connection.execute(text("SET lock_timeout = '10s'"))
    connection.execute(text("SET statement_timeout = '5min'"))
    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
    try:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            transaction_per_migration=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    except BaseException:
        # A failed migration leaves the transaction aborted; roll back so that the unlock below
        # can run and the real error is the one reported.
        connection.rollback()
        raise
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
        connection.commit()


async def _main(url: str) -> None:
    # The service's own engine, so that every DATABASE_URL form it accepts migrates too; one
    # connection, not pooled.
    engine = make_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
    finally:
        await engine.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    url = context.config.attributes.get("database_url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no database URL: pass it as Config.attributes['database_url'] or sqlalchemy.url")
    asyncio.run(_main(url))
