"""The audit public keys verification trusts: the signing key's, and the retired ones kept.

Every signed thing (a checkpoint, an export's attestation, a deletion receipt) names the key that
signed it by `key_id`, the first 16 hex digits of the SHA-256 of the raw Ed25519 public key.
Verification looks that id up in a `TrustedKeys` set, so the signing key can be replaced while
everything its predecessors signed still verifies, and a signature by a key the set does not hold
fails naming the key id.

A retired key is trusted without limit (a scheduled rotation: replicas not yet restarted keep
signing with it for a while), or only for signatures dated up to its `Custody-Trusted-Until`
(a compromised key: whoever stole it can sign anything, so nothing it signs later is believed).
The date is the one inside the signed payload: a checkpoint's `signed_at`, an export's
`exported_at`, a receipt's `issued_at`.

Retired keys live in PEM files, several blocks to a file, or in a directory of such files. The
text before a block may carry Custody's attributes, one `Name: value` a line (RFC 7468 lets
explanatory text precede a block, and OpenSSL skips it):

    # retired by `custody audit rotate-signing-key` at 2026-11-24T10:00:00.000000Z
    Custody-Key-Id: 3f2a9c0d1e4b5a67
    Custody-Trusted-Until: 2026-11-24T10:00:00.000000Z
    -----BEGIN PUBLIC KEY-----
    ...
    -----END PUBLIC KEY-----

Public keys are not secrets, but a set that is read wrong decides what an auditor is told, so
reading fails closed: an unreadable file, a block that is not an Ed25519 public key (a private key
included), an unknown `Custody-` attribute or a key id that does not match its key is an error.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "TrustedKey",
    "TrustedKeys",
    "UntrustedKey",
    "load_public_key",
    "parse_public_keys",
    "public_key_id",
    "read_public_keys",
    "write_retired_key",
]

_KEY_ID_ATTRIBUTE = "Custody-Key-Id"
_UNTIL_ATTRIBUTE = "Custody-Trusted-Until"
_BLOCK = re.compile(r"-----BEGIN ([A-Z0-9 ]+)-----\r?\n(.*?)-----END \1-----", re.DOTALL)
_ATTRIBUTE = re.compile(r"^(Custody-[A-Za-z0-9-]+):[ \t]*(.*?)[ \t\r]*$", re.MULTILINE)
_KEY_ID = re.compile(r"[0-9a-f]{16}")
# The records' own fixed-width UTC form (service.audit.utc_instant): comparing strings compares times.
_INSTANT = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")


def public_key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(pem: bytes) -> Ed25519PublicKey:
    key = serialization.load_pem_public_key(pem)
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError("the audit public key must be an Ed25519 key")
    return key


class UntrustedKey(ValueError):
    """A signature's key is not in the trusted set, or signed after its trust ended."""


@dataclass(frozen=True)
class TrustedKey:
    """One public key verification accepts, and until when (None: without limit)."""

    public_key: Ed25519PublicKey
    trusted_until: str | None = None

    @property
    def key_id(self) -> str:
        return public_key_id(self.public_key)

    def raw(self) -> bytes:
        return self.public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def describe(self) -> str:
        return self.key_id + (f" (for signatures up to {self.trusted_until})" if self.trusted_until else "")


class TrustedKeys:
    """The public keys verification accepts, by key id.

    The same key given twice is kept once, under the earlier limit of the two (the stricter);
    two different keys with one key id are refused, since a signature could not say which it is.
    """

    def __init__(self, keys: Iterable[TrustedKey] = ()) -> None:
        self._keys: dict[str, TrustedKey] = {}
        for key in keys:
            known = self._keys.get(key.key_id)
            if known is None:
                self._keys[key.key_id] = key
                continue
            if known.raw() != key.raw():
                raise ValueError(f"two different public keys share the key id {key.key_id}")
            limits = [limit for limit in (known.trusted_until, key.trusted_until) if limit is not None]
            self._keys[key.key_id] = TrustedKey(key.public_key, min(limits) if limits else None)

    @classmethod
    def of(cls, *public_keys: Ed25519PublicKey) -> TrustedKeys:
        """Keys trusted without limit (the signing key's own, or keys pinned for one check)."""
        return cls(TrustedKey(key) for key in public_keys)

    def __or__(self, other: TrustedKeys) -> TrustedKeys:
        return TrustedKeys([*self, *other])

    def __iter__(self) -> Iterator[TrustedKey]:
        return iter(self._keys.values())

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key_id: object) -> bool:
        return isinstance(key_id, str) and key_id in self._keys

    def get(self, key_id: str) -> TrustedKey | None:
        return self._keys.get(key_id)

    @property
    def ids(self) -> list[str]:
        return sorted(self._keys)

    def describe(self) -> str:
        return ", ".join(key.describe() for key in sorted(self, key=lambda key: key.key_id)) or "none"

    def key_for(self, key_id: object, signed_at: object) -> TrustedKey:
        """The trusted key `key_id` names, if it may have signed at `signed_at`; else UntrustedKey."""
        key = self._keys.get(key_id) if isinstance(key_id, str) else None
        if key is None:
            named = key_id if isinstance(key_id, str) and _KEY_ID.fullmatch(key_id) else "with a malformed id"
            raise UntrustedKey(f"signed by key {named}, which is not a trusted audit key (trusted: {self.describe()})")
        if key.trusted_until is not None:
            # A retired key's limit holds only for a date in the records' own form: another
            # spelling could compare below it as a string while naming a later time.
            if not isinstance(signed_at, str) or not _INSTANT.fullmatch(signed_at):
                raise UntrustedKey(f"signed by retired key {key.key_id} without a date its limit can be checked on")
            if signed_at > key.trusted_until:
                raise UntrustedKey(
                    f"signed by retired key {key.key_id} at {signed_at}, after it stopped being trusted "
                    f"({key.trusted_until})"
                )
        return key

    def refusal(self, key_id: object, signed_at: object, message: bytes, signature: object) -> str | None:
        """Why the signature over `message` cannot be trusted, or None when it can."""
        try:
            key = self.key_for(key_id, signed_at)
        except UntrustedKey as exc:
            return str(exc)
        try:
            if not isinstance(signature, str):
                raise ValueError("not a string")
            key.public_key.verify(base64.b64decode(signature, validate=True), message)
        except (InvalidSignature, ValueError):  # binascii.Error is a ValueError
            return f"the signature is not valid for key {key.key_id}"
        return None


