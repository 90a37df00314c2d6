"""Tests for service.envelope: AES-256-GCM sealing of stored steps."""

from __future__ import annotations

from typing import Any

import pytest

from service.crypto import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    DecryptionError,
    StepCipher,
    aesgcm_decrypt,
    aesgcm_encrypt,
    new_data_key,
    open_sealed,
    seal,
    step_aad,
)

from .wycheproof import declared_count, vector_cases

STEP: dict[str, Any] = {
    "tenant_id": "tenant-a",
    "conversation_id": "conv-1",
    "position": 3,
    "key_version": 1,
}


GCM_CASES = vector_cases("aes_gcm_test.json")


def _vector(case: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes, bytes, bytes]:
    key, iv, aad, msg, ct, tag = (bytes.fromhex(case[field]) for field in ("key", "iv", "aad", "msg", "ct", "tag"))
    return key, iv, aad, msg, ct, tag


@pytest.mark.parametrize(("group", "case"), GCM_CASES)
def test_wycheproof_aesgcm_primitives(group: dict[str, Any], case: dict[str, Any]) -> None:
    """The low-level wrapper matches every Wycheproof vector or refuses its parameters."""
    key, iv, aad, msg, ct, tag = _vector(case)
    if group["keySize"] not in (128, 192, 256) or group["ivSize"] != 96:
        # Refused by design whatever the vector's verdict; for `invalid` vectors this refusal
        # is indistinguishable from detecting the fault, so they test our policy, not GCM.
        refusal = "nonce must be" if group["keySize"] in (128, 192, 256) else "AES key must be"
        with pytest.raises(ValueError, match=refusal):
            aesgcm_encrypt(key, iv, msg, aad)
        with pytest.raises(ValueError, match=refusal):
            aesgcm_decrypt(key, iv, ct + tag, aad)
    elif group["tagSize"] != TAG_SIZE * 8:
        # There is no tag-length parameter to refuse: a short tag simply fails to authenticate.
        with pytest.raises(DecryptionError):
            aesgcm_decrypt(key, iv, ct + tag, aad)
    elif case["result"] in ("valid", "acceptable"):
        assert aesgcm_decrypt(key, iv, ct + tag, aad) == msg
        assert aesgcm_encrypt(key, iv, msg, aad) == ct + tag
    else:
        with pytest.raises(DecryptionError):
            aesgcm_decrypt(key, iv, ct + tag, aad)
        assert aesgcm_encrypt(key, iv, msg, aad) != ct + tag


@pytest.mark.parametrize(("group", "case"), GCM_CASES)
def test_wycheproof_open_sealed(group: dict[str, Any], case: dict[str, Any]) -> None:
    """open_sealed accepts exactly the valid vectors with 256-bit keys, 96-bit IVs and full tags."""
    key, iv, aad, msg, ct, tag = _vector(case)
    usable = (
        group["keySize"] == 256
        and group["ivSize"] == 96
        and group["tagSize"] == 128
        and case["result"] in ("valid", "acceptable")
    )
    if usable:
        assert open_sealed(key, iv + ct + tag, aad) == msg
    else:
        # Another IV size shifts the nonce/ciphertext split, so it fails as corrupted data.
        with pytest.raises(DecryptionError):
            open_sealed(key, iv + ct + tag, aad)


def test_wycheproof_gcm_cases_all_collected() -> None:
    """Every vector the AES-GCM file declares is parametrized above, none dropped."""
    assert len(GCM_CASES) == declared_count("aes_gcm_test.json")


def test_new_data_key_is_random_256_bit() -> None:
    """new_data_key returns 32 bytes that differ between calls."""
    first, second = new_data_key(), new_data_key()
    assert len(first) == len(second) == KEY_SIZE
    assert first != second


