"""The trusted audit public keys: reading retired keys fail-closed, looking keys up by id, and each retired key's limit."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from service.audit import (
    AuditSigner,
    TrustedKey,
    TrustedKeys,
    UntrustedKey,
    attestation_refusal,
    parse_public_keys,
    read_public_keys,
    write_retired_key,
)

BEFORE = "2026-11-24T09:59:59.999999Z"
LIMIT = "2026-11-24T10:00:00.000000Z"
AFTER = "2026-11-24T10:00:00.000001Z"


def signer() -> AuditSigner:
    return AuditSigner(Ed25519PrivateKey.generate())


def pem_of(key: AuditSigner) -> str:
    return key.public_pem()


def test_a_file_of_several_blocks_gives_each_key_with_its_attributes() -> None:
    """Several PEM blocks in one file are read in order, each with the limit and key id written before it."""
    first, second = signer(), signer()
    text = (
        "# retired in the spring\n"
        f"Custody-Key-Id: {first.key_id}\n"
        f"Custody-Trusted-Until: 2026-11-24T11:00:00+01:00\n"
        f"{pem_of(first)}\n"
        f"{pem_of(second)}"
    )
    keys = parse_public_keys(text.encode(), "retired.pem")
    assert [key.key_id for key in keys] == [first.key_id, second.key_id]
    assert keys[0].trusted_until == LIMIT  # normalised to UTC in the records' own form
    assert keys[1].trusted_until is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not a key at all", "holds no PEM public key"),
        ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "block 1 is not an Ed25519 public key"),
        ("Custody-Trusted-Untill: 2026-11-24T10:00:00Z\n{pem}", "unknown attribute Custody-Trusted-Untill"),
        ("Custody-Trusted-Until: yesterday\n{pem}", "must be an ISO 8601 time with a timezone"),
        ("Custody-Trusted-Until: 2026-11-24T10:00:00\n{pem}", "must be an ISO 8601 time with a timezone"),
        ("Custody-Key-Id: 0000000000000000\n{pem}", "says Custody-Key-Id: 0000000000000000 but its key's id is"),
        ("{pem}Custody-Trusted-Until: 2026-11-24T10:00:00Z\n", "follows the last key"),
        ("{private}", "block 1 is a PRIVATE KEY, not a PUBLIC KEY (give its public half"),
    ],
)
def test_anything_that_is_not_a_trusted_public_key_is_refused_naming_the_file(text: str, message: str) -> None:
    """Garbage, a broken block, a misspelt or malformed attribute, a wrong key id and a private key are each an error naming the file."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    body = text.format(pem=AuditSigner(key).public_pem(), private=private)
    with pytest.raises(ValueError, match=r"retired\.pem") as caught:
        parse_public_keys(body.encode(), "retired.pem")
    assert message in str(caught.value)


def test_a_directory_reads_every_visible_file_and_refuses_a_stray_one(tmp_path: Path) -> None:
    """Every file of a directory is read (hidden ones, such as a mounted volume's `..data`, skipped), a file that is not PEM is an error naming it, and an empty directory is an empty set."""
    first, second = signer(), signer()
    (tmp_path / "a.pem").write_text(pem_of(first))
    (tmp_path / "b.pem").write_text(pem_of(second))
    (tmp_path / "..data").mkdir()
    assert {key.key_id for key in read_public_keys(tmp_path)} == {first.key_id, second.key_id}
    (tmp_path / "notes.txt").write_text("the old key went in March")
    with pytest.raises(ValueError, match=r"notes\.txt holds no PEM public key"):
        read_public_keys(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert read_public_keys(empty) == []


def test_keys_are_found_by_id_and_a_retired_key_only_up_to_its_limit() -> None:
    """A key id outside the set is refused naming it; a retired key with a limit is refused for a signature dated after it or dated in another form."""
    current, retired, stranger = signer(), signer(), signer()
    keys = TrustedKeys([TrustedKey(current.public_key), TrustedKey(retired.public_key, LIMIT)])
    assert keys.key_for(current.key_id, "2099-01-01T00:00:00.000000Z").key_id == current.key_id
    assert keys.key_for(retired.key_id, BEFORE).key_id == retired.key_id
    assert keys.key_for(retired.key_id, LIMIT).key_id == retired.key_id
    with pytest.raises(UntrustedKey, match=f"retired key {retired.key_id} at {AFTER}, after it stopped being trusted"):
        keys.key_for(retired.key_id, AFTER)
    with pytest.raises(UntrustedKey, match="without a date its limit can be checked on"):
        keys.key_for(retired.key_id, "0")  # sorts before the limit as a string: refused all the same
    with pytest.raises(UntrustedKey, match=f"signed by key {stranger.key_id}, which is not a trusted audit key"):
        keys.key_for(stranger.key_id, BEFORE)
    with pytest.raises(UntrustedKey, match="with a malformed id"):
        keys.key_for(["not", "an", "id"], BEFORE)


def test_signatures_are_checked_with_the_key_their_id_names() -> None:
    """An attestation verifies with the key its id names among several, fails once its payload changes, and names a key outside the set."""
    old, new = signer(), signer()
    keys = TrustedKeys.of(new.public_key, old.public_key)
    attestation = old.sign_payload({"format": "x", "issued_at": BEFORE, "n": 1})
    assert attestation_refusal(attestation, keys, "issued_at") is None
    altered = attestation | {"payload": attestation["payload"] | {"n": 2}}
    assert attestation_refusal(altered, keys, "issued_at") == f"the signature is not valid for key {old.key_id}"
    assert attestation_refusal(attestation | {"signature": 7}, keys, "issued_at") is not None
    refusal = attestation_refusal(attestation, TrustedKeys.of(new.public_key), "issued_at")
    assert refusal is not None
    assert old.key_id in refusal


def test_the_same_key_twice_keeps_the_stricter_limit() -> None:
    """A key listed twice is kept once, under the earlier of its limits, so a compromised key cannot be made trusted again by listing it unbounded too."""
    key = signer()
    keys = TrustedKeys([TrustedKey(key.public_key), TrustedKey(key.public_key, LIMIT)])
    assert len(keys) == 1
    entry = keys.get(key.key_id)
    assert entry is not None
    assert entry.trusted_until == LIMIT


def test_writing_a_retired_key_keeps_the_others_and_replaces_its_own_entry(tmp_path: Path) -> None:
    """A retired key added to a file keeps the keys already there, and adding it again (now as compromised) leaves one entry with the limit; a directory gets a file per key."""
    first, second = signer(), signer()
    target = tmp_path / "retired.pem"
    write_retired_key(target, TrustedKey(first.public_key), "first")
    write_retired_key(target, TrustedKey(second.public_key), "second")
    write_retired_key(target, TrustedKey(second.public_key, LIMIT), "second, compromised")
    keys = read_public_keys(target)
    assert [(key.key_id, key.trusted_until) for key in keys] == [(first.key_id, None), (second.key_id, LIMIT)]
    assert target.stat().st_mode & 0o777 == 0o644
    assert list(tmp_path.iterdir()) == [target]  # no partial file left behind

    directory = tmp_path / "retired.d"
    directory.mkdir()
    written = write_retired_key(directory, TrustedKey(first.public_key, LIMIT), "first")
    assert written == directory / f"audit-{first.key_id}.pub.pem"
    assert [(key.key_id, key.trusted_until) for key in read_public_keys(directory)] == [(first.key_id, LIMIT)]
