"""Startup's proof that the key store is this database's: the analogue of the keyring sentinels.

Pointed at the wrong key store (another deployment's, an empty one, one restored from an older
backup), the service would answer 500 for every conversation sealed under a day whose key is not
there, while /readyz said ready; and pointed at its own database, the key store would sit in every
backup it exists to stay out of. Startup refuses all of these with a message.
"""

from __future__ import annotations

from datetime import date

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..crypto import Keyring
from ..errors import ConfigurationError
from ._store import KEY_STORE_VARIABLE, ExpiryKeyStore

__all__ = ["days_in_use", "verify_key_store"]

# Every distinct expiry_day in data_keys, one index probe per day (a loose index scan), so the
# check costs the number of days, not of conversations.
_DAYS_IN_USE = text(
    """
    WITH RECURSIVE days(day) AS (
        (SELECT expiry_day FROM data_keys WHERE expiry_day IS NOT NULL ORDER BY expiry_day LIMIT 1)
        UNION ALL
        SELECT (SELECT d.expiry_day FROM data_keys d WHERE d.expiry_day > days.day ORDER BY d.expiry_day LIMIT 1)
        FROM days WHERE days.day IS NOT NULL
    )
    SELECT day FROM days WHERE day IS NOT NULL
    """
)


async def days_in_use(session: AsyncSession) -> list[date]:
    """The days some data key in the service's database is sealed under, ascending."""
    return list((await session.execute(_DAYS_IN_USE)).scalars())


async def verify_key_store(store: ExpiryKeyStore, sessions: async_sessionmaker[AsyncSession], keyring: Keyring) -> None:
    """Refuse a key store that is the service's own database, whose keys this keyring cannot
    unwrap, or that lacks the key of a day some data key is sealed under."""
    if await store.holds_service_tables():
        raise ConfigurationError(
            f"{KEY_STORE_VARIABLE} names the service's own database (it holds data_keys): the key store must be "
            "a database of its own, on another server, so that backups of the one never hold the other"
        )
    if failing := await store.unreadable_versions(keyring):
        versions = ", ".join(str(v) for v in failing)
        raise ConfigurationError(
            f"the keyring cannot unwrap the expiry keys in the key store at {KEY_STORE_VARIABLE} (KEK version(s) "
            f"{versions}): it is another deployment's key store, or the keyring is not this one's"
        )
    async with sessions() as session:
        in_use = await days_in_use(session)
    missing = sorted(set(in_use) - await store.days(in_use))
    if missing:
        # A runner may have moved a day's data keys on and destroyed its key between the two
        # reads: only a day that still has data keys counts.
        async with sessions() as session:
            missing = sorted(set(missing) & set(await days_in_use(session)))
    if missing:
        raise ConfigurationError(
            f"the key store at {KEY_STORE_VARIABLE} has no expiry key for {len(missing)} day(s) that data keys in "
            f"the database are sealed under (the first: {missing[0].isoformat()}): it is not this database's key "
            "store, or it lost keys (restored from an older backup?); point the variable at the right key store"
        )
