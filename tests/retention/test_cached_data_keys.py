"""A cached data key is served only while the expiry key of its day exists, as without the cache."""

from __future__ import annotations

import dataclasses
from datetime import date

import pytest
from sqlalchemy import text

from service.crypto import DataKeyCache
from service.errors import ExpiryKeyDestroyed

from ..test_data_key_cache import load
from .conftest import RetentionService


async def test_a_key_under_a_destroyed_expiry_day_is_not_served_from_the_cache(retention: RetentionService) -> None:
    """Once the expiry key of the day a data key is sealed under is destroyed, the cache does not keep the conversation readable."""
    conversation = await retention.open("patient-intake", ["phi"])
    await retention.turn(conversation, "hello")
    ctx = dataclasses.replace(retention.ctx, data_keys=DataKeyCache(size=100, ttl_seconds=600))
    await load(ctx, conversation)
    assert conversation in ctx.data_keys
    async with retention.engine.connect() as connection:
        day = (
            await connection.execute(
                text("SELECT expiry_day FROM data_keys WHERE conversation_id = :c"), {"c": conversation}
            )
        ).scalar_one()
    assert isinstance(day, date)
    assert await ctx.expiry_keys.destroy(day)
    with pytest.raises(ExpiryKeyDestroyed):
        await load(ctx, conversation)
