"""A conversation's data key row: made, opened, and kept sealed under the day of its deadline.

A conversation with a deadline (`purge_at`) has its KEK-wrapped data key sealed once more under the
expiry key of one UTC day (service.crypto's expiry layer; the keys are in service.key_store):

- the day of its `purge_at`, or, once that day has passed (a held conversation, one a turn kept
  busy, a purge that failed), the day after today;
- whenever `purge_at` moves to another day (a turn, a class the detectors add, a policy change),
  the row is resealed to the new day in the same transaction; the data key itself never changes,
  so steps stay as they were sealed;
- a conversation without a deadline has no expiry layer (its data key is under the KEK alone).

The retention runner destroys a day's expiry key once the day has passed, after moving every data
key still under it (service.retention). For that to be safe, no data key may be sealed under a day
while the runner destroys it. Two things see to it: a data key is never sealed under a day that
has passed (the rule above), and sealing holds a shared advisory lock on its day until the
transaction ends, taken before reading the clock it checks the day against, while the runner takes
the same lock exclusively for its last look at the day's rows. So a data key sealed just before
midnight is either committed, and found by the runner, or sees that its day has passed, and picks
the next one. Row locks order the rest: every writer locks the data key row before resealing it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any, Final

from sqlalchemy import Date, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from ..clock import Clock
from ..context import ServiceContext
from ..crypto import WrappedKey, new_data_key, open_data_key_layer, seal_data_key_layer
from ..errors import ExpiryKeyDestroyed
from ..models import Conversation, DataKey
from ._history import ConversationCipher

__all__ = [
    "DAY_LOCK_CLASS",
    "align_data_keys",
    "create_cipher",
    "load_cipher",
    "reseal",
    "seal_day_for",
    "unsealed",
    "utc_day",
    "utc_today",
]

# The first key of the two-key advisory locks on a day (the second is the day's ordinal); the
# two-key and one-key (bigint) lock spaces never collide.
DAY_LOCK_CLASS: Final = 0x6375_7374  # "cust"


def utc_day(moment: Any) -> ColumnElement[date]:
    """The UTC day of a timestamptz, in SQL."""
    return cast(func.timezone("UTC", moment), Date)


def utc_today(clock: Clock) -> ColumnElement[date]:
    """Today (UTC) by `clock`, as the statement runs."""
    return utc_day(clock.current())


def seal_day_for(purge_day: date | None, today: date) -> date | None:
    """The day a data key is sealed under: its deadline's day while that has not passed, else the
    day after today; None (no expiry layer) without a deadline."""
    if purge_day is None:
        return None
    return purge_day if purge_day >= today else today + timedelta(days=1)


async def _today(session: AsyncSession, clock: Clock) -> date:
    value = await session.scalar(select(utc_today(clock)))
    if not isinstance(value, date):
        raise TypeError(f"the clock answered {type(value).__name__}, not a day")
    return value


async def _hold_seal_day(
    session: AsyncSession, clock: Clock, purge_day: date | None, now: date, held: set[date] | None = None
) -> date | None:
    """The day to seal under (see `seal_day_for`), locked shared until the transaction ends and
    checked against the clock read after the lock, so no runner can be destroying it. `held`
    remembers the days this transaction holds already: once held and checked, a day stays safe
    until the commit (the runner's exclusive lock waits for it)."""
    if purge_day is None:
        return None
    while True:
        day = purge_day if purge_day >= now else now + timedelta(days=1)  # seal_day_for, not None
        if held is not None and day in held:
            return day
        await session.execute(select(func.pg_advisory_xact_lock_shared(DAY_LOCK_CLASS, day.toordinal())))
        now = await _today(session, clock)
        if day >= now:
            if held is not None:
                held.add(day)
            return day
        # Midnight passed between the two reads of the clock: the day may be on its way out.


async def unsealed(ctx: ServiceContext, row: DataKey) -> WrappedKey:
    """The KEK-wrapped data key of a row: its expiry layer opened, if it has one. Raises
    `ExpiryKeyDestroyed` when the day's key is gone (and `DecryptionError` for a bad blob)."""
    if row.expiry_day is None:
        return WrappedKey(row.kek_version, row.wrapped)
    key = await ctx.expiry_keys.existing(row.expiry_day, ctx.keyring)
    if key is None:
        raise ExpiryKeyDestroyed(row.expiry_day.isoformat())
    return open_data_key_layer(
        key, row.wrapped, conversation_id=row.conversation_id, day=row.expiry_day, kek_version=row.kek_version
    )


async def _sealed(ctx: ServiceContext, conversation_id: str, wrapped: WrappedKey, day: date | None) -> bytes:
    if day is None:
        return wrapped.wrapped
    key = await ctx.expiry_keys.key_for(day, ctx.keyring)
    return seal_data_key_layer(key, conversation_id=conversation_id, day=day, wrapped=wrapped)


async def create_cipher(
    session: AsyncSession, ctx: ServiceContext, tenant_id: str, conversation_id: str
) -> ConversationCipher:
    """A fresh random data key for a new conversation (its row flushed, deadline and all), stored
    wrapped by the current KEK and sealed under its deadline's day."""
    data_key = new_data_key()
    wrapped = ctx.keyring.wrap(data_key)
    purge_day, now = (
        await session.execute(
            select(utc_day(Conversation.purge_at), utc_today(ctx.clock)).where(Conversation.id == conversation_id)
        )
    ).one()
    day = await _hold_seal_day(session, ctx.clock, purge_day, now)
    session.add(
        DataKey(
            conversation_id=conversation_id,
            kek_version=wrapped.kek_version,
            wrapped=await _sealed(ctx, conversation_id, wrapped, day),
            expiry_day=day,
        )
    )
    return ConversationCipher(tenant_id, conversation_id, data_key, wrapped.kek_version)


async def load_cipher(session: AsyncSession, ctx: ServiceContext, conversation: Conversation) -> ConversationCipher:
    """The conversation's data key, unwrapped: its expiry layer opened (if any), then the KEK's.
    Raises LookupError when it has none (shredded).

    The row is read every time; this replica's cache (`ctx.data_keys`) spares the unwrap when it
    opened this very blob recently, and a key under an expiry day is served from it only while
    the day's key still exists, as it would be without the cache."""
    row = await session.get(DataKey, conversation.id)
    if row is None:
        raise LookupError(f"conversation {conversation.id} has no data key (shredded)")
    cached = ctx.data_keys.get(conversation.id, row.wrapped)
    if cached is not None and (
        row.expiry_day is None or await ctx.expiry_keys.existing(row.expiry_day, ctx.keyring) is not None
    ):
        return ConversationCipher(conversation.tenant_id, conversation.id, cached, row.kek_version)
    try:
        wrapped = await unsealed(ctx, row)
    except ExpiryKeyDestroyed:
        # A runner resealed the row to another day, and destroyed the old one, between our read
        # of the row and of the key (the row is not locked for a read): read it again, once.
        row = await session.scalar(
            select(DataKey).where(DataKey.conversation_id == conversation.id).execution_options(populate_existing=True)
        )
        if row is None:
            raise LookupError(f"conversation {conversation.id} has no data key (shredded)") from None
        wrapped = await unsealed(ctx, row)
    data_key = ctx.keyring.unwrap(wrapped)
    ctx.data_keys.put(conversation.id, row.wrapped, data_key)
    return ConversationCipher(conversation.tenant_id, conversation.id, data_key, row.kek_version)


async def reseal(
    session: AsyncSession,
    ctx: ServiceContext,
    row: DataKey,
    purge_day: date | None,
    now: date,
    held: set[date] | None = None,
) -> bool:
    """Reseal a data key row (locked by the caller) under the seal day of `purge_day`; False when
    it is there already. The KEK wrap inside is kept as it is: only the expiry layer changes.
    `held`: the days this transaction has locked already (see `_hold_seal_day`)."""
    wrapped = await unsealed(ctx, row)
    day = await _hold_seal_day(session, ctx.clock, purge_day, now, held)
    if day == row.expiry_day:
        return False
    row.wrapped = await _sealed(ctx, row.conversation_id, wrapped, day)
    row.kek_version, row.expiry_day = wrapped.kek_version, day
    return True


async def align_data_keys(session: AsyncSession, ctx: ServiceContext, conversation_ids: Sequence[str]) -> int:
    """Reseal the data keys of these conversations (whose rows the caller has locked and whose
    `purge_at` it may just have changed) to the day their deadline now gives; returns how many
    moved. One read when nothing moves, as for most turns (the day changes once a day at most)."""
    if not conversation_ids:
        return 0
    query = (
        select(DataKey, utc_day(Conversation.purge_at), utc_today(ctx.clock))
        .join(Conversation, Conversation.id == DataKey.conversation_id)
        .where(DataKey.conversation_id.in_(conversation_ids))
        .order_by(DataKey.conversation_id)
    )
    stale = [
        row.conversation_id
        for row, purge_day, now in await session.execute(query)
        if row.expiry_day != seal_day_for(purge_day, now)
    ]
    if not stale:
        return 0
    # Locked (in id order, as every writer of several rows locks them) and read afresh: the
    # runner may have moved one meanwhile.
    locked = await session.execute(
        query.where(DataKey.conversation_id.in_(stale))
        .with_for_update(of=DataKey)
        .execution_options(populate_existing=True)
    )
    moved, held = 0, set[date]()
    for row, purge_day, now in locked.all():
        if row.expiry_day != seal_day_for(purge_day, now):
            moved += await reseal(session, ctx, row, purge_day, now, held)
    return moved
