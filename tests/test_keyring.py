"""Tests for service.keyring: versioned KEKs, AES key wrap and the keyring file."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.crypto import (
    FORMAT,
    KeyringError,
    KeyUnwrapError,
    LocalKeyring,
    WrappedKey,
    aes_kw_unwrap,
    aes_kw_wrap,
)
from service.crypto._keyring import _write_private

from .conftest import KeyringUnderTest
from .wycheproof import declared_count, vector_cases

KW_CASES = vector_cases("aes_wrap_test.json")


@pytest.mark.parametrize(("group", "case"), KW_CASES)
def test_wycheproof_aes_key_wrap(group: dict[str, Any], case: dict[str, Any]) -> None:
    """Valid vectors wrap and unwrap exactly; invalid ones, and 8-byte keys, are rejected."""
    kek, msg, ct = (bytes.fromhex(case[field]) for field in ("key", "msg", "ct"))
    if case["result"] == "valid":
        assert aes_kw_wrap(kek, msg) == ct
        assert aes_kw_unwrap(kek, ct) == msg
        return
    if case["result"] == "acceptable":
        # RFC 3394 allows wrapping 8-byte keys, SP 800-38F does not; we refuse them by design.
        assert case["flags"] == ["ShortKey"]
    with pytest.raises(KeyUnwrapError):
        aes_kw_unwrap(kek, ct)
    if len(msg) >= 16 and len(msg) % 8 == 0:
        assert aes_kw_wrap(kek, msg) != ct
    else:
        with pytest.raises(ValueError, match="key to wrap must be at least 16 bytes in 8-byte blocks"):
            aes_kw_wrap(kek, msg)


def test_wycheproof_kw_cases_all_collected() -> None:
    """Every vector the key-wrap file declares is parametrized above, none dropped."""
    assert len(KW_CASES) == declared_count("aes_wrap_test.json")


@pytest.fixture
def keyring_path(tmp_path: Path) -> Path:
    return tmp_path / "keyring.json"


@pytest.fixture
def open_umask() -> Iterator[None]:
    # A permissive umask proves the 0600 mode comes from our code, not the environment.
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _file_keys(path: Path) -> list[bytes]:
    return [base64.b64decode(v) for v in json.loads(path.read_text())["keys"].values()]


@pytest.mark.usefixtures("open_umask")
def test_generate_creates_private_file_with_one_key(keyring_path: Path) -> None:
    """generate writes a mode-0600 keyring holding one 256-bit key as version 1, no temp files."""
    keyring = LocalKeyring.generate(keyring_path)
    assert _mode(keyring_path) == 0o600
    doc = json.loads(keyring_path.read_text())
    assert doc["format"] == FORMAT
    assert doc["current"] == 1
    assert [len(k) for k in _file_keys(keyring_path)] == [32]
    assert keyring.versions() == [1]
    assert keyring.current_version == 1
    assert list(keyring_path.parent.iterdir()) == [keyring_path]


def test_generate_refuses_to_overwrite(keyring_path: Path) -> None:
    """generate on an existing path raises KeyringError and leaves the file unchanged."""
    keyring_path.write_text("precious")
    with pytest.raises(KeyringError, match="overwrite"):
        LocalKeyring.generate(keyring_path)
    assert keyring_path.read_text() == "precious"


def test_no_overwrite_write_is_atomic_against_a_racing_file(keyring_path: Path) -> None:
    """A file that appears after generate's existence check is still never overwritten."""
    keyring_path.write_text("created by a racing process")
    with pytest.raises(KeyringError, match="overwrite"):
        _write_private(keyring_path, b"new", overwrite=False)
    assert keyring_path.read_text() == "created by a racing process"
    assert list(keyring_path.parent.iterdir()) == [keyring_path]


