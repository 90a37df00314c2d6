"""The key store: the expiry keys (one per UTC day) in a database of their own, which make
crypto-shredding reach backups of the service's database."""

from ._checks import days_in_use, verify_key_store
from ._models import ExpiryKey, KeyStoreBase
from ._schema import (
    KEY_STORE_MIGRATIONS,
    VERSION_TABLE,
    check_key_store_current,
    key_store_alembic_config,
    migrate_key_store,
)
from ._store import KEY_STORE_VARIABLE, ExpiryKeyStore, RewrapCount

__all__ = [
    "KEY_STORE_MIGRATIONS",
    "KEY_STORE_VARIABLE",
    "VERSION_TABLE",
    "ExpiryKey",
    "ExpiryKeyStore",
    "KeyStoreBase",
    "RewrapCount",
    "check_key_store_current",
    "days_in_use",
    "key_store_alembic_config",
    "migrate_key_store",
    "verify_key_store",
]
