"""The three secrets Custody keeps outside its database, and how they are found or made.

- the keyring (`CUSTODY_KEYRING`): the key-encryption keys that wrap every conversation's data key;
  or, when they live in an HSM, the PIN of its token (`CUSTODY_PKCS11_PIN_FILE`, beside
  `CUSTODY_PKCS11_MODULE` and `CUSTODY_PKCS11_TOKEN_LABEL`), which is never generated;
- the pepper (`CUSTODY_PEPPER_FILE`): keys the HMACs of API-key secrets, data-subject ids,
  Idempotency-Keys and request fingerprints;
- the audit signing key (`CUSTODY_AUDIT_SIGNING_KEY`): the Ed25519 key that signs audit checkpoints.

Losing or swapping any of them locks data away for good (the keyring), invalidates every API key
(the pepper), or makes old checkpoints unverifiable (the signing key, unless it was replaced with
`custody audit rotate-signing-key`, which keeps its public half among the retired keys,
`CUSTODY_AUDIT_RETIRED_PUBLIC_KEYS`: not a secret, but read here as strictly). So they are
generated only for the zero-config run, in its data dir, and said so at startup. A deployment (DATABASE_URL set)
must name each one: a missing variable or file stops startup with a message naming it, and
`custody secrets init DIR` makes all three for a first deployment.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from .audit import AuditSigner, TrustedKeys, read_public_keys
from .config import Settings
from .crypto import FileKeyring, Keyring, KeyringError, LocalKeyring, Pkcs11Config, Pkcs11Keyring
from .errors import ConfigurationError

__all__ = [
    "SecretPaths",
    "init_secrets",
    "keyring_source",
    "load_keyring",
    "load_pepper",
    "load_retired_keys",
    "load_signer",
    "pkcs11_config",
    "stage_secrets",
]

_PEPPER_BYTES = 32
_INIT_HINT = "create them with `custody secrets init DIR` and set the variables it prints"


@dataclass(frozen=True)
class SecretPaths:
    """Where `custody secrets init` put each secret, by the variable that names it."""

    keyring: Path
    pepper: Path
    audit_signing_key: Path

    def as_environment(self) -> list[str]:
        return [
            f"CUSTODY_KEYRING={self.keyring}",
            f"CUSTODY_PEPPER_FILE={self.pepper}",
            f"CUSTODY_AUDIT_SIGNING_KEY={self.audit_signing_key}",
        ]


def _locate(settings: Settings, given: Path | None, variable: str, default_name: str) -> tuple[Path, bool]:
    """(path, may generate): a given path must exist; only the zero-config run generates."""
    if given is not None:
        if not given.exists():
            raise ConfigurationError(f"{variable}={given} does not exist; {_INIT_HINT}")
        return given, False
    if settings.deployment:
        raise ConfigurationError(
            f"{variable} is not set: with DATABASE_URL set Custody never generates this secret; {_INIT_HINT}"
        )
    return settings.data_dir / default_name, True


def load_keyring(settings: Settings, announce: list[str]) -> Keyring:
    """The file keyring, or the PKCS#11 keyring when CUSTODY_PKCS11_MODULE is set."""
    config = pkcs11_config(settings)
    if config is not None:
        try:
            return Pkcs11Keyring(config)
        except KeyringError as exc:
            raise ConfigurationError(str(exc)) from None
    path, may_generate = _locate(settings, settings.keyring_path, "CUSTODY_KEYRING", "keyring.json")
    try:
        if may_generate and not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            LocalKeyring.generate(path)
            announce.append(
                f"EMBEDDED DEFAULT: generated a local keyring at {path} (set CUSTODY_KEYRING for a managed one)"
            )
        return FileKeyring(path)
    except KeyringError as exc:
        raise ConfigurationError(str(exc)) from None


def keyring_source(keyring: Keyring) -> str:
    """How startup messages name a keyring: its file, or its token (never key bytes or a PIN)."""
    if isinstance(keyring, FileKeyring):
        return str(keyring.path)
    if isinstance(keyring, Pkcs11Keyring):
        return keyring.source
    return repr(keyring)


