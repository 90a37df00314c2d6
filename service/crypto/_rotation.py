"""KEK rotation: the job that rewraps every data key under the keyring's current version.

Rotation adds a KEK version to the keyring (`Keyring.rotate`) and rewraps each conversation's
data key under it; step ciphertext is never touched (the step's AAD keeps the version it was
sealed under). A data key sealed under a day's expiry key (see `_expiry`) is opened, rewrapped and
sealed again under the same day; the expiry keys themselves, in the key store, are rewrapped too.
Replicas that are already running pick the new version up by themselves (see `FileKeyring`), so a
rotation needs no restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..audit import AuditEntry, Auditor
from ..errors import DecryptionError, KeyUnwrapError
from ..models import DataKey
from ._expiry import open_data_key_layer, seal_data_key_layer
from ._keyring import Keyring, WrappedKey

if TYPE_CHECKING:
    from ..key_store import ExpiryKeyStore

__all__ = ["RotationResult", "rewrap_data_keys"]


@dataclass(frozen=True)
class RotationResult:
    version: int
    rewrapped: int
    expiry_keys: int = 0  # expiry keys rewrapped in the key store


async def rewrap_data_keys(
    auditor: Auditor,
    sessions: async_sessionmaker[AsyncSession],
    keyring: Keyring,
    expiry_keys: ExpiryKeyStore,
    *,
    operator: str | None = None,
    batch: int = 500,
) -> RotationResult:
    """Rewrap every data key not yet under the current KEK, in batches, each batch one
    transaction with its own audit record (fail closed: no rewrap commits unrecorded); then the
    expiry keys in the key store, with a record of their own when there were any to rewrap.

    The walk goes forward by conversation id, so keys that cannot be unwrapped (already lost)
    or rows locked by a concurrent deletion are passed over rather than met again forever;
    running the job again picks up whatever was skipped.
    """
    target = keyring.current_version
    total, after = 0, ""
    while True:
        async with sessions.begin() as session:
            rows = (
                await session.scalars(
                    select(DataKey)
                    .where(DataKey.kek_version != target, DataKey.conversation_id > after)
                    .order_by(DataKey.conversation_id)
                    .limit(batch)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                break
            rewrapped = unreadable = 0
            for row in rows:
                try:
                    wrapped = await _rewrapped(row, keyring, expiry_keys)
                except (KeyUnwrapError, DecryptionError):
                    unreadable += 1
                    continue
                row.kek_version, row.wrapped = wrapped.kek_version, wrapped.wrapped
                rewrapped += 1
            after = rows[-1].conversation_id
            await auditor.append(
                session,
                AuditEntry(
                    "keyring.rotate",
                    None,
                    resource_type="keyring",
                    details={"kek_version": target, "rewrapped": rewrapped, "unreadable": unreadable},
                    operator=operator,
                ),
            )
            total += rewrapped
        if len(rows) < batch:
            break
    return RotationResult(target, total, await _rewrap_expiry_keys(auditor, sessions, keyring, expiry_keys, operator))


async def _rewrapped(row: DataKey, keyring: Keyring, expiry_keys: ExpiryKeyStore) -> WrappedKey:
    """The row's `wrapped` for the current KEK: rewrapped, and sealed again under its day if it was."""
    if row.expiry_day is None:
        return keyring.rewrap(WrappedKey(row.kek_version, row.wrapped))
    # The row is locked, so no runner can be destroying its day's key meanwhile (see
    # service.retention): a missing key means this data key was lost already.
    key = await expiry_keys.existing(row.expiry_day, keyring)
    if key is None:
        raise KeyUnwrapError(f"the expiry key of {row.expiry_day.isoformat()} is gone")
    inner = open_data_key_layer(
        key, row.wrapped, conversation_id=row.conversation_id, day=row.expiry_day, kek_version=row.kek_version
    )
    rewrapped = keyring.rewrap(inner)
    sealed = seal_data_key_layer(key, conversation_id=row.conversation_id, day=row.expiry_day, wrapped=rewrapped)
    return WrappedKey(rewrapped.kek_version, sealed)


async def _rewrap_expiry_keys(
    auditor: Auditor,
    sessions: async_sessionmaker[AsyncSession],
    keyring: Keyring,
    expiry_keys: ExpiryKeyStore,
    operator: str | None,
) -> int:
    """The key store's expiry keys under the current KEK, as one audited action (a record only
    when there is something to rewrap, as for the data keys' batches). The key store is another
    database: its rewrap commits inside the action, just before the record does."""
    target = keyring.current_version
    if not await expiry_keys.count_not_under(target):
        return 0
    entry = AuditEntry(
        "keyring.rotate", None, resource_type="keyring", details={"kek_version": target}, operator=operator
    )
    async with auditor.action(sessions, entry) as (_, entry):
        count = await expiry_keys.rewrap(keyring)
        entry.details |= {"expiry_keys_rewrapped": count.rewrapped, "unreadable": count.unreadable}
    return count.rewrapped
