"""This replica's cache of unwrapped data keys, so that a turn does not pay a keyring unwrap (a KMS
or HSM call, or the expiry layer's day key) for a key it opened a moment ago.

An entry is found only by the exact wrapped blob it was opened from. Every turn still reads the
conversation's data key row, in the transaction that uses the key, and looks the blob up here:

- shredding deletes the row, so a shredded conversation finds no row and never reaches the cache,
  in whichever replica shredded it (and the replica that shredded it drops the entry at once);
- a KEK rotation (`custody keyring rotate` rewraps every row) or a reseal under another expiry day
  rewrites the blob, so the old entry no longer matches, and is dropped when it is next looked up;
- the cache holds at most `size` keys (least recently used go first), each for `ttl_seconds` at most
  from when it was opened, so plaintext keys do not linger in memory.

The plaintext keys live only in this process's memory, never logged or shown in a repr.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["DataKeyCache"]


@dataclass(frozen=True)
class _Entry:
    wrapped: bytes
    data_key: bytes
    expires: float


class DataKeyCache:
    def __init__(self, size: int = 10_000, ttl_seconds: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self._size = max(0, size)
        self._ttl = max(0.0, ttl_seconds)
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __repr__(self) -> str:
        return f"DataKeyCache({len(self._entries)} of {self._size}, ttl {self._ttl:g} s)"

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, conversation_id: object) -> bool:
        return conversation_id in self._entries

    @property
    def enabled(self) -> bool:
        return self._size > 0 and self._ttl > 0

    def get(self, conversation_id: str, wrapped: bytes) -> bytes | None:
        """The data key opened from exactly this wrapped blob, if still fresh."""
        entry = self._entries.get(conversation_id)
        if entry is None:
            return None
        if entry.wrapped != wrapped or entry.expires <= self._clock():
            # Rewrapped, resealed or stale: the blob in the row is the truth.
            del self._entries[conversation_id]
            return None
        self._entries.move_to_end(conversation_id)
        return entry.data_key

    def put(self, conversation_id: str, wrapped: bytes, data_key: bytes) -> None:
        if not self.enabled:
            return
        self._entries[conversation_id] = _Entry(wrapped, data_key, self._clock() + self._ttl)
        self._entries.move_to_end(conversation_id)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def drop(self, conversation_id: str) -> None:
        """Forget one conversation's key (it was shredded)."""
        self._entries.pop(conversation_id, None)
