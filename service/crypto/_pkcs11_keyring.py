"""A `Keyring` whose key-encryption keys live in an HSM, used through its PKCS#11 module.

Each KEK version is one AES-256 secret-key object on the token, labelled ``custody-kek-<n>``,
created sensitive and not extractable: its bytes never leave the token, and the token refuses
to show them. Data keys are wrapped and unwrapped inside the token with CKM_AES_KEY_WRAP
(RFC 3394 with its default IV), the very algorithm of the file keyring's `aes_kw_wrap`, so a
wrapped data key has the same 40 bytes whichever keyring made it.

How a data key crosses the token's boundary, and why so (SoftHSM2 2.6 is what the tests run):

- The token offers CKM_AES_KEY_WRAP for C_WrapKey and C_UnwrapKey only, not for C_Encrypt or
  C_Decrypt (SoftHSM2 lists the mechanism with CKF_WRAP | CKF_UNWRAP and nothing else), so
  there is no "decrypt the wrapped bytes" shortcut. Unwrapping therefore creates the data key
  as a session object (never stored on the token), extractable and not sensitive, reads its
  CKA_VALUE for AES-GCM in Python, and destroys it at once. Wrapping imports the data key as
  such a session object, wraps it under the current KEK, and destroys it.
- Rewrapping (rotation) never brings the data key out: it is unwrapped into a sensitive session
  object, which the token can wrap under the current KEK but will not show, then destroyed.

Thread safety: python-pkcs11 calls C_Initialize without locking arguments, which per PKCS#11
promises the module that no two threads call it at once. So every call into one module, from
any keyring of this process, runs under that module's lock; each keyring keeps one session of
its own. Login is per process and token (PKCS#11 shares it between all of a process's
sessions, and logging out of one logs out all), so one login session per token is shared and
counted, and the last keyring to close it logs out. A call takes about a tenth of a millisecond
against SoftHSM2 (ops/bench/keyrings.py), short enough to run on the event loop as the file
keyring's do.
"""

from __future__ import annotations

import hmac
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.exceptions import (
    DeviceRemoved,
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    GeneralError,
    NoSuchToken,
    PKCS11Error,
    SessionClosed,
    SessionHandleInvalid,
    TokenNotPresent,
    UserNotLoggedIn,
    WrappedKeyInvalid,
    WrappedKeyLenRange,
)

from ..errors import KeyringError, KeyUnwrapError
from ._keyring import WrappedKey

if TYPE_CHECKING:
    from ._keyring import Keyring

__all__ = ["KEK_LABEL_PREFIX", "Pkcs11Config", "Pkcs11Keyring"]

T = TypeVar("T")

KEK_LABEL_PREFIX: Final = "custody-kek-"
_KEK_LABEL = re.compile(re.escape(KEK_LABEL_PREFIX) + r"([1-9][0-9]{0,17})")
_KEK_BYTES: Final = 32
_DATA_KEY_SIZE: Final = 32
_WRAPPED_DATA_KEY_SIZE: Final = _DATA_KEY_SIZE + 8

# What a KEK may do: wrap and unwrap, nothing else, and never be read or changed.
_KEK_TEMPLATE: Final[dict[Attribute, Any]] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.MODIFIABLE: False,
    Attribute.WRAP: True,
    Attribute.UNWRAP: True,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
# A data key inside the token: a session object (gone when the session ends, destroyed sooner)
# that can be used for nothing; whether it may be read is set per use below.
_DATA_KEY_TEMPLATE: Final[dict[Attribute, Any]] = {
    Attribute.TOKEN: False,
    Attribute.PRIVATE: True,
    Attribute.EXTRACTABLE: True,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.ENCRYPT: False,
    Attribute.DECRYPT: False,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.DERIVE: False,
}
# What tokens answer when RFC 3394's integrity check fails: the standard codes, and
# CKR_GENERAL_ERROR, which is what SoftHSM2 returns for a wrong KEK or altered bytes.
_UNWRAP_REFUSALS: Final = (
    WrappedKeyInvalid,
    WrappedKeyLenRange,
    EncryptedDataInvalid,
    EncryptedDataLenRange,
    GeneralError,
)
# The session (or the login it relies on) is gone: the token restarted, or was pulled.
_SESSION_LOST: Final = (SessionHandleInvalid, SessionClosed, UserNotLoggedIn, DeviceRemoved, TokenNotPresent)