def parse_public_keys(text: bytes, source: str) -> list[TrustedKey]:
    """The public keys in `text` (PEM, one block or several) with their attributes; ValueError
    naming `source` and the block when anything in it cannot be read as a trusted key."""
    try:
        decoded = text.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{source} is not PEM text") from None
    keys: list[TrustedKey] = []
    preamble_start = 0
    for number, block in enumerate(_BLOCK.finditer(decoded), 1):
        where = f"{source}, block {number}"
        label = block.group(1)
        if label != "PUBLIC KEY":
            hint = " (give its public half: openssl pkey -in KEY -pubout)" if "PRIVATE" in label else ""
            raise ValueError(f"{where} is a {label}, not a PUBLIC KEY{hint}")
        try:
            public_key = load_public_key(block.group(0).encode())
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise ValueError(f"{where} is not an Ed25519 public key") from None
        attributes = _attributes(decoded[preamble_start : block.start()], where)
        key = TrustedKey(public_key, attributes.get(_UNTIL_ATTRIBUTE))
        stated = attributes.get(_KEY_ID_ATTRIBUTE)
        if stated is not None and stated != key.key_id:
            raise ValueError(f"{where} says {_KEY_ID_ATTRIBUTE}: {stated[:40]} but its key's id is {key.key_id}")
        keys.append(key)
        preamble_start = block.end()
    if not keys:
        raise ValueError(f"{source} holds no PEM public key")
    trailing = _ATTRIBUTE.search(decoded[preamble_start:])
    if trailing is not None:
        raise ValueError(f"{source}: {trailing[1][:40]} follows the last key (an attribute goes before its key)")
    return keys


def _attributes(preamble: str, where: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for match in _ATTRIBUTE.finditer(preamble):
        name, value = match.group(1), match.group(2)
        if name not in (_KEY_ID_ATTRIBUTE, _UNTIL_ATTRIBUTE):
            # A misspelt limit would leave a compromised key trusted for good: refuse it.
            raise ValueError(f"{where}: unknown attribute {name[:40]} (known: {_KEY_ID_ATTRIBUTE}, {_UNTIL_ATTRIBUTE})")
        if name in found:
            raise ValueError(f"{where}: {name} is given twice")
        if name == _UNTIL_ATTRIBUTE:
            value = _instant(value, where)
        found[name] = value
    return found


def _instant(value: str, where: str) -> str:
    """An ISO 8601 time with its timezone, in the records' fixed-width UTC form."""
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            raise ValueError("no timezone")
        return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise ValueError(
            f"{where}: {_UNTIL_ATTRIBUTE} must be an ISO 8601 time with a timezone, e.g. 2026-11-24T10:00:00Z"
        ) from None


def read_public_keys(path: Path) -> list[TrustedKey]:
    """The public keys in a PEM file, or in every file of a directory (names starting with `.`,
    such as a mounted volume's `..data`, are skipped; the directory may be empty); ValueError
    naming the file for anything else."""
    if path.is_dir():
        keys: list[TrustedKey] = []
        for entry in sorted(path.iterdir()):
            if entry.name.startswith("."):
                continue
            if not entry.is_file():
                raise ValueError(f"{entry} is not a file (the directory holds PEM public keys only)")
            keys.extend(_read_file(entry))
        # An empty directory is a set with no retired key yet (set up before the first rotation):
        # it trusts less, never more, and a signature by a key missing from it fails naming it.
        return keys
    return _read_file(path)


def _read_file(path: Path) -> list[TrustedKey]:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror or exc}") from None
    return parse_public_keys(text, str(path))


def _entry(key: TrustedKey, note: str) -> str:
    lines = [f"# {note}", f"{_KEY_ID_ATTRIBUTE}: {key.key_id}"]
    if key.trusted_until is not None:
        lines.append(f"{_UNTIL_ATTRIBUTE}: {key.trusted_until}")
    return "\n".join(lines) + "\n" + key.pem()


def write_retired_key(target: Path, key: TrustedKey, note: str) -> Path:
    """Add `key` to the retired keys at `target` and return the file written.

    A directory gets a file of its own for the key (`audit-<key id>.pub.pem`); a file (new or
    existing) keeps its other keys and gets this one. Either way a key already there is replaced,
    so running a rotation again (or again as a compromise) leaves one entry, with the new limit.
    Written whole and renamed into place: a reader never sees half a file.
    """
    if target.is_dir():
        path = target / f"audit-{key.key_id}.pub.pem"
        _replace(path, _entry(key, note))
        return path
    kept = ""
    if target.exists():
        # The other entries stay as they were written (comments included); only this key's goes.
        text = target.read_bytes()
        keys = parse_public_keys(text, str(target))
        decoded, start = text.decode("utf-8"), 0
        for other, block in zip(keys, _BLOCK.finditer(decoded), strict=True):
            if other.key_id != key.key_id:
                kept += decoded[start : block.end()].strip("\n") + "\n\n"
            start = block.end()
    _replace(target, kept + _entry(key, note))
    return target


def _replace(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        # Public keys: readable by the service's user and the auditors who check exports offline.
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
