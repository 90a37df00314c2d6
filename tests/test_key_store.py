"""The key store: one expiry key per day, created once across replicas, destroyed for good, its schema its own, proven at startup to be this database's, and watched by /readyz."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, func, select

from service.api import create_app
from service.context import ServiceContext
from service.crypto import FileKeyring, LocalKeyring
from service.errors import ConfigurationError
from service.key_store import VERSION_TABLE, ExpiryKey, ExpiryKeyStore, KeyStoreBase, verify_key_store

from .conftest import asgi_transport, key_store_of

DAY = date(2031, 5, 17)


@pytest.fixture
async def stores(fresh_database: str) -> AsyncIterator[tuple[ExpiryKeyStore, ExpiryKeyStore]]:
    """Two handles on one empty key store, as two replicas have, neither caching for long."""
    first = ExpiryKeyStore.connect(key_store_of(fresh_database), cache_seconds=0)
    second = ExpiryKeyStore.connect(key_store_of(fresh_database), cache_seconds=0)
    yield first, second
    await first.aclose()
    await second.aclose()


async def test_replicas_asking_for_a_day_at_once_get_one_key(
    stores: tuple[ExpiryKeyStore, ExpiryKeyStore], ctx: ServiceContext
) -> None:
    """Twenty concurrent asks for the same day, from two replicas, all get the same key, and the store holds one row for the day, wrapped under the current KEK."""
    first, second = stores
    keys = await asyncio.gather(*(store.key_for(DAY, ctx.keyring) for store in (first, second) * 10))
    assert len(set(keys)) == 1
    assert len(keys[0]) == 32
    async with first.sessions() as session:
        rows = (
            await session.execute(select(ExpiryKey.day, ExpiryKey.kek_version, func.length(ExpiryKey.wrapped)))
        ).all()
    assert [tuple(row) for row in rows] == [(DAY, ctx.keyring.current_version, 40)]


async def test_a_destroyed_day_is_gone_for_every_replica(
    stores: tuple[ExpiryKeyStore, ExpiryKeyStore], ctx: ServiceContext
) -> None:
    """Once one replica destroys a day's key, neither it nor another replica (its cache expired) can get it back, and only the days before a given day are listed as due."""
    first, second = stores
    await first.key_for(DAY, ctx.keyring)
    await first.key_for(DAY + timedelta(days=1), ctx.keyring)
    assert await second.existing(DAY, ctx.keyring) is not None
    assert await first.days_before(DAY + timedelta(days=1)) == [DAY]
    assert await first.destroy(DAY)
    assert not await first.destroy(DAY)
    assert await first.existing(DAY, ctx.keyring) is None
    assert await second.existing(DAY, ctx.keyring) is None
    assert await first.days_before(DAY + timedelta(days=1)) == []


async def test_a_process_forgets_a_destroyed_key_once_its_cache_time_is_up(
    fresh_database: str, ctx: ServiceContext
) -> None:
    """A replica that cached a day's key before another destroyed it serves it from memory only until its cache time is up, then finds it gone."""
    url = key_store_of(fresh_database)
    caching, destroying = ExpiryKeyStore.connect(url, cache_seconds=0.5), ExpiryKeyStore.connect(url)
    try:
        assert await caching.key_for(DAY, ctx.keyring)
        await destroying.destroy(DAY)
        assert await caching.existing(DAY, ctx.keyring) is not None  # still in its memory
        await asyncio.sleep(0.6)
        assert await caching.existing(DAY, ctx.keyring) is None
    finally:
        await caching.aclose()
        await destroying.aclose()


async def test_key_store_models_match_its_migrations(ctx: ServiceContext) -> None:
    """The key store built by its own Alembic migrations has exactly the table and columns its models declare."""

    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True, "version_table": VERSION_TABLE})
        differences: list[Any] = compare_metadata(context, KeyStoreBase.metadata)  # alembic's diff tuples
        return differences

    async with ctx.expiry_keys.engine.connect() as connection:
        assert await connection.run_sync(diff) == []


async def test_a_key_store_whose_keys_the_keyring_cannot_unwrap_is_refused(
    stores: tuple[ExpiryKeyStore, ExpiryKeyStore], ctx: ServiceContext, tmp_path: Path
) -> None:
    """A key store holding keys wrapped by another keyring (another deployment's) is refused, naming the KEK version."""
    first, _ = stores
    LocalKeyring.generate(tmp_path / "other.json")
    await first.key_for(DAY, FileKeyring(tmp_path / "other.json"))
    with pytest.raises(ConfigurationError, match=r"cannot unwrap the expiry keys .*KEK version\(s\) 1"):
        await verify_key_store(first, ctx.sessions, ctx.keyring)


async def test_readyz_fails_while_the_key_store_is_unreachable(ctx: ServiceContext) -> None:
    """/readyz answers 503 with Retry-After, naming the key store, while the key store does not answer (and 200 with the reachable one)."""
    down = ExpiryKeyStore.connect("postgresql://postgres@127.0.0.1:1/keys?connect_timeout=2")
    try:
        for context, expected in ((ctx, 200), (dataclasses.replace(ctx, expiry_keys=down), 503)):
            transport = asgi_transport(create_app(context))
            async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
                response = await client.get("/readyz")
            assert response.status_code == expected, response.text
    finally:
        await down.aclose()
    assert response.json()["detail"] == "the key store is not reachable"
    assert response.headers["retry-after"]
