"""Alembic environment of the key store (CUSTODY_KEY_STORE_URL): its own metadata, its own version
table, one transaction per migration, under an advisory lock (replicas may all run it)."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.pool import NullPool

from service.database import make_engine
from service.key_store import KEY_STORE_VARIABLE, VERSION_TABLE, KeyStoreBase

# Not the service database's lock: the two may live on one server.
MIGRATION_LOCK = 0x6375_7374_6B65_7973  # "custkeys"


def _run(connection: Connection) -> None:
    connection.execute(text("SET lock_timeout = '10s'"))
    connection.execute(text("SET statement_timeout = '5min'"))
    connection.execute(text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
    try:
        context.configure(
            connection=connection,
            target_metadata=KeyStoreBase.metadata,
            version_table=VERSION_TABLE,
            transaction_per_migration=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()
    except BaseException:
        connection.rollback()
        raise
    finally:
        connection.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
        connection.commit()


async def _main(url: str) -> None:
    engine = make_engine(url, variable=KEY_STORE_VARIABLE, poolclass=NullPool)
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
        raise RuntimeError("no key store URL: pass it as Config.attributes['database_url'] or sqlalchemy.url")
    asyncio.run(_main(url))
