"""KEK rotation: a keyring that follows its file, and the job that rewraps every data key.

Rotation adds a KEK version to the keyring file and rewraps each conversation's data key under
it; step ciphertext is never touched (the step's AAD keeps the version it was sealed under).
Replicas that are already running pick the new version up from the file the first time they meet
a data key wrapped under it, so a rotation needs no restart.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .audit import AuditEntry, append
from .keyring import KeyUnwrapError, LocalKeyring, WrappedKey
from .models import DataKey

__all__ = ["FileKeyring", "RotationResult", "rewrap_data_keys"]


class FileKeyring:
    """A `Keyring` backed by a LocalKeyring file, reloaded when it meets a newer KEK version."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._keyring = LocalKeyring.load(path)

    def __repr__(self) -> str:
        return f"FileKeyring({self.path}, {self._keyring!r})"

    @property
    def current_version(self) -> int:
        return self._keyring.current_version

    def versions(self) -> list[int]:
        return self._keyring.versions()

    def wrap(self, data_key: bytes) -> WrappedKey:
        return self._keyring.wrap(data_key)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        if wrapped.kek_version not in self._keyring.versions():
            # Another process rotated; read the file again (it only ever gains versions).
            with self._lock:
                if wrapped.kek_version not in self._keyring.versions():
                    self._keyring = LocalKeyring.load(self.path)
        return self._keyring.unwrap(wrapped)

    def rotate(self) -> int:
        """Add a new current KEK version to the file; returns it."""
        with self._lock:
            self._keyring = LocalKeyring.load(self.path)
            return self._keyring.rotate(self.path)

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        return self.wrap(self.unwrap(wrapped))


@dataclass(frozen=True)
class RotationResult:
    version: int
    rewrapped: int


async def rewrap_data_keys(
    sessions: async_sessionmaker[AsyncSession], keyring: FileKeyring, *, batch: int = 500
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
            await append(
                session,
                AuditEntry(
                    "keyring.rotate",
                    None,
                    resource_type="keyring",
                    details={"kek_version": target, "rewrapped": rewrapped, "unreadable": unreadable},
                ),
            )
            total += rewrapped
        if len(rows) < batch:
            break
    return RotationResult(target, total)
