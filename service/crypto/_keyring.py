"""Versioned key-encryption keys (KEKs) that wrap per-conversation data keys."""

from __future__ import annotations

import base64
import binascii
import json
import os
import secrets
import stat
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from cryptography.hazmat.primitives.keywrap import InvalidUnwrap, aes_key_unwrap, aes_key_wrap

from ..errors import KeyringError, KeyUnwrapError

__all__ = [
    "FORMAT",
    "KEK_SIZE",
    "FileKeyring",
    "KeyUnwrapError",
    "Keyring",
    "KeyringError",
    "LocalKeyring",
    "WrappedKey",
    "aes_kw_unwrap",
    "aes_kw_wrap",
]

FORMAT: Final = "custody-keyring-v1"
KEK_SIZE: Final = 32
# Kept local rather than imported from envelope so the keyring does not depend on the step format.
_DATA_KEY_SIZE: Final = 32
_WRAPPED_DATA_KEY_SIZE: Final = _DATA_KEY_SIZE + 8  # RFC 3394 adds one 64-bit block
_AES_KEY_SIZES: Final = frozenset({16, 24, 32})

# Wrapping uses AES key wrap (RFC 3394 / SP 800-38F KW) rather than AES-GCM. KW is deterministic
# and needs no nonce, so wrapping spends no nonce budget on the KEK: every rotation rewraps every
# DEK, and SP 800-38D caps random-nonce GCM at 2**32 invocations per key, a limit a long-lived
# KEK over many conversations could approach. KW still authenticates (a tampered or mis-keyed
# blob fails unwrap); what it lacks is associated data, so the KEK version travels beside the
# wrapped key in WrappedKey.


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key wrapped under one KEK version, as stored next to a conversation."""

    kek_version: int
    # Wrapped bytes are protected by the KEK, but they are still key material: keep them out
    # of reprs, which end up in logs and tracebacks.
    wrapped: bytes = field(repr=False)


class Keyring(Protocol):
    """What the envelope layer needs from a KEK store; a cloud KMS can implement it too."""

    @property
    def current_version(self) -> int:
        """The KEK version that new wraps use."""

    def wrap(self, data_key: bytes) -> WrappedKey:
        """Wrap a data key under the current KEK."""

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        """Return the data key, or raise ``KeyUnwrapError``."""

    def versions(self) -> list[int]:
        """All KEK versions that can still unwrap, ascending."""

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        """The same data key wrapped under the current KEK (rotation), never exposed outside."""

    def rotate(self) -> int:
        """Add a new KEK version, make it current, persist it; return it."""


def _check_kek(kek: bytes) -> None:
    if len(kek) not in _AES_KEY_SIZES:
        raise ValueError(f"KEK must be 16, 24 or 32 bytes, got {len(kek)}")


def aes_kw_wrap(kek: bytes, key: bytes) -> bytes:
    """Wrap ``key`` with RFC 3394 AES key wrap; raise ``ValueError`` for refused sizes."""
    _check_kek(kek)
    # SP 800-38F defines KW for 16 bytes and up in 64-bit blocks; RFC 3394's one-block
    # special case for 8-byte keys is not something we need, so we refuse it.
    if len(key) < 16 or len(key) % 8:
        raise ValueError(f"key to wrap must be at least 16 bytes in 8-byte blocks, got {len(key)}")
    return aes_key_wrap(kek, key)


def aes_kw_unwrap(kek: bytes, wrapped: bytes) -> bytes:
    """Unwrap an RFC 3394 blob; raise ``KeyUnwrapError`` if it does not authenticate."""
    _check_kek(kek)
    if len(wrapped) < 24 or len(wrapped) % 8:
        raise KeyUnwrapError(f"wrapped key has invalid length {len(wrapped)}")
    try:
        return aes_key_unwrap(kek, wrapped)
    except InvalidUnwrap:
        raise KeyUnwrapError("wrapped key failed its integrity check: wrong KEK or tampered bytes") from None


class LocalKeyring:
    """KEKs held in a local JSON file (mode 0600); the current version wraps, all unwrap."""

    __slots__ = ("_current", "_keys")

    def __init__(self, keys: Mapping[int, bytes], current: int) -> None:
        if not keys:
            raise ValueError("a keyring needs at least one key")
        for version, kek in keys.items():
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise ValueError(f"key versions must be positive integers, got {version!r}")
            if len(kek) != KEK_SIZE:
                raise ValueError(f"key version {version} is {len(kek)} bytes, expected {KEK_SIZE}")
        if current not in keys:
            raise ValueError(f"current version {current} is not among the keys {sorted(keys)}")
        self._keys: dict[int, bytes] = dict(keys)
        self._current: int = current

    def __repr__(self) -> str:
        return f"LocalKeyring(versions={self.versions()}, current={self._current})"

    @property
    def current_version(self) -> int:
        return self._current

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def wrap(self, data_key: bytes) -> WrappedKey:
        if len(data_key) != _DATA_KEY_SIZE:
            raise ValueError(f"data key must be {_DATA_KEY_SIZE} bytes, got {len(data_key)}")
        return WrappedKey(self._current, aes_kw_wrap(self._keys[self._current], data_key))

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        kek = self._keys.get(wrapped.kek_version)
        if kek is None:
            raise KeyUnwrapError(f"unknown KEK version {wrapped.kek_version}; keyring has {self.versions()}")
        # Only 32-byte DEKs are ever wrapped, so any other length is corruption.
        if len(wrapped.wrapped) != _WRAPPED_DATA_KEY_SIZE:
            raise KeyUnwrapError(f"wrapped data key has invalid length {len(wrapped.wrapped)}")
        return aes_kw_unwrap(kek, wrapped.wrapped)

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        """Rewrap a data key under the current KEK; step ciphertext stays untouched."""
        return self.wrap(self.unwrap(wrapped))

    @classmethod
    def generate(cls, path: Path) -> LocalKeyring:
        """Create a new keyring file with one key, version 1; never overwrite a file."""
        if os.path.lexists(path):
            raise KeyringError(f"refusing to overwrite existing keyring file {path}")
        keyring = cls({1: secrets.token_bytes(KEK_SIZE)}, current=1)
        _write_private(path, keyring._serialize(), overwrite=False)
        return keyring

    @classmethod
    def load(cls, path: Path) -> LocalKeyring:
        """Read a keyring file, refusing one that group or other users can access."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KeyringError(f"keyring file {path} does not exist") from None
        except OSError as exc:
            raise KeyringError(f"cannot open keyring file {path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as file:
            # fstat on the open descriptor, so the mode we check is the file we read.
            mode = os.fstat(file.fileno()).st_mode
            if not stat.S_ISREG(mode):
                raise KeyringError(f"keyring file {path} is not a regular file")
            if mode & 0o077:
                raise KeyringError(
                    f"keyring file {path} has mode {stat.S_IMODE(mode):04o}, so group or other "
                    f"users can access it; run `chmod 600 {path}`"
                )
            try:
                raw = file.read()
            except OSError as exc:
                raise KeyringError(f"cannot read keyring file {path}: {exc.strerror}") from None
        try:
            return cls._parse(raw)
        except ValueError as exc:
            # Parse errors are written to carry no key bytes; JSON errors give positions only.
            raise KeyringError(f"keyring file {path} is malformed: {exc}") from None

    def rotate(self, path: Path) -> int:
        """Add a new KEK version, make it current, save atomically; return the new version."""
        # Losing a KEK shreds every DEK it wraps, so never write over a file that gained keys
        # since we loaded it (another process rotated); the operator reloads and retries.
        on_disk = LocalKeyring.load(path)
        if on_disk._keys != self._keys or on_disk._current != self._current:
            raise KeyringError(
                f"keyring file {path} changed since it was loaded "
                f"(file has {on_disk!r}, memory has {self!r}); reload before rotating"
            )
        new_version = max(self._keys) + 1
        keys = {**self._keys, new_version: secrets.token_bytes(KEK_SIZE)}
        _write_private(path, _serialize(keys, new_version), overwrite=True)
        # Switch in memory only after the file is durable, so a failed save changes nothing.
        self._keys, self._current = keys, new_version
        return new_version

    def _serialize(self) -> bytes:
        return _serialize(self._keys, self._current)

    @classmethod
    def _parse(cls, raw: bytes) -> LocalKeyring:
        try:
            doc: Any = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        except json.JSONDecodeError as exc:
            where = f"line {exc.lineno} column {exc.colno}"
            raise ValueError(f"not JSON ({exc.msg} at {where})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ValueError(f'expected a JSON object with "format": "{FORMAT}"')
        if set(doc) != {"format", "current", "keys"}:
            raise ValueError('expected exactly the fields "format", "current" and "keys"')
        current, entries = doc["current"], doc["keys"]
        if isinstance(current, bool) or not isinstance(current, int):
            raise ValueError('"current" must be an integer version')
        if not isinstance(entries, dict):
            raise ValueError('"keys" must be an object mapping versions to base64 keys')
        keys: dict[int, bytes] = {}
        for name, encoded in entries.items():
            # Canonical decimal only, so "1" and "01" cannot name two different keys.
            if not (name.isascii() and name.isdigit() and str(int(name)) == name):
                raise ValueError(f"key version {name!r} is not a decimal integer")
            if not isinstance(encoded, str):
                raise ValueError(f"key version {name} must be a base64 string")
            try:
                keys[int(name)] = base64.b64decode(encoded, validate=True)
            except binascii.Error:
                raise ValueError(f"key version {name} is not valid base64") from None
        return cls(keys, current)


def _serialize(keys: Mapping[int, bytes], current: int) -> bytes:
    doc = {
        "format": FORMAT,
        "current": current,
        "keys": {str(v): base64.b64encode(keys[v]).decode("ascii") for v in sorted(keys)},
    }
    return (json.dumps(doc, indent=2) + "\n").encode("utf-8")


def _write_private(path: Path, data: bytes, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` atomically, mode 0600, via a temp file in the same directory."""
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        # Created 0600 (a umask can only remove bits) and O_EXCL, so the key bytes never sit
        # in a file others could open, nor in one someone else created.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            # link() fails if the target exists, closing the race a check-then-replace leaves.
            os.link(tmp, path)
            os.unlink(tmp)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)  # make the rename itself durable
        finally:
            os.close(dir_fd)
    except FileExistsError:
        raise KeyringError(f"refusing to overwrite existing keyring file {path}") from None
    except OSError as exc:
        raise KeyringError(f"cannot write keyring file {path}: {exc.strerror}") from None
    finally:
        tmp.unlink(missing_ok=True)


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


if TYPE_CHECKING:
    # Static proof that FileKeyring satisfies the Keyring protocol.
    def _is_keyring(keyring: FileKeyring) -> Keyring:
        return keyring