@dataclass(frozen=True)
class Pkcs11Config:
    """Where the KEKs are: the vendor's PKCS#11 module, the token's label and its user PIN."""

    module: Path
    token_label: str
    pin: str = field(repr=False)

    @property
    def source(self) -> str:
        """How messages name this keyring (never the PIN)."""
        return f"PKCS#11 token {self.token_label!r} (module {self.module})"


class _Module:
    """One loaded PKCS#11 module: its library handle, and the lock every call into it takes."""

    _loaded: dict[str, _Module] = {}  # noqa: RUF012 - the process-wide registry, on purpose
    _registry_lock = threading.Lock()

    def __init__(self, path: str) -> None:
        self.lib = pkcs11.lib(path)
        self.lock = threading.RLock()
        # token label -> (the login session, how many keyrings use it, the PIN it logged in with)
        self.logins: dict[str, tuple[Any, int, str]] = {}

    @classmethod
    def get(cls, path: Path) -> _Module:
        key = str(path)
        with cls._registry_lock:
            module = cls._loaded.get(key)
            if module is None:
                try:
                    module = cls._loaded[key] = _Module(key)
                except (OSError, PKCS11Error, RuntimeError) as exc:
                    raise KeyringError(f"cannot load the PKCS#11 module {path}: {type(exc).__name__}") from None
            return module

    def login(self, token: Any, config: Pkcs11Config, *, renew: bool = False) -> None:
        """Log this process in to the token, or count one more user of its login. Call under `lock`."""
        entry = self.logins.get(config.token_label)
        if entry is not None and not renew:
            session, users, pin = entry
            if not hmac.compare_digest(pin.encode(), config.pin.encode()):
                raise KeyringError(f"{config.source} is already open in this process with another PIN")
            self.logins[config.token_label] = (session, users + 1, pin)
            return
        users = 1
        if entry is not None:
            users = entry[1]
            _close_quietly(entry[0])
            del self.logins[config.token_label]
        # Read-write, like the keyrings' own sessions (rotation creates objects on the token).
        session = token.open(rw=True, user_pin=config.pin)
        self.logins[config.token_label] = (session, users, config.pin)

    def logout(self, token_label: str) -> None:
        """One user fewer; the last one closes the login session, which logs out. Call under `lock`."""
        entry = self.logins.get(token_label)
        if entry is None:
            return
        session, users, pin = entry
        if users > 1:
            self.logins[token_label] = (session, users - 1, pin)
            return
        del self.logins[token_label]
        _close_quietly(session)


def _close_quietly(session: Any) -> None:
    try:
        session.close()
    except PKCS11Error:
        pass  # already gone with the token; nothing is left to close


