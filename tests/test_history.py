"""Stored steps are bound to their place: moved or altered ciphertext does not decrypt."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select, text

from service.context import ServiceContext
from service.conversations import load_cipher, read_steps
from service.crypto import DecryptionError
from service.models import Conversation

from .api.helpers import open_conversation, take_turn
from .conftest import NewTenant, Tenant


async def _history(ctx: ServiceContext, conversation_id: str) -> list[Any]:
    async with ctx.sessions() as session:
        conversation = await session.scalar(select(Conversation).where(Conversation.id == conversation_id))
        assert conversation is not None
        cipher = await load_cipher(session, ctx, conversation)
        return await read_steps(session, cipher)


async def _sql(ctx: ServiceContext, statement: str, **params: Any) -> None:
    async with ctx.sessions.begin() as session:
        await session.execute(text(statement), params)


async def _two_turn_conversation(api: httpx.AsyncClient, tenant: Tenant) -> str:
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "first")
    await take_turn(api, tenant.headers(), conversation, "second")
    return conversation


async def test_intact_history_decrypts(api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext) -> None:
    """Untouched rows decrypt to the steps in order (the control for the tests below)."""
    conversation = await _two_turn_conversation(api, tenant)
    steps = await _history(ctx, conversation)
    assert [p for p, _, _ in steps] == list(range(8))


async def test_step_moved_to_another_position_fails(
    api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext
) -> None:
    """Swapping two steps' ciphertexts inside one conversation is detected."""
    conversation = await _two_turn_conversation(api, tenant)
    await _sql(
        ctx,
        """UPDATE steps SET sealed = (SELECT sealed FROM steps WHERE conversation_id = :c AND position = 0)
                       WHERE conversation_id = :c AND position = 4""",
        c=conversation,
    )
    with pytest.raises(DecryptionError):
        await _history(ctx, conversation)


@pytest.mark.parametrize("same_tenant", [True, False])
async def test_step_moved_to_another_conversation_fails_even_with_its_key(
    api: httpx.AsyncClient, new_tenant: NewTenant, ctx: ServiceContext, same_tenant: bool
) -> None:
    """A step and its data key copied into another conversation (same or other tenant) still fail: the AAD binds them."""
    owner: Tenant = await new_tenant()
    other: Tenant = owner if same_tenant else await new_tenant()
    source = await _two_turn_conversation(api, owner)
    target = await _two_turn_conversation(api, other)
    await _sql(
        ctx,
        """UPDATE data_keys SET wrapped = (SELECT wrapped FROM data_keys WHERE conversation_id = :s),
                       kek_version = (SELECT kek_version FROM data_keys WHERE conversation_id = :s)
                       WHERE conversation_id = :t""",
        s=source,
        t=target,
    )
    await _sql(
        ctx,
        """UPDATE steps SET sealed = (SELECT sealed FROM steps WHERE conversation_id = :s AND position = 0)
                       WHERE conversation_id = :t AND position = 0""",
        s=source,
        t=target,
    )
    with pytest.raises(DecryptionError):
        await _history(ctx, target)


async def test_flipped_bit_in_a_stored_step_fails(api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext) -> None:
    """One flipped bit in a stored ciphertext is detected."""
    conversation = await _two_turn_conversation(api, tenant)
    await _sql(
        ctx,
        """UPDATE steps SET sealed = set_byte(sealed, 20, get_byte(sealed, 20) # 1)
                       WHERE conversation_id = :c AND position = 2""",
        c=conversation,
    )
    with pytest.raises(DecryptionError):
        await _history(ctx, conversation)


async def test_relabelled_key_version_fails(api: httpx.AsyncClient, tenant: Tenant, ctx: ServiceContext) -> None:
    """Changing a step's recorded key version breaks its authentication."""
    conversation = await _two_turn_conversation(api, tenant)
    await _sql(
        ctx,
        "UPDATE steps SET key_version = key_version + 1 WHERE conversation_id = :c AND position = 1",
        c=conversation,
    )
    with pytest.raises(DecryptionError):
        await _history(ctx, conversation)