def test_seal_round_trips_with_expected_layout() -> None:
    """seal returns nonce || ciphertext || tag and open_sealed restores the plaintext."""
    key, aad = new_data_key(), step_aad(**STEP)
    sealed = seal(key, b'{"type":"text"}', aad)
    assert len(sealed) == NONCE_SIZE + len(b'{"type":"text"}') + TAG_SIZE
    assert open_sealed(key, sealed, aad) == b'{"type":"text"}'


def test_seal_uses_a_fresh_nonce_each_time() -> None:
    """Two seals of the same plaintext under the same key and AAD differ, nonce included."""
    key, aad = new_data_key(), step_aad(**STEP)
    first, second = seal(key, b"same", aad), seal(key, b"same", aad)
    assert first[:NONCE_SIZE] != second[:NONCE_SIZE]
    assert first != second


@pytest.mark.parametrize(
    "moved",
    [
        {"position": 4},
        {"conversation_id": "conv-2"},
        {"tenant_id": "tenant-b"},
        {"key_version": 2},
    ],
    ids=["position", "conversation", "tenant", "key_version"],
)
def test_step_moved_elsewhere_fails_to_open(moved: dict[str, Any]) -> None:
    """A sealed step fails to open under another position, conversation, tenant or key version."""
    key = new_data_key()
    sealed = seal(key, b"hello", step_aad(**STEP))
    with pytest.raises(DecryptionError):
        open_sealed(key, sealed, step_aad(**{**STEP, **moved}))


def test_every_flipped_bit_fails_to_open() -> None:
    """Flipping any single bit of a sealed blob (nonce, ciphertext or tag) makes it fail."""
    key, aad = new_data_key(), step_aad(**STEP)
    sealed = seal(key, b"hi", aad)
    for bit in range(len(sealed) * 8):
        tampered = bytearray(sealed)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(DecryptionError):
            open_sealed(key, bytes(tampered), aad)


def test_truncated_or_extended_blob_fails_to_open() -> None:
    """Every truncation of a sealed blob, and one with a byte appended, fails to open."""
    key, aad = new_data_key(), step_aad(**STEP)
    sealed = seal(key, b"hello", aad)
    for length in range(len(sealed)):
        with pytest.raises(DecryptionError):
            open_sealed(key, sealed[:length], aad)
    with pytest.raises(DecryptionError):
        open_sealed(key, sealed + b"\x00", aad)


def test_wrong_data_key_fails_to_open() -> None:
    """A blob sealed under one data key does not open under another."""
    aad = step_aad(**STEP)
    sealed = seal(new_data_key(), b"hello", aad)
    with pytest.raises(DecryptionError):
        open_sealed(new_data_key(), sealed, aad)


@pytest.mark.parametrize("size", [0, 16, 24, 31, 33])
def test_seal_and_open_require_256_bit_keys(size: int) -> None:
    """seal refuses and open_sealed rejects any data key that is not 32 bytes."""
    with pytest.raises(ValueError, match="32 bytes"):
        seal(b"k" * size, b"hello", b"aad")
    with pytest.raises(DecryptionError):
        open_sealed(b"k" * size, b"\x00" * 64, b"aad")


@pytest.mark.parametrize("size", [0, 8, 11, 13, 16])
def test_primitives_refuse_non_96_bit_nonces(size: int) -> None:
    """aesgcm_encrypt and aesgcm_decrypt refuse nonces other than 12 bytes, which AESGCM accepts."""
    with pytest.raises(ValueError, match="nonce"):
        aesgcm_encrypt(bytes(32), bytes(size), b"hello", b"")
    with pytest.raises(ValueError, match="nonce"):
        aesgcm_decrypt(bytes(32), bytes(size), bytes(32), b"")


def test_decrypt_rejects_input_shorter_than_tag() -> None:
    """aesgcm_decrypt rejects a ciphertext too short to hold the 16-byte tag."""
    with pytest.raises(DecryptionError):
        aesgcm_decrypt(bytes(32), bytes(12), bytes(15), b"")