class Pkcs11Keyring:
    """KEKs as non-extractable AES-256 objects on a PKCS#11 token, labelled ``custody-kek-<n>``;
    the highest version wraps, all of them unwrap."""

    def __init__(self, config: Pkcs11Config, *, _allow_empty: bool = False) -> None:
        self._config = config
        self._module = _Module.get(config.module)
        self._closed = False
        self._keys: dict[int, Any] = {}
        with self._module.lock:
            try:
                self._token = self._module.lib.get_token(token_label=config.token_label)
            except NoSuchToken:
                raise KeyringError(f"no token labelled {config.token_label!r} in the module {config.module}") from None
            except PKCS11Error as exc:
                raise KeyringError(f"cannot reach {config.source}: {type(exc).__name__}") from None
            try:
                self._module.login(self._token, config)
            except PKCS11Error as exc:
                # PinIncorrect, PinLocked, ...: the type says which, the PIN is never repeated.
                raise KeyringError(f"cannot log in to {config.source}: {type(exc).__name__}") from None
            try:
                self._session = self._token.open(rw=True)
            except PKCS11Error as exc:
                self._release()
                raise KeyringError(f"cannot open a session on {config.source}: {type(exc).__name__}") from None
            try:
                self._load_keys()
            except PKCS11Error as exc:
                self.close()
                raise KeyringError(f"cannot read the KEKs of {config.source}: {type(exc).__name__}") from None
            except KeyringError:
                self.close()
                raise
        if not self._keys and not _allow_empty:
            self.close()
            raise KeyringError(
                f"{config.source} holds no key-encryption key (objects labelled {KEK_LABEL_PREFIX}<n>); "
                "create the first with `custody keyring init`"
            )

    @classmethod
    def initialize(cls, config: Pkcs11Config) -> Pkcs11Keyring:
        """Create KEK version 1 on a token that holds none; refuse a token that has one."""
        keyring = cls(config, _allow_empty=True)
        try:
            if keyring._keys:
                raise KeyringError(
                    f"{config.source} already holds KEK version(s) {keyring.versions()}; "
                    "`custody keyring rotate` adds one"
                )
            keyring.rotate()
        except BaseException:
            keyring.close()
            raise
        return keyring

    def __repr__(self) -> str:
        return f"Pkcs11Keyring({self._config.source}, versions={self.versions()})"

    @property
    def source(self) -> str:
        return self._config.source

    @property
    def current_version(self) -> int:
        return max(self._keys)

    def versions(self) -> list[int]:
        return sorted(self._keys)

    def wrap(self, data_key: bytes) -> WrappedKey:
        if len(data_key) != _DATA_KEY_SIZE:
            raise ValueError(f"data key must be {_DATA_KEY_SIZE} bytes, got {len(data_key)}")

        def work() -> WrappedKey:
            inside = self._session.create_object(
                {
                    **_DATA_KEY_TEMPLATE,
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.VALUE: data_key,
                    Attribute.SENSITIVE: False,
                }
            )
            try:
                return self._wrap_under_current(inside)
            finally:
                inside.destroy()

        return self._call("wrap a data key", work)

    def unwrap(self, wrapped: WrappedKey) -> bytes:
        def work() -> bytes:
            inside = self._unwrap_inside(wrapped, readable=True)
            try:
                return bytes(inside[Attribute.VALUE])
            finally:
                inside.destroy()

        return self._call("unwrap a data key", work)

    def rewrap(self, wrapped: WrappedKey) -> WrappedKey:
        """The same data key under the current KEK; it never leaves the token on the way."""

        def work() -> WrappedKey:
            inside = self._unwrap_inside(wrapped, readable=False)
            try:
                return self._wrap_under_current(inside)
            finally:
                inside.destroy()

        return self._call("rewrap a data key", work)

    def rotate(self) -> int:
        """Generate the next KEK version on the token; it becomes current. Returns it."""

        def work() -> int:
            self._load_keys()  # another process may have rotated since
            version = max(self._keys, default=0) + 1
            label = f"{KEK_LABEL_PREFIX}{version}"
            created = self._session.generate_key(
                KeyType.AES, _KEK_BYTES * 8, label=label, store=True, template=_KEK_TEMPLATE
            )
            same = list(self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.LABEL: label}))
            if len(same) > 1:
                # Another rotation made this version at the same moment. Nothing is wrapped under
                # ours yet (the caller has not been given it), so it goes, and the caller retries.
                created.destroy()
                raise KeyringError(f"another rotation created KEK version {version} at the same time; run it again")
            self._keys[version] = created
            return version

        return self._call("rotate the KEK", work)

    def close(self) -> None:
        """End this keyring's session (and the process's login, if it was the last user)."""
        with self._module.lock:
            if self._closed:
                return
            _close_quietly(self._session)
            self._release()

    # --- inside the module lock -------------------------------------------------------------

    def _release(self) -> None:
        self._closed = True
        self._keys = {}
        self._module.logout(self._config.token_label)

    def _call(self, what: str, work: Callable[[], T]) -> T:
        """Run `work` under the module's lock; translate the token's errors at this boundary, and
        reopen the session (and the login) once if the token lost it."""
        with self._module.lock:
            if self._closed:
                raise KeyringError(f"the keyring on {self.source} is closed")
            try:
                try:
                    return work()
                except _SESSION_LOST:
                    self._reopen()
                    return work()
            except _UNWRAP_REFUSALS as exc:
                raise KeyUnwrapError(
                    f"wrapped key failed its integrity check on {self.source} ({type(exc).__name__}): "
                    "wrong KEK or tampered bytes"
                ) from None
            except PKCS11Error as exc:
                raise KeyringError(f"cannot {what} on {self.source}: {type(exc).__name__}") from None

    def _reopen(self) -> None:
        _close_quietly(self._session)
        self._module.login(self._token, self._config, renew=True)
        self._session = self._token.open(rw=True)
        self._load_keys()

    def _wrap_under_current(self, inside: Any) -> WrappedKey:
        version = self.current_version
        return WrappedKey(version, bytes(self._keys[version].wrap_key(inside, mechanism=Mechanism.AES_KEY_WRAP)))

    def _unwrap_inside(self, wrapped: WrappedKey, *, readable: bool) -> Any:
        kek = self._keys.get(wrapped.kek_version)
        if kek is None:
            # Another process rotated (or the version never existed): look at the token again.
            self._load_keys()
            kek = self._keys.get(wrapped.kek_version)
        if kek is None:
            raise KeyUnwrapError(f"unknown KEK version {wrapped.kek_version}; {self.source} has {self.versions()}")
        # Only 32-byte data keys are ever wrapped, so any other length is corruption.
        if len(wrapped.wrapped) != _WRAPPED_DATA_KEY_SIZE:
            raise KeyUnwrapError(f"wrapped data key has invalid length {len(wrapped.wrapped)}")
        return kek.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            wrapped.wrapped,
            mechanism=Mechanism.AES_KEY_WRAP,
            store=False,
            template={**_DATA_KEY_TEMPLATE, Attribute.SENSITIVE: not readable},
        )

    def _load_keys(self) -> None:
        """Read every KEK version from the token, refusing one that could leave it."""
        keys: dict[int, Any] = {}
        for obj in self._session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY}):
            match = _KEK_LABEL.fullmatch(cast(str, obj[Attribute.LABEL]))
            if match is None:
                continue
            version = int(match.group(1))
            if version in keys:
                raise KeyringError(f"{self.source} holds two objects labelled {KEK_LABEL_PREFIX}{version}")
            _check_kek(obj, f"{self.source}, {KEK_LABEL_PREFIX}{version}")
            keys[version] = obj
        self._keys = keys


def _check_kek(obj: Any, name: str) -> None:
    """A KEK must be an AES-256 key that wraps and unwraps and whose value cannot be read."""
    wanted = [Attribute.KEY_TYPE, Attribute.VALUE_LEN, Attribute.SENSITIVE, Attribute.EXTRACTABLE]
    attributes = obj.get_attributes([*wanted, Attribute.WRAP, Attribute.UNWRAP])
    if attributes[Attribute.KEY_TYPE] != KeyType.AES or attributes[Attribute.VALUE_LEN] != _KEK_BYTES:
        raise KeyringError(f"{name} is not a 256-bit AES key")
    if not attributes[Attribute.SENSITIVE] or attributes[Attribute.EXTRACTABLE]:
        raise KeyringError(f"{name} could leave the token (it must be sensitive and not extractable)")
    if not (attributes[Attribute.WRAP] and attributes[Attribute.UNWRAP]):
        raise KeyringError(f"{name} is not allowed to wrap and unwrap keys")


if TYPE_CHECKING:
    # Static proof that Pkcs11Keyring satisfies the Keyring protocol.
    def _is_keyring(keyring: Pkcs11Keyring) -> Keyring:
        return keyring