def test_load_round_trips_generated_keyring(keyring_path: Path) -> None:
    """A loaded keyring unwraps what the generating instance wrapped."""
    wrapped = LocalKeyring.generate(keyring_path).wrap(b"d" * 32)
    assert LocalKeyring.load(keyring_path).unwrap(wrapped) == b"d" * 32


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_load_refuses_file_others_can_access(keyring_path: Path, mode: int) -> None:
    """load refuses a keyring file with any group or other permission bit and says to chmod 600."""
    LocalKeyring.generate(keyring_path)
    keyring_path.chmod(mode)
    with pytest.raises(KeyringError, match="chmod 600") as excinfo:
        LocalKeyring.load(keyring_path)
    assert str(keyring_path) in str(excinfo.value)


def test_load_missing_file_names_path(keyring_path: Path) -> None:
    """load of a missing file raises KeyringError naming the path."""
    with pytest.raises(KeyringError, match="does not exist") as excinfo:
        LocalKeyring.load(keyring_path)
    assert str(keyring_path) in str(excinfo.value)


_KEY = base64.b64encode(b"S" * 32).decode()


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        b"\xff\xfe",
        json.dumps({"format": "other", "current": 1, "keys": {"1": _KEY}}).encode(),
        json.dumps({"format": FORMAT, "current": 2, "keys": {"1": _KEY}}).encode(),
        json.dumps({"format": FORMAT, "current": 1, "keys": {}}).encode(),
        json.dumps({"format": FORMAT, "current": "1", "keys": {"1": _KEY}}).encode(),
        json.dumps({"format": FORMAT, "current": 1, "keys": {"01": _KEY}}).encode(),
        json.dumps({"format": FORMAT, "current": 1, "keys": {"1": _KEY[:-4]}}).encode(),
        json.dumps({"format": FORMAT, "current": 1, "keys": {"1": "!!" + _KEY}}).encode(),
        json.dumps({"format": FORMAT, "current": 1, "keys": {"1": _KEY}, "x": 1}).encode(),
    ],
    ids=[
        "not-json",
        "not-utf8",
        "format",
        "current-missing",
        "no-keys",
        "current-type",
        "version-spelling",
        "short-key",
        "bad-base64",
        "extra-field",
    ],
)
def test_malformed_file_error_names_path_not_keys(keyring_path: Path, content: bytes) -> None:
    """A malformed keyring file raises KeyringError naming the path and no key material."""
    keyring_path.write_bytes(content)
    keyring_path.chmod(0o600)
    with pytest.raises(KeyringError, match="malformed") as excinfo:
        LocalKeyring.load(keyring_path)
    assert str(keyring_path) in str(excinfo.value)
    assert _KEY[:16] not in str(excinfo.value)
    assert "SSSS" not in str(excinfo.value)


def test_rotate_saves_a_private_file_that_reloads(keyring_path: Path) -> None:
    """LocalKeyring.rotate saves the new current version in a 0600 file, and a reload unwraps old data keys."""
    keyring = LocalKeyring.generate(keyring_path)
    old = keyring.wrap(b"a" * 32)
    assert keyring.rotate(keyring_path) == 2
    assert _mode(keyring_path) == 0o600
    reloaded = LocalKeyring.load(keyring_path)
    assert reloaded.current_version == 2
    assert reloaded.unwrap(old) == b"a" * 32
    assert list(keyring_path.parent.iterdir()) == [keyring_path]


def test_rotate_refuses_when_file_changed_since_load(keyring_path: Path) -> None:
    """rotate from a stale instance raises instead of dropping a key another process added."""
    first = LocalKeyring.generate(keyring_path)
    stale = LocalKeyring.load(keyring_path)
    first.rotate(keyring_path)
    with pytest.raises(KeyringError, match="changed since it was loaded"):
        stale.rotate(keyring_path)
    assert LocalKeyring.load(keyring_path).versions() == [1, 2]


# --- the Keyring protocol, for each kind of keyring: a file, and KEKs in a PKCS#11 token ----------


def test_rotation_adds_a_current_version_and_keeps_old_ones(keyring_under_test: KeyringUnderTest) -> None:
    """rotate makes a new current version that new wraps use, and data keys under the old one still unwrap."""
    keyring = keyring_under_test.keyring
    old = keyring.wrap(b"a" * 32)
    assert keyring.rotate() == 2
    assert keyring.current_version == 2
    assert keyring.versions() == [1, 2]
    assert keyring.wrap(b"b" * 32).kek_version == 2
    assert keyring.unwrap(old) == b"a" * 32


