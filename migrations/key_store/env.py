"""Alembic environment of the key store (CUSTODY_KEY_STORE_URL): its own metadata, its own version
table, one transaction per migration, under an advisory lock (service/alembic_environment.py)."""

from __future__ import annotations

from service.alembic_environment import run_environment
from service.key_store import KEY_STORE_VARIABLE, VERSION_TABLE, KeyStoreBase

# Not the service database's lock: the two may live on one server.
MIGRATION_LOCK = 0x6375_7374_6B65_7973  # "custkeys"

run_environment(KeyStoreBase.metadata, lock=MIGRATION_LOCK, variable=KEY_STORE_VARIABLE, version_table=VERSION_TABLE)
