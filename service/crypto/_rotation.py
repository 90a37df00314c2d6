"""KEK rotation: the job that rewraps every data key under the keyring's current version.

Rotation adds a KEK version to the keyring (`Keyring.rotate`) and rewraps each conversation's
data key under it; step ciphertext is never touched (the step's AAD keeps the version it was
sealed under). Replicas that are already running pick the new version up by themselves (see
`FileKeyring`), so a rotation needs no restart.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ..audit import AuditEntry, Auditor
from ..errors import KeyUnwrapError
from ..models import DataKey
from ._keyring import Keyring, WrappedKey

__all__ = ["RotationResult", "rewrap_data_keys"]


@dataclass(frozen=True)
class RotationResult:
    version: int
    rewrapped: int


async def rewrap_data_keys(
    auditor: Auditor,
    sessions: async_sessionmaker[AsyncSession],
    keyring: Keyring,
    *,
    operator: str | None = None,
    batch: int = 500,
) -> RotationResult:
    """Rewrap every data key not yet under the current KEK, in batches, each batch one
    transaction with its own audit record (fail closed: no rewrap commits unrecorded).

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
                    wrapped = keyring.rewrap(WrappedKey(row.kek_version, row.wrapped))
                except KeyUnwrapError:
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
    return RotationResult(target, total)