def pkcs11_config(settings: Settings) -> Pkcs11Config | None:
    """Where the HSM's KEKs are, with the PIN read from its file; None for the file keyring."""
    module, label, pin_path = settings.pkcs11_module, settings.pkcs11_token_label, settings.pkcs11_pin_path
    if module is None:
        return None
    if label is None or pin_path is None:
        unset = "CUSTODY_PKCS11_TOKEN_LABEL" if label is None else "CUSTODY_PKCS11_PIN_FILE"
        raise ConfigurationError(f"CUSTODY_PKCS11_MODULE is set but {unset} is not: the PKCS#11 keyring needs both")
    if settings.keyring_path is not None:
        raise ConfigurationError(
            "both CUSTODY_KEYRING and CUSTODY_PKCS11_MODULE are set: name one keyring, the file or the HSM"
        )
    if not module.is_file():
        raise ConfigurationError(f"CUSTODY_PKCS11_MODULE={module} does not exist (the HSM vendor's PKCS#11 library)")
    return Pkcs11Config(module=module, token_label=label, pin=_read_pin(pin_path))


def _read_pin(path: Path) -> str:
    """The token's user PIN from its file: fail closed, as for every other secret."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigurationError(f"CUSTODY_PKCS11_PIN_FILE={path} does not exist") from None
    except OSError as exc:
        raise ConfigurationError(f"cannot open CUSTODY_PKCS11_PIN_FILE={path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as file:
        # fstat on the open descriptor, so the mode we check is the file we read.
        mode = os.fstat(file.fileno()).st_mode
        if mode & 0o077:
            raise ConfigurationError(f"{path} is readable by group or others: run chmod 600 {path}")
        raw = file.read()
    try:
        # One trailing newline is how editors and `echo` end a file; it is not part of the PIN.
        pin = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
    except UnicodeDecodeError:
        raise ConfigurationError(f"the PIN in {path} is not UTF-8 text") from None
    if not pin:
        raise ConfigurationError(f"the PIN file {path} is empty")
    return pin


def load_pepper(settings: Settings, announce: list[str]) -> bytes:
    """The secret that keys Custody's HMACs; refuses a file others can read."""
    path, may_generate = _locate(settings, settings.pepper_path, "CUSTODY_PEPPER_FILE", "api-key-pepper")
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ConfigurationError(f"{path} is readable by group or others: run chmod 600 {path}")
        data = path.read_bytes()
        if len(data) < 16:
            raise ConfigurationError(f"the pepper in {path} is shorter than 16 bytes")
        return data
    if not may_generate:
        # _locate saw the given file, and it has gone since: never generate one in its place.
        raise ConfigurationError(f"CUSTODY_PEPPER_FILE={path} does not exist; {_INIT_HINT}")
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _write_new_secret(path, secrets.token_bytes(_PEPPER_BYTES))
    announce.append(
        f"EMBEDDED DEFAULT: generated the API-key pepper at {path} "
        "(keep it with the keyring; losing it invalidates every API key)"
    )
    return data


def load_signer(settings: Settings, announce: list[str]) -> AuditSigner:
    """The Ed25519 key that signs audit checkpoints.

    Keep it away from the database's host and backups: it is what proves the log was not
    rewritten by someone who could write to the database.
    """
    path, may_generate = _locate(
        settings, settings.audit_signing_key_path, "CUSTODY_AUDIT_SIGNING_KEY", "audit-signing-key.pem"
    )
    try:
        signer, generated = AuditSigner.load_or_generate(path)
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    if generated:
        if not may_generate:
            # _locate saw the given file, and it had gone when it was read: a new key is no answer.
            raise ConfigurationError(f"CUSTODY_AUDIT_SIGNING_KEY={path} did not exist when read; {_INIT_HINT}")
        announce.append(
            f"EMBEDDED DEFAULT: generated the audit checkpoint signing key at {path} (key id {signer.key_id})"
        )
    return signer


