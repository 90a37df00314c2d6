"""AES-256-GCM envelope encryption for stored conversation steps."""

from __future__ import annotations

import os
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import DecryptionError

__all__ = [
    "KEY_SIZE",
    "NONCE_SIZE",
    "TAG_SIZE",
    "DecryptionError",
    "StepCipher",
    "aesgcm_decrypt",
    "aesgcm_encrypt",
    "new_data_key",
    "open_sealed",
    "record_aad",
    "seal",
    "step_aad",
]

NONCE_SIZE: Final = 12
KEY_SIZE: Final = 32
TAG_SIZE: Final = 16

# The low-level primitives accept every AES key size so they can be checked against the full
# Wycheproof suite; data keys used by seal/open_sealed must be 256-bit.
_AES_KEY_SIZES: Final = frozenset({16, 24, 32})

# Versioned label so a future AAD layout can never collide with this one.
_STEP_AAD_LABEL: Final = b"custody.step.v1"
_UINT64_MAX: Final = 2**64 - 1


def new_data_key() -> bytes:
    """Return a fresh random 256-bit data key (DEK)."""
    return AESGCM.generate_key(bit_length=KEY_SIZE * 8)


def _length_prefixed(data: bytes) -> bytes:
    # A 4-byte big-endian length before each variable field makes the encoding injective:
    # ("ab", "c") and ("a", "bc") cannot produce the same bytes.
    return len(data).to_bytes(4, "big") + data


def step_aad(*, tenant_id: str, conversation_id: str, position: int, key_version: int) -> bytes:
    """Return the associated data that binds a stored step to where it belongs.

    A row copied to another tenant, conversation or position, or relabelled with another key
    version, then fails authentication. ``key_version`` is the KEK version recorded with the
    step when it was sealed; it must be stored with the row and never updated, because KEK
    rotation rewraps the data key without re-encrypting steps.
    """
    return _bound_aad(_STEP_AAD_LABEL, tenant_id, conversation_id, position, key_version)


def record_aad(*, label: str, tenant_id: str, conversation_id: str, number: int, key_version: int) -> bytes:
    """Associated data for a conversation's other sealed records (its profile, a stored
    idempotent response): the same binding as a step, under a distinct label so that a step's
    ciphertext can never be passed off as one of these, or the other way round."""
    full_label = f"custody.{label}.v1".encode()
    if full_label == _STEP_AAD_LABEL:
        raise ValueError("record labels must differ from the step label")
    return _bound_aad(full_label, tenant_id, conversation_id, number, key_version)


def _bound_aad(label: bytes, tenant_id: str, conversation_id: str, position: int, key_version: int) -> bytes:
    if not tenant_id or not conversation_id:
        raise ValueError("tenant_id and conversation_id must be non-empty")
    if not 0 <= position <= _UINT64_MAX:
        raise ValueError(f"position must be between 0 and 2**64-1, got {position}")
    if not 1 <= key_version <= _UINT64_MAX:
        raise ValueError(f"key_version must be between 1 and 2**64-1, got {key_version}")
    return b"".join(
        (
            _length_prefixed(label),
            _length_prefixed(tenant_id.encode("utf-8")),
            _length_prefixed(conversation_id.encode("utf-8")),
            position.to_bytes(8, "big"),
            key_version.to_bytes(8, "big"),
        )
    )


def _check_parameters(key: bytes, nonce: bytes) -> None:
    if len(key) not in _AES_KEY_SIZES:
        raise ValueError(f"AES key must be 16, 24 or 32 bytes, got {len(key)}")
    # cryptography accepts any nonce length, but non-96-bit nonces go through GHASH, lower the
    # safe invocation count (SP 800-38D 8.3) and have a history of implementation bugs. We never
    # produce them, so we refuse them rather than trusting a stored value.
    if len(nonce) != NONCE_SIZE:
        raise ValueError(f"nonce must be {NONCE_SIZE} bytes, got {len(nonce)}")


def aesgcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt with AES-GCM and return ciphertext || 16-byte tag.

    Raises ``ValueError`` for a key that is not an AES key size or a nonce that is not 12 bytes.
    """
    _check_parameters(key, nonce)
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aesgcm_decrypt(key: bytes, nonce: bytes, ciphertext_and_tag: bytes, aad: bytes) -> bytes:
    """Decrypt ciphertext || 16-byte tag with AES-GCM and return the plaintext.

    Raises ``ValueError`` for refused parameters (key size, nonce size) and
    ``DecryptionError`` when the data itself does not authenticate.
    """
    _check_parameters(key, nonce)
    if len(ciphertext_and_tag) < TAG_SIZE:
        raise DecryptionError(f"ciphertext is {len(ciphertext_and_tag)} bytes, shorter than the {TAG_SIZE}-byte tag")
    try:
        return AESGCM(key).decrypt(nonce, ciphertext_and_tag, aad)
    except InvalidTag:
        # InvalidTag carries nothing useful; dropping the chain keeps tracebacks short.
        raise DecryptionError(
            "authentication failed: wrong key, wrong associated data or corrupted ciphertext"
        ) from None


def seal(data_key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt ``plaintext`` under a 256-bit data key; return nonce || ciphertext || tag."""
    if len(data_key) != KEY_SIZE:
        raise ValueError(f"data key must be {KEY_SIZE} bytes, got {len(data_key)}")
    # A fresh random 96-bit nonce per step: a per-conversation DEK seals far fewer than the
    # 2**32 messages SP 800-38D allows for random nonces, so collisions are not a concern.
    nonce = os.urandom(NONCE_SIZE)
    return nonce + aesgcm_encrypt(data_key, nonce, plaintext, aad)


def open_sealed(data_key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Decrypt a blob produced by ``seal``; raise ``DecryptionError`` on any failure."""
    if len(data_key) != KEY_SIZE:
        raise DecryptionError(f"data key must be {KEY_SIZE} bytes, got {len(data_key)}")
    if len(sealed) < NONCE_SIZE + TAG_SIZE:
        raise DecryptionError(
            f"sealed blob is {len(sealed)} bytes, shorter than nonce and tag ({NONCE_SIZE + TAG_SIZE} bytes)"
        )
    return aesgcm_decrypt(data_key, sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], aad)


class StepCipher:
    """One conversation's steps under its data key: `seal` and `open` give exactly what `seal` and
    `open_sealed` give with `step_aad`, but the AES key schedule and the fixed part of the
    associated data (label, tenant, conversation) are made once, not for every step: replaying a
    long history opens thousands of steps in a row."""

    def __init__(self, data_key: bytes, *, tenant_id: str, conversation_id: str) -> None:
        if len(data_key) != KEY_SIZE:
            raise ValueError(f"data key must be {KEY_SIZE} bytes, got {len(data_key)}")
        if not tenant_id or not conversation_id:
            raise ValueError("tenant_id and conversation_id must be non-empty")
        self._aead = AESGCM(data_key)
        self._prefix = b"".join(
            (
                _length_prefixed(_STEP_AAD_LABEL),
                _length_prefixed(tenant_id.encode("utf-8")),
                _length_prefixed(conversation_id.encode("utf-8")),
            )
        )

    def __repr__(self) -> str:
        return "StepCipher(<key>)"

    def _aad(self, position: int, key_version: int) -> bytes:
        if not 0 <= position <= _UINT64_MAX:
            raise ValueError(f"position must be between 0 and 2**64-1, got {position}")
        if not 1 <= key_version <= _UINT64_MAX:
            raise ValueError(f"key_version must be between 1 and 2**64-1, got {key_version}")
        return self._prefix + position.to_bytes(8, "big") + key_version.to_bytes(8, "big")

    def seal(self, position: int, key_version: int, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, plaintext, self._aad(position, key_version))

    def open(self, position: int, key_version: int, sealed: bytes) -> bytes:
        if len(sealed) < NONCE_SIZE + TAG_SIZE:
            raise DecryptionError(
                f"sealed blob is {len(sealed)} bytes, shorter than nonce and tag ({NONCE_SIZE + TAG_SIZE} bytes)"
            )
        try:
            return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], self._aad(position, key_version))
        except InvalidTag:
            raise DecryptionError(
                "authentication failed: wrong key, wrong associated data or corrupted ciphertext"
            ) from None
