"""The expiry layer: a KEK-wrapped data key sealed once more, under the expiry key of one UTC day.

A conversation with a deadline keeps its data key as

    nonce (12) || AES-256-GCM(expiry key of day D, KW(KEK v, data key) (40), aad) || tag (16)

68 bytes in `data_keys.wrapped`, with D in `data_keys.expiry_day` and v in `kek_version`. The
associated data binds the blob to its conversation, its day and its KEK version, so a blob copied
to another conversation's row, or relabelled with another day (whose key may still exist), fails
to open. The expiry keys live in a database of their own (service.key_store) and are destroyed
once their day has passed, so a backup of the service's database taken before a purge holds only
sealed blobs whose key no longer exists anywhere. This module is pure: bytes in, bytes out.
"""

from __future__ import annotations

from datetime import date
from typing import Final

from ._envelope import NONCE_SIZE, TAG_SIZE, open_sealed, seal
from ._keyring import WrappedKey

__all__ = ["SEALED_DATA_KEY_SIZE", "data_key_aad", "open_data_key_layer", "seal_data_key_layer"]

_LABEL: Final = b"custody.data-key.v1"
_WRAPPED_SIZE: Final = 40  # a 256-bit data key under RFC 3394 key wrap
SEALED_DATA_KEY_SIZE: Final = NONCE_SIZE + _WRAPPED_SIZE + TAG_SIZE


def _field(data: bytes) -> bytes:
    # Length-prefixed, as the step AAD: ("ab", "c") and ("a", "bc") never encode alike.
    return len(data).to_bytes(4, "big") + data


def data_key_aad(*, conversation_id: str, day: date, kek_version: int) -> bytes:
    """Associated data binding a sealed data key to its conversation, its day and its KEK version."""
    if not conversation_id:
        raise ValueError("conversation_id must be non-empty")
    if not 1 <= kek_version < 2**64:
        raise ValueError(f"kek_version must be between 1 and 2**64-1, got {kek_version}")
    return b"".join(
        (
            _field(_LABEL),
            _field(conversation_id.encode()),
            _field(day.isoformat().encode()),
            kek_version.to_bytes(8, "big"),
        )
    )


def seal_data_key_layer(expiry_key: bytes, *, conversation_id: str, day: date, wrapped: WrappedKey) -> bytes:
    """Seal a KEK-wrapped data key under the expiry key of `day` (a fresh random 96-bit nonce)."""
    if len(wrapped.wrapped) != _WRAPPED_SIZE:
        raise ValueError(f"a wrapped data key is {_WRAPPED_SIZE} bytes, got {len(wrapped.wrapped)}")
    aad = data_key_aad(conversation_id=conversation_id, day=day, kek_version=wrapped.kek_version)
    return seal(expiry_key, wrapped.wrapped, aad)


def open_data_key_layer(
    expiry_key: bytes, sealed: bytes, *, conversation_id: str, day: date, kek_version: int
) -> WrappedKey:
    """The KEK-wrapped data key inside a sealed one; raises ``DecryptionError`` if it does not
    authenticate (another conversation's blob, another day, altered bytes, the wrong key)."""
    aad = data_key_aad(conversation_id=conversation_id, day=day, kek_version=kek_version)
    return WrappedKey(kek_version, open_sealed(expiry_key, sealed, aad))
