"""What both Alembic environments run (the service database's, `migrations/env.py`, and the key
store's, `migrations/key_store/env.py`): the service's own engine, one transaction per migration,
timeouts, and an advisory lock so that replicas starting at once migrate one at a time."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import MetaData, text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from .database import make_engine

__all__ = ["run_environment"]


def run_environment(
    metadata: MetaData, *, lock: int, variable: str = "DATABASE_URL", version_table: str = "alembic_version"
) -> None:
    """Run the migrations of `metadata` on the connection Alembic was given, or on the URL it was
    given (`variable` names that URL in messages), holding advisory lock `lock`."""

    def run(connection: Connection) -> None:
        connection.execute(text("SET lock_timeout = '10s'"))
        connection.execute(text("SET statement_timeout = '5min'"))
        connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": lock})
        try:
            context.configure(
                connection=connection,
                target_metadata=metadata,
                version_table=version_table,
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
            connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": lock})
            connection.commit()

    async def run_on(url: str) -> None:
        # The service's own engine, so that every URL form it accepts migrates too; one
        # connection, not pooled.
        engine = make_engine(url, variable=variable, poolclass=NullPool)
        try:
            async with engine.connect() as connection:
                await connection.run_sync(run)
        finally:
            await engine.dispose()

    connection = context.config.attributes.get("connection")
    if connection is not None:
        run(connection)
        return
    url = context.config.attributes.get("database_url") or context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(f"no {variable}: pass it as Config.attributes['database_url'] or sqlalchemy.url")
    asyncio.run(run_on(url))
