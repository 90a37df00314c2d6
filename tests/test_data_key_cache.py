"""This replica's cache of unwrapped data keys: it spares the keyring's unwrap for a key opened a
moment ago, and never serves a key the row (or the expiry layer) would no longer give."""

from __future__ import annotations

import dataclasses

import httpx

from service.context import ServiceContext
from service.conversations import ConversationCipher, load_cipher
from service.crypto import DataKeyCache, Keyring, WrappedKey
from service.models import Conversation

from .api.helpers import open_conversation, take_turn
from .conftest import Tenant


class CountingKeyring:
    """The test's keyring, counting the unwraps that reach it (what a KMS or HSM would be asked)."""

    def __init__(self, inner: Keyring) -> None:
        self.inner = inner
        self.unwraps = 0

    @property
    def current_version(self) -> int:
        return self.inner.current_version

    def wrap(self, data_key: bytes) -> WrappedKey:
        return self.inner.wrap(data_key)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        self.unwraps += 1
        return self.inner.unwrap(wrapped)

    def versions(self) -> list[int]:
        return self.inner.versions()

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        return self.inner.rewrap(wrapped)

    def rotate(self) -> int:
        return self.inner.rotate()


class Ticking:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_key_is_served_only_for_the_blob_it_was_opened_from() -> None:
    """A rewrapped or resealed row (another blob) misses, and forgets the old key."""
    cache = DataKeyCache(size=10, ttl_seconds=60)
    cache.put("conv_a", b"blob-1", b"k" * 32)
    assert cache.get("conv_a", b"blob-1") == b"k" * 32
    assert cache.get("conv_a", b"blob-2") is None
    assert cache.get("conv_a", b"blob-1") is None
    assert "conv_a" not in cache


def test_keys_expire_after_their_ttl() -> None:
    clock = Ticking()
    cache = DataKeyCache(size=10, ttl_seconds=5, clock=clock)
    cache.put("conv_a", b"blob", b"k" * 32)
    clock.now += 4.9
    assert cache.get("conv_a", b"blob") == b"k" * 32
    clock.now += 0.2  # 5.1 s after it was opened: a hit does not extend its life
    assert cache.get("conv_a", b"blob") is None


def test_the_least_recently_used_key_goes_first() -> None:
    cache = DataKeyCache(size=2, ttl_seconds=60)
    cache.put("conv_a", b"a", b"a" * 32)
    cache.put("conv_b", b"b", b"b" * 32)
    assert cache.get("conv_a", b"a") is not None  # conv_b is now the least recently used
    cache.put("conv_c", b"c", b"c" * 32)
    assert len(cache) == 2
    assert "conv_b" not in cache
    assert cache.get("conv_a", b"a") is not None
    assert cache.get("conv_c", b"c") is not None


def test_a_zero_ttl_caches_nothing_and_drop_forgets() -> None:
    off = DataKeyCache(size=10, ttl_seconds=0)
    off.put("conv_a", b"blob", b"k" * 32)
    assert len(off) == 0
    cache = DataKeyCache(size=10, ttl_seconds=60)
    cache.put("conv_a", b"a", b"a" * 32)
    cache.put("conv_b", b"b", b"b" * 32)
    cache.drop("conv_a")
    assert "conv_a" not in cache
    assert "conv_b" in cache


def test_the_cache_never_shows_a_key_in_its_repr() -> None:
    cache = DataKeyCache(size=10, ttl_seconds=60)
    cache.put("conv_a", b"blob", b"\x01" * 32)
    assert "\\x01" not in repr(cache)
    assert "conv_a" not in repr(cache)


async def load(ctx: ServiceContext, conversation_id: str) -> ConversationCipher:
    async with ctx.sessions() as session:
        row = await session.get(Conversation, conversation_id)
        assert row is not None
        return await load_cipher(session, ctx, row)


async def test_the_keyring_is_asked_once_while_the_key_is_cached(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext
) -> None:
    """Loading a conversation's cipher again reuses the unwrapped key; without the cache (TTL 0) every load unwraps."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    keyring = CountingKeyring(ctx.keyring)
    cached = dataclasses.replace(ctx, keyring=keyring, data_keys=DataKeyCache(size=100, ttl_seconds=60))
    first = await load(cached, conversation)
    second = await load(cached, conversation)
    assert keyring.unwraps == 1
    assert first.data_key == second.data_key
    uncached = dataclasses.replace(ctx, keyring=keyring, data_keys=DataKeyCache(size=100, ttl_seconds=0))
    await load(uncached, conversation)
    await load(uncached, conversation)
    assert keyring.unwraps == 3


async def test_a_deleted_conversations_key_is_dropped_and_never_served(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext
) -> None:
    """The replica that shreds a data key forgets it at once; and a shredded key has no row, so no replica's cache is asked for it."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    assert conversation in ctx.data_keys  # the turn opened it
    deleted = await api.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())
    assert deleted.status_code == 200, deleted.text
    assert conversation not in ctx.data_keys
