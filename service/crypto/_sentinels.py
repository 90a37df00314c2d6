"""Proof that the configured keyring is the one this database's data keys are wrapped with.

Each KEK version that has been current leaves a sentinel: a random key wrapped under it, stored in
the database. Unwrapping every sentinel is cheap and proves the keyring holds each version the
data keys may name, with the right bytes. Startup refuses a keyring that fails (instead of
answering 500 for every existing conversation), and /readyz reports it while the service runs.
"""

from __future__ import annotations

import secrets

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..errors import ConfigurationError
from ..models import KeyringSentinel
from ._keyring import Keyring, KeyringError, WrappedKey

__all__ = ["ensure_current_sentinel", "unreadable_versions", "verify_keyring"]

_SENTINEL_BYTES = 32  # the size of a data key, so it wraps exactly as one does


async def unreadable_versions(session: AsyncSession, keyring: Keyring) -> list[int]:
    """KEK versions whose sentinel this keyring cannot unwrap (empty when all is well)."""
    failing = []
    for sentinel in await session.scalars(select(KeyringSentinel).order_by(KeyringSentinel.kek_version)):
        try:
            keyring.unwrap(WrappedKey(sentinel.kek_version, sentinel.wrapped))
        except KeyringError:
            failing.append(sentinel.kek_version)
    return failing


async def ensure_current_sentinel(session: AsyncSession, keyring: Keyring) -> None:
    """Leave a sentinel for the current KEK version, if it has none yet."""
    wrapped = keyring.wrap(secrets.token_bytes(_SENTINEL_BYTES))
    await session.execute(
        insert(KeyringSentinel)
        .values(kek_version=wrapped.kek_version, wrapped=wrapped.wrapped)
        .on_conflict_do_nothing(index_elements=["kek_version"])
    )


async def verify_keyring(sessions: async_sessionmaker[AsyncSession], keyring: Keyring, *, source: str) -> None:
    """At startup: refuse a keyring that cannot unwrap every sentinel; then leave one for the
    current version. `source` names the keyring in the message (a path, never key bytes)."""
    async with sessions.begin() as session:
        failing = await unreadable_versions(session, keyring)
        if failing:
            versions = ", ".join(str(v) for v in failing)
            raise ConfigurationError(
                f"the keyring {source} cannot unwrap the data keys this database holds under KEK "
                f"version(s) {versions}: it is not the keyring they were wrapped with, or it lost "
                "those versions; point CUSTODY_KEYRING at the right keyring file, or the CUSTODY_PKCS11_* "
                "settings at the token that holds them"
            )
        await ensure_current_sentinel(session, keyring)
