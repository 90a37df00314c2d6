"""The expiry keys, in a database of their own: created on demand, cached, destroyed when due.

One random 256-bit key per UTC day, stored wrapped under the keyring's current KEK (so a copy of
the key store alone opens nothing). Any number of replicas may ask for a day's key at once: the
first insert wins (`ON CONFLICT DO NOTHING`) and everyone reads the row that won. Each process
keeps the keys it has used in memory, for `cache_seconds` at most, so a turn seldom pays a round
trip to the key store, and a key another replica destroyed leaves this one's memory soon after;
the process that destroys a key forgets it at once.

Nothing here decides which day may be destroyed or used: see service.conversations (sealing a data
key never uses a day that has passed) and service.retention (a day is destroyed once it has passed
and no data key is sealed under it any more).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date

from sqlalchemy import delete, func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from ..crypto import Keyring, KeyUnwrapError, WrappedKey, new_data_key
from ..database import make_engine, make_sessions
from ._models import ExpiryKey

__all__ = ["KEY_STORE_VARIABLE", "ExpiryKeyStore", "RewrapCount"]

KEY_STORE_VARIABLE = "CUSTODY_KEY_STORE_URL"
_CACHE_SECONDS = 600.0


@dataclass(frozen=True)
class RewrapCount:
    """How many expiry keys a rotation rewrapped, and how many it could not unwrap."""

    rewrapped: int
    unreadable: int


class ExpiryKeyStore:
    """The key store's expiry keys (see the module docstring). Methods take the keyring: the
    store holds only wrapped keys, and the keyring is the one the caller runs with."""

    def __init__(self, engine: AsyncEngine, *, cache_seconds: float = _CACHE_SECONDS) -> None:
        self.engine = engine
        self.sessions: async_sessionmaker[AsyncSession] = make_sessions(engine)
        self._cache_seconds = cache_seconds
        # day -> (key, when it was read, on time.monotonic()); plaintext keys, never in a repr.
        self._cache: dict[date, tuple[bytes, float]] = {}

    @classmethod
    def connect(cls, url: str, *, cache_seconds: float = _CACHE_SECONDS) -> ExpiryKeyStore:
        """A store on CUSTODY_KEY_STORE_URL (no connection is made until it is used)."""
        return cls(make_engine(url, variable=KEY_STORE_VARIABLE), cache_seconds=cache_seconds)

    def __repr__(self) -> str:
        return f"ExpiryKeyStore({len(self._cache)} keys cached)"

    async def key_for(self, day: date, keyring: Keyring) -> bytes:
        """The expiry key of `day`, created if it has none yet (race-free across replicas). Only
        ever asked for a day that has not passed: a destroyed day is never made again."""
        key = self._cached(day)
        if key is not None:
            return key
        wrapped = keyring.wrap(new_data_key())
        async with self.sessions.begin() as session:
            await session.execute(
                insert(ExpiryKey)
                .values(day=day, kek_version=wrapped.kek_version, wrapped=wrapped.wrapped)
                .on_conflict_do_nothing(index_elements=["day"])
            )
            # Read whatever won: ours, or the row a concurrent replica committed first.
            row = (
                await session.execute(select(ExpiryKey.kek_version, ExpiryKey.wrapped).where(ExpiryKey.day == day))
            ).one()
        return self._remember(day, keyring.unwrap(WrappedKey(row.kek_version, row.wrapped)))

    async def existing(self, day: date, keyring: Keyring) -> bytes | None:
        """The expiry key of `day`, or None if it does not exist (destroyed, or never made)."""
        key = self._cached(day)
        if key is not None:
            return key
        async with self.sessions() as session:
            row = (
                await session.execute(select(ExpiryKey.kek_version, ExpiryKey.wrapped).where(ExpiryKey.day == day))
            ).one_or_none()
        if row is None:
            return None
        return self._remember(day, keyring.unwrap(WrappedKey(row.kek_version, row.wrapped)))

    async def days_before(self, day: date) -> list[date]:
        """The days before `day` that still have a key, oldest first."""
        async with self.sessions() as session:
            return list(await session.scalars(select(ExpiryKey.day).where(ExpiryKey.day < day).order_by(ExpiryKey.day)))

    async def days(self, among: list[date]) -> set[date]:
        """Which of `among` have a key."""
        if not among:
            return set()
        async with self.sessions() as session:
            return set(await session.scalars(select(ExpiryKey.day).where(ExpiryKey.day.in_(among))))

    async def destroy(self, day: date) -> bool:
        """Delete the expiry key of `day`; False if it was gone already."""
        self._cache.pop(day, None)
        async with self.sessions.begin() as session:
            deleted = await session.scalar(delete(ExpiryKey).where(ExpiryKey.day == day).returning(ExpiryKey.day))
        self._cache.pop(day, None)  # a concurrent reader may have put it back meanwhile
        return deleted is not None

    async def rewrap(self, keyring: Keyring) -> RewrapCount:
        """Rewrap every expiry key not under the keyring's current KEK (keyring rotation), in one
        transaction: there is one key per day, a few thousand at most."""
        target = keyring.current_version
        rewrapped = unreadable = 0
        async with self.sessions.begin() as session:
            rows = (
                await session.scalars(
                    select(ExpiryKey).where(ExpiryKey.kek_version != target).order_by(ExpiryKey.day).with_for_update()
                )
            ).all()
            for row in rows:
                try:
                    wrapped = keyring.rewrap(WrappedKey(row.kek_version, row.wrapped))
                except KeyUnwrapError:
                    unreadable += 1
                    continue
                row.kek_version, row.wrapped = wrapped.kek_version, wrapped.wrapped
                rewrapped += 1
        return RewrapCount(rewrapped, unreadable)

    async def count_not_under(self, kek_version: int) -> int:
        """How many expiry keys are wrapped under another KEK version than `kek_version`."""
        async with self.sessions() as session:
            return int(
                await session.scalar(
                    select(func.count()).select_from(ExpiryKey).where(ExpiryKey.kek_version != kek_version)
                )
                or 0
            )

    async def unreadable_versions(self, keyring: Keyring) -> list[int]:
        """KEK versions of the stored keys that this keyring cannot unwrap (one key tried per
        version): a key store that belongs to another keyring, or to another deployment."""
        failing = []
        async with self.sessions() as session:
            rows = await session.execute(
                text("SELECT DISTINCT ON (kek_version) kek_version, wrapped FROM expiry_keys ORDER BY kek_version, day")
            )
            for version, wrapped in rows:
                try:
                    keyring.unwrap(WrappedKey(version, wrapped))
                except KeyUnwrapError:
                    failing.append(version)
        return failing

    async def holds_service_tables(self) -> bool:
        """Whether this database is the service's own (it has `data_keys`): a key store there
        would be in every backup of the service's database, which defeats its purpose."""
        async with self.sessions() as session:
            return bool(await session.scalar(select(func.to_regclass("public.data_keys").is_not(None))))

    async def ping(self) -> None:
        """Raises if the key store cannot be reached."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        self._cache.clear()
        await self.engine.dispose()

    def forget(self) -> None:
        """Drop every cached key (tests, and a process that wants none in memory)."""
        self._cache.clear()

    def _cached(self, day: date) -> bytes | None:
        entry = self._cache.get(day)
        if entry is None:
            return None
        key, read_at = entry
        if time.monotonic() - read_at > self._cache_seconds:
            del self._cache[day]
            return None
        return key

    def _remember(self, day: date, key: bytes) -> bytes:
        self._cache[day] = (key, time.monotonic())
        return key
