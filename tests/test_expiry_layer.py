"""The expiry layer: a KEK-wrapped data key sealed under one day's expiry key, bound to its conversation, day and KEK version."""

from __future__ import annotations

from datetime import date

import pytest

from service.crypto import (
    NONCE_SIZE,
    SEALED_DATA_KEY_SIZE,
    DecryptionError,
    LocalKeyring,
    new_data_key,
    open_data_key_layer,
    seal_data_key_layer,
)

DAY = date(2027, 3, 14)
KEYRING = LocalKeyring({1: bytes(range(32)), 2: bytes(range(32, 64))}, current=1)


def test_the_layer_round_trips_and_is_68_bytes_with_a_fresh_nonce_each_time() -> None:
    """Sealing then opening gives back the same wrapped key; each seal is 68 bytes with its own random nonce."""
    expiry_key, data_key = new_data_key(), new_data_key()
    wrapped = KEYRING.wrap(data_key)
    first = seal_data_key_layer(expiry_key, conversation_id="conv_a", day=DAY, wrapped=wrapped)
    second = seal_data_key_layer(expiry_key, conversation_id="conv_a", day=DAY, wrapped=wrapped)
    assert len(first) == len(second) == SEALED_DATA_KEY_SIZE == 68
    assert first[:NONCE_SIZE] != second[:NONCE_SIZE]
    opened = open_data_key_layer(expiry_key, first, conversation_id="conv_a", day=DAY, kek_version=1)
    assert opened == wrapped
    assert KEYRING.unwrap(opened) == data_key


@pytest.mark.parametrize(
    ("conversation_id", "day", "kek_version", "other_key"),
    [
        ("conv_b", DAY, 1, False),
        ("conv_a", date(2027, 3, 15), 1, False),
        ("conv_a", DAY, 2, False),
        ("conv_a", DAY, 1, True),
    ],
    ids=["another-conversation", "another-day", "another-kek-version", "another-expiry-key"],
)
def test_a_sealed_key_moved_relabelled_or_opened_with_another_key_fails(
    conversation_id: str, day: date, kek_version: int, other_key: bool
) -> None:
    """A sealed data key copied to another conversation's row, relabelled with another day or KEK version, or opened with another day's key fails authentication."""
    expiry_key = new_data_key()
    sealed = seal_data_key_layer(expiry_key, conversation_id="conv_a", day=DAY, wrapped=KEYRING.wrap(new_data_key()))
    with pytest.raises(DecryptionError):
        open_data_key_layer(
            new_data_key() if other_key else expiry_key,
            sealed,
            conversation_id=conversation_id,
            day=day,
            kek_version=kek_version,
        )


def test_altered_bytes_fail() -> None:
    """Any flipped bit of a sealed data key (nonce, ciphertext or tag) fails authentication."""
    expiry_key = new_data_key()
    sealed = seal_data_key_layer(expiry_key, conversation_id="conv_a", day=DAY, wrapped=KEYRING.wrap(new_data_key()))
    for index in (0, NONCE_SIZE, len(sealed) - 1):
        altered = bytearray(sealed)
        altered[index] ^= 1
        with pytest.raises(DecryptionError):
            open_data_key_layer(expiry_key, bytes(altered), conversation_id="conv_a", day=DAY, kek_version=1)
