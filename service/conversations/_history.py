"""A conversation's sealed history: each step stored and read as its exact JSON bytes under the
conversation's data key (made, opened and kept under its deadline's day by `_data_keys`).

A step is sealed as the bytes it arrived as: a model step as sliced from the upstream's raw
response (service/json_spans.py), a client step as the compact JSON of the validated value. Replay
opens them and splices them into the next request unparsed, so what the model gets back is, byte
for byte, what it sent: key order, spacing and the spelling of numbers included.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..crypto import StepCipher, open_sealed, record_aad, seal
from ..database import run_sql
from ..models import DataKey, Step

__all__ = [
    "ConversationCipher",
    "append_steps",
    "decode_json",
    "encode_json",
    "read_steps",
    "replay_steps",
    "shred_data_key",
]


def encode_json(value: Any) -> bytes:
    """Compact JSON of a value: how a client's step (validated as a value) and the records sealed
    beside the history are stored. Model steps never go through here: they keep the bytes the
    upstream sent (unknown fields, unknown step types and nulls included, design invariant 3)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def decode_json(raw: bytes) -> Any:
    return json.loads(raw)


@dataclass(frozen=True)
class ConversationCipher:
    """A conversation's unwrapped data key with the identifiers every seal is bound to.

    Lives only for one unit of work; the plaintext data key is never stored or logged.
    """

    tenant_id: str
    conversation_id: str
    data_key: bytes
    key_version: int

    def __repr__(self) -> str:
        return f"ConversationCipher({self.conversation_id}, kek v{self.key_version})"

    @cached_property
    def _steps(self) -> StepCipher:
        return StepCipher(self.data_key, tenant_id=self.tenant_id, conversation_id=self.conversation_id)

    def seal_step(self, position: int, step: bytes) -> bytes:
        """Seal one step's exact JSON bytes at its position."""
        return self._steps.seal(position, self.key_version, step)

    def open_step(self, position: int, key_version: int, sealed: bytes) -> bytes:
        """One step's exact JSON bytes, as they were sealed."""
        return self._steps.open(position, key_version, sealed)

    def seal_record(self, label: str, number: int, value: Any) -> bytes:
        aad = record_aad(
            label=label,
            tenant_id=self.tenant_id,
            conversation_id=self.conversation_id,
            number=number,
            key_version=self.key_version,
        )
        return seal(self.data_key, encode_json(value), aad)

    def open_record(self, label: str, number: int, key_version: int, sealed: bytes) -> Any:
        aad = record_aad(
            label=label,
            tenant_id=self.tenant_id,
            conversation_id=self.conversation_id,
            number=number,
            key_version=key_version,
        )
        return decode_json(open_sealed(self.data_key, sealed, aad))


async def shred_data_key(session: AsyncSession, conversation_id: str) -> int | None:
    """Crypto-shredding: without this row every ciphertext of the conversation is noise. Returns
    the KEK version the destroyed data key was wrapped under (None: it had none)."""
    version = await session.scalar(
        delete(DataKey).where(DataKey.conversation_id == conversation_id).returning(DataKey.kek_version)
    )
    return int(version) if version is not None else None


async def append_steps(
    session: AsyncSession, cipher: ConversationCipher, turn_id: str, start: int, steps: Sequence[bytes]
) -> None:
    """Seal and insert steps (their exact JSON bytes) at positions `start`, `start + 1`, ...:
    one multi-row INSERT, not an ORM unit of work per step."""
    if not steps:
        return
    await session.execute(
        insert(Step),
        [
            {
                "conversation_id": cipher.conversation_id,
                "position": start + offset,
                "turn_id": turn_id,
                "key_version": cipher.key_version,
                "sealed": cipher.seal_step(start + offset, step),
            }
            for offset, step in enumerate(steps)
        ],
    )


# The replay read, as SQL for the driver: a long history is thousands of rows, and the ORM's row
# processing would cost more per step than opening the step does.
_REPLAY = "SELECT position, key_version, sealed FROM steps WHERE conversation_id = $1 ORDER BY position"


async def replay_steps(session: AsyncSession, cipher: ConversationCipher) -> list[bytes]:
    """Every step of the conversation in order, each its exact JSON bytes: what the next turn
    sends as the history. Runs in the session's transaction, on its connection."""
    rows = (await run_sql(session, _REPLAY, cipher.conversation_id)).all()
    return [cipher.open_step(row.position, row.key_version, row.sealed) for row in rows]


async def read_steps(
    session: AsyncSession, cipher: ConversationCipher, *, start: int = 0, limit: int | None = None
) -> list[tuple[int, str, bytes]]:
    """(position, turn id, the step's exact JSON bytes) in order, decrypted."""
    query = (
        select(Step.position, Step.turn_id, Step.key_version, Step.sealed)
        .where(Step.conversation_id == cipher.conversation_id, Step.position >= start)
        .order_by(Step.position)
    )
    if limit is not None:
        query = query.limit(limit)
    rows = (await session.execute(query)).all()
    return [(row.position, row.turn_id, cipher.open_step(row.position, row.key_version, row.sealed)) for row in rows]
