"""The key store's schema: its own Alembic environment (migrations/key_store), its own checks."""

from __future__ import annotations

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from ..config import MIGRATIONS_DIR
from ..database import parse_database_url
from ..errors import SchemaBehindError
from ._store import KEY_STORE_VARIABLE

__all__ = [
    "KEY_STORE_MIGRATIONS",
    "VERSION_TABLE",
    "check_key_store_current",
    "key_store_alembic_config",
    "migrate_key_store",
]

KEY_STORE_MIGRATIONS = MIGRATIONS_DIR / "key_store"
# Not `alembic_version`: should both URLs ever name one database, the two histories stay apart
# (and startup then refuses the pair, see `ExpiryKeyStore.holds_service_tables`).
VERSION_TABLE = "key_store_alembic_version"


def key_store_alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(KEY_STORE_MIGRATIONS))
    config.attributes["database_url"] = url
    return config


def migrate_key_store(url: str) -> None:
    """Bring the key store to its newest migration (`custody migrate` does both databases)."""
    from alembic import command

    parse_database_url(url, KEY_STORE_VARIABLE)
    command.upgrade(key_store_alembic_config(url), "head")


def _current_and_head(connection: Connection, url: str) -> tuple[str | None, str | None]:
    current = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()
    head = ScriptDirectory.from_config(key_store_alembic_config(url)).get_current_head()
    return current, head


async def check_key_store_current(engine: AsyncEngine, url: str) -> None:
    """Refuse to run on a key store whose schema is behind (or ahead of) this code."""
    async with engine.connect() as connection:
        current, head = await connection.run_sync(_current_and_head, url)
    if current != head:
        raise SchemaBehindError(current, head, variable=KEY_STORE_VARIABLE)