def test_decryption_errors_carry_no_secrets() -> None:
    """Failure messages contain neither key bytes nor plaintext in any common encoding."""
    key, aad = new_data_key(), step_aad(**STEP)
    plaintext = b"patient-secret-diagnosis"
    sealed = seal(key, plaintext, aad)
    with pytest.raises(DecryptionError) as excinfo:
        open_sealed(key, sealed[:-1] + bytes([sealed[-1] ^ 1]), aad)
    text = f"{excinfo.value!s} {excinfo.value!r}"
    for secret in (key, plaintext):
        assert secret.hex() not in text
        assert repr(secret) not in text
    assert "patient-secret" not in text


def test_step_aad_is_unambiguous() -> None:
    """Field boundaries are encoded, so shifting characters between fields changes the AAD."""
    first = step_aad(tenant_id="ab", conversation_id="c", position=0, key_version=1)
    second = step_aad(tenant_id="a", conversation_id="bc", position=0, key_version=1)
    assert first != second
    assert b"custody.step.v1" in first


def test_step_aad_encoding_is_stable() -> None:
    """The AAD layout is pinned byte for byte, since stored steps only open with the same bytes."""
    aad = step_aad(tenant_id="t1", conversation_id="c-é", position=258, key_version=3)
    assert aad == (
        b"\x00\x00\x00\x0fcustody.step.v1"
        + b"\x00\x00\x00\x02t1"
        + b"\x00\x00\x00\x04c-\xc3\xa9"
        + (258).to_bytes(8, "big")
        + (3).to_bytes(8, "big")
    )


def test_step_aad_distinguishes_every_field() -> None:
    """Changing any one field of the step's location yields a different AAD."""
    base = step_aad(**STEP)
    for field, value in (("tenant_id", "x"), ("conversation_id", "x"), ("position", 9), ("key_version", 9)):
        assert step_aad(**{**STEP, field: value}) != base


@pytest.mark.parametrize(
    ("bad", "refusal"),
    [
        ({"position": -1}, "position must be"),
        ({"key_version": 0}, "key_version must be"),
        ({"tenant_id": ""}, "must be non-empty"),
        ({"conversation_id": ""}, "must be non-empty"),
        ({"position": 2**64}, "position must be"),
    ],
    ids=["negative-position", "zero-version", "empty-tenant", "empty-conversation", "huge"],
)
def test_step_aad_rejects_out_of_range_fields(bad: dict[str, Any], refusal: str) -> None:
    """step_aad refuses empty identifiers and positions or versions outside their range."""
    with pytest.raises(ValueError, match=refusal):
        step_aad(**{**STEP, **bad})


def test_the_step_cipher_seals_and_opens_exactly_as_seal_with_step_aad() -> None:
    """StepCipher (the key schedule and fixed associated data made once per conversation) opens what
    seal(step_aad) sealed and the other way round, and refuses a step moved to another position,
    key version, conversation or tenant."""
    key = new_data_key()
    steps = StepCipher(key, tenant_id="ten_a", conversation_id="conv_a")
    aad = step_aad(tenant_id="ten_a", conversation_id="conv_a", position=7, key_version=3)
    assert steps.open(7, 3, seal(key, b'{"x":1}', aad)) == b'{"x":1}'
    assert open_sealed(key, steps.seal(7, 3, b'{"x":1}'), aad) == b'{"x":1}'
    sealed = steps.seal(7, 3, b'{"x":1}')
    for moved in ((8, 3), (7, 2)):
        with pytest.raises(DecryptionError):
            steps.open(*moved, sealed)
    for tenant, conversation in (("ten_a", "conv_b"), ("ten_b", "conv_a")):
        with pytest.raises(DecryptionError):
            StepCipher(key, tenant_id=tenant, conversation_id=conversation).open(7, 3, sealed)
    with pytest.raises(DecryptionError):
        steps.open(7, 3, sealed[:20])
    assert "StepCipher(<key>)" == repr(steps)