def load_retired_keys(settings: Settings, signer: AuditSigner, announce: list[str]) -> TrustedKeys:
    """The public keys of retired audit signing keys (`CUSTODY_AUDIT_RETIRED_PUBLIC_KEYS`), which
    verification still trusts; none when the variable is unset.

    Fail closed: a path that does not exist or cannot be read, or anything in it that is not an
    Ed25519 public key, stops startup naming the variable. So does the signing key in use listed
    with a limit: it was retired as compromised, and everything it signed from now on would fail.
    """
    variable = "CUSTODY_AUDIT_RETIRED_PUBLIC_KEYS"
    path = settings.audit_retired_public_keys_path
    if path is None:
        return TrustedKeys()
    if not path.exists():
        raise ConfigurationError(
            f"{variable}={path} does not exist (a PEM file of public keys, or a directory of them)"
        )
    try:
        retired = TrustedKeys(read_public_keys(path))
    except ValueError as exc:
        raise ConfigurationError(f"{variable}={path}: {exc}") from None
    own = retired.get(signer.key_id)
    if own is not None and own.trusted_until is not None:
        raise ConfigurationError(
            f"{variable} lists the audit signing key in use ({signer.key_id}) as retired with a limit "
            f"({own.trusted_until}): it was retired as compromised; sign with the new key (CUSTODY_AUDIT_SIGNING_KEY)"
        )
    announce.append(f"audit signing key {signer.key_id}; retired keys still trusted: {retired.describe()}")
    return retired


def init_secrets(directory: Path) -> SecretPaths:
    """Create all three secrets in `directory` (mode 0600 files; the directory 0700 if new).

    Refuses to overwrite anything: replacing a secret that is in use is how data is lost.
    """
    paths = SecretPaths(
        keyring=(directory / "keyring.json").absolute(),
        pepper=(directory / "pepper").absolute(),
        audit_signing_key=(directory / "audit-signing-key.pem").absolute(),
    )
    existing = [str(p) for p in (paths.keyring, paths.pepper, paths.audit_signing_key) if os.path.lexists(p)]
    if existing:
        raise ConfigurationError(f"refusing to overwrite existing secrets: {', '.join(existing)}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        LocalKeyring.generate(paths.keyring)
    except KeyringError as exc:
        raise ConfigurationError(str(exc)) from None
    _write_new_secret(paths.pepper, secrets.token_bytes(_PEPPER_BYTES))
    AuditSigner.load_or_generate(paths.audit_signing_key)
    return paths


def stage_secrets(source: Path, target: Path) -> list[Path]:
    """Copy every file of `source` into `target` with mode 0600, owned by the running user; the
    copies, in the order of their names.

    For Kubernetes: a Secret mounted as a volume is owned by root, so a non-root container reads
    it only through `fsGroup`, which makes every file group-readable, and Custody refuses a
    group-readable keyring or pepper. An init container running as the service's user stages the
    files into a memory-backed emptyDir, where they are the user's own and private. The volume's
    own entries (`..data` and the like) are skipped; a copy is written whole and renamed into
    place, so staging again (the pod restarted) replaces it atomically.
    """
    if not source.is_dir():
        raise ConfigurationError(f"{source} is not a directory (the mounted Secret to stage from)")
    if not target.is_dir():
        raise ConfigurationError(f"{target} is not a directory (where the secrets go)")
    staged: list[Path] = []
    for origin in sorted(source.iterdir()):
        if origin.name.startswith(".") or not origin.is_file():
            continue
        try:
            data = origin.read_bytes()
        except OSError as exc:
            raise ConfigurationError(
                f"cannot read {origin} ({exc.strerror}); in Kubernetes, give the pod an fsGroup so its user may"
            ) from None
        copy = target / origin.name
        partial = target / f".{origin.name}.staging"
        partial.unlink(missing_ok=True)
        _write_new_secret(partial, data)
        os.replace(partial, copy)
        staged.append(copy)
    if not staged:
        raise ConfigurationError(f"{source} holds no file to stage")
    return staged


def _write_new_secret(path: Path, data: bytes) -> bytes:
    # O_EXCL and 0600 at creation: the secret never sits in a file others could open.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    return data
