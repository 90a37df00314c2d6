"""Encryption at rest: the envelope scheme, the keyrings that wrap data keys (a file, or an HSM
through PKCS#11), rotation and sentinels."""

from ._envelope import (
    KEY_SIZE,
    NONCE_SIZE,
    TAG_SIZE,
    DecryptionError,
    StepCipher,
    aesgcm_decrypt,
    aesgcm_encrypt,
    new_data_key,
    open_sealed,
    record_aad,
    seal,
    step_aad,
)
from ._expiry import SEALED_DATA_KEY_SIZE, data_key_aad, open_data_key_layer, seal_data_key_layer
from ._key_cache import DataKeyCache
from ._keyring import (
    FORMAT,
    KEK_SIZE,
    FileKeyring,
    Keyring,
    KeyringError,
    KeyUnwrapError,
    LocalKeyring,
    WrappedKey,
    aes_kw_unwrap,
    aes_kw_wrap,
)
from ._pkcs11_keyring import KEK_LABEL_PREFIX, Pkcs11Config, Pkcs11Keyring
from ._rotation import RotationResult, rewrap_data_keys
from ._sentinels import ensure_current_sentinel, unreadable_versions, verify_keyring

__all__ = [
    "FORMAT",
    "KEK_LABEL_PREFIX",
    "KEK_SIZE",
    "KEY_SIZE",
    "NONCE_SIZE",
    "SEALED_DATA_KEY_SIZE",
    "TAG_SIZE",
    "DataKeyCache",
    "DecryptionError",
    "FileKeyring",
    "KeyUnwrapError",
    "Keyring",
    "KeyringError",
    "LocalKeyring",
    "Pkcs11Config",
    "Pkcs11Keyring",
    "RotationResult",
    "StepCipher",
    "WrappedKey",
    "aes_kw_unwrap",
    "aes_kw_wrap",
    "aesgcm_decrypt",
    "aesgcm_encrypt",
    "data_key_aad",
    "ensure_current_sentinel",
    "new_data_key",
    "open_data_key_layer",
    "open_sealed",
    "record_aad",
    "rewrap_data_keys",
    "seal",
    "seal_data_key_layer",
    "step_aad",
    "unreadable_versions",
    "verify_keyring",
]