def test_rewrap_moves_data_key_to_current_version(keyring_under_test: KeyringUnderTest) -> None:
    """rewrap returns the same data key wrapped under the current KEK version."""
    keyring = keyring_under_test.keyring
    old = keyring.wrap(b"c" * 32)
    keyring.rotate()
    new = keyring.rewrap(old)
    assert new.kek_version == 2
    assert new.wrapped != old.wrapped
    assert keyring.unwrap(new) == b"c" * 32


def test_unwrap_rejects_every_flipped_bit(keyring_under_test: KeyringUnderTest) -> None:
    """Flipping any single bit of a wrapped data key makes unwrap raise KeyUnwrapError."""
    keyring = keyring_under_test.keyring
    wrapped = keyring.wrap(b"e" * 32)
    for bit in range(len(wrapped.wrapped) * 8):
        tampered = bytearray(wrapped.wrapped)
        tampered[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(KeyUnwrapError):
            keyring.unwrap(WrappedKey(wrapped.kek_version, bytes(tampered)))


@pytest.mark.parametrize("size", [0, 8, 32, 39, 41, 48])
def test_unwrap_rejects_wrapped_keys_of_another_length(keyring_under_test: KeyringUnderTest, size: int) -> None:
    """A wrapped data key that is not 40 bytes fails to unwrap with KeyUnwrapError."""
    with pytest.raises(KeyUnwrapError, match="invalid length"):
        keyring_under_test.keyring.unwrap(WrappedKey(1, bytes(size)))


def test_unwrap_rejects_wrong_or_unknown_version(keyring_under_test: KeyringUnderTest) -> None:
    """A wrapped key labelled with another existing version or an unknown one fails to unwrap."""
    keyring = keyring_under_test.keyring
    wrapped = keyring.wrap(b"f" * 32)
    keyring.rotate()
    with pytest.raises(KeyUnwrapError):
        keyring.unwrap(WrappedKey(2, wrapped.wrapped))
    with pytest.raises(KeyUnwrapError, match="unknown KEK version 7"):
        keyring.unwrap(WrappedKey(7, wrapped.wrapped))


@pytest.mark.parametrize("size", [16, 24, 31, 33, 64])
def test_wrap_requires_256_bit_data_keys(keyring_under_test: KeyringUnderTest, size: int) -> None:
    """wrap refuses data keys that are not 32 bytes."""
    with pytest.raises(ValueError, match="32 bytes"):
        keyring_under_test.keyring.wrap(bytes(size))


def test_wrapping_is_deterministic(keyring_under_test: KeyringUnderTest) -> None:
    """A data key wraps deterministically (RFC 3394 has no nonce): the same key under the same version gives the same 40 bytes, which unwrap back."""
    keyring = keyring_under_test.keyring
    first, again = keyring.wrap(b"h" * 32), keyring.wrap(b"h" * 32)
    assert first == again
    assert len(first.wrapped) == 40
    assert keyring.unwrap(first) == b"h" * 32


def test_constructor_requires_256_bit_keks() -> None:
    """LocalKeyring refuses KEKs that are not 32 bytes, although KW itself allows 16 and 24."""
    with pytest.raises(ValueError, match="expected 32"):
        LocalKeyring({1: bytes(16)}, current=1)


def test_reprs_show_no_key_material(keyring_path: Path) -> None:
    """repr of a keyring and of a wrapped key shows versions only, never key bytes."""
    keyring = LocalKeyring.generate(keyring_path)
    keyring.rotate(keyring_path)
    wrapped = keyring.wrap(b"g" * 32)
    text = f"{keyring!r} {wrapped!r}"
    assert text == "LocalKeyring(versions=[1, 2], current=2) WrappedKey(kek_version=2)"
    for secret in [*_file_keys(keyring_path), wrapped.wrapped]:
        assert secret.hex() not in text
        assert base64.b64encode(secret).decode() not in text
