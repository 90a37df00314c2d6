"""The audit hash chain and its signed checkpoints: pure functions, no database.

Each record's hash is SHA-256(previous hash ‖ RFC 8785 canonical JSON of the record without its
`hash`). The record holds its own `seq`, `chain` and `prev_hash`, so an edit, deletion,
insertion or swap anywhere breaks the chain from that point. A checkpoint is an Ed25519
signature over a chain's head (chain, seq, head hash, time); the signing key lives outside the
database, so whoever can rewrite the table still cannot forge a checkpoint that matches. Each
checkpoint names its key by id and is checked with that key from the trusted set (`_keys`), so
checkpoints signed before a rotation of the key still verify.
Verification here serves both the live database and an offline export file.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ._keys import TrustedKeys, load_public_key, public_key_id

__all__ = [
    "GENESIS",
    "AuditSigner",
    "ChainVerdict",
    "ChainWalk",
    "Checkpoint",
    "attestation_refusal",
    "attestation_valid",
    "load_public_key",
    "public_key_id",
    "record_hash",
    "verify_chain_records",
]

GENESIS = "0" * 64


def record_hash(prev_hash: str, record: Mapping[str, Any]) -> str:
    """The hash of a record (its `hash` field, if present, is not covered)."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(bytes.fromhex(prev_hash) + rfc8785.dumps(body)).hexdigest()


@dataclass(frozen=True)
class Checkpoint:
    chain: str
    seq: int
    head_hash: str
    signed_at: str
    key_id: str
    signature: str  # base64

    def payload(self) -> bytes:
        return rfc8785.dumps(
            {
                "chain": self.chain,
                "seq": self.seq,
                "head_hash": self.head_hash,
                "signed_at": self.signed_at,
                "key_id": self.key_id,
            }
        )

    def as_json(self) -> dict[str, Any]:
        return {
            "chain": self.chain,
            "seq": self.seq,
            "head_hash": self.head_hash,
            "signed_at": self.signed_at,
            "key_id": self.key_id,
            "signature": self.signature,
        }

    def refusal(self, keys: TrustedKeys) -> str | None:
        """Why this checkpoint's signature cannot be trusted with `keys` (looked up by its key
        id, dated by its `signed_at`), or None when it can."""
        try:
            payload = self.payload()
        except (ValueError, TypeError):  # a copy kept outside with values no checkpoint holds
            return "its fields are not what a checkpoint signs"
        return keys.refusal(self.key_id, self.signed_at, payload, self.signature)


def attestation_refusal(attestation: Mapping[str, Any], keys: TrustedKeys, dated_by: str) -> str | None:
    """Why an attestation from `AuditSigner.sign_payload` cannot be trusted with `keys`, or None.
    `dated_by` names the payload's field that says when it was signed (`exported_at` for an
    export, `issued_at` for a receipt), which a retired key's limit is checked against."""
    payload = attestation.get("payload")
    if not isinstance(payload, dict):
        return "it carries no signed payload"
    try:
        message = rfc8785.dumps(payload)
    except (ValueError, TypeError):  # RFC 8785 refuses NaN, infinities and integers past 2**53
        return "its payload is not canonical JSON"
    return keys.refusal(attestation.get("key_id"), payload.get(dated_by), message, attestation.get("signature"))


def attestation_valid(attestation: Mapping[str, Any], public_key: Ed25519PublicKey) -> bool:
    """Whether an attestation from `AuditSigner.sign_payload` was signed by `public_key`."""
    if attestation.get("key_id") != public_key_id(public_key):
        return False
    try:
        public_key.verify(base64.b64decode(attestation["signature"]), rfc8785.dumps(attestation["payload"]))
    except (InvalidSignature, ValueError, KeyError, TypeError):
        return False
    return True


class AuditSigner:
    """The Ed25519 key that signs checkpoints; a PEM file kept with the keyring, not in Postgres."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key = private_key.public_key()
        self.key_id = public_key_id(self.public_key)

    def __repr__(self) -> str:
        return f"AuditSigner(key_id={self.key_id})"

    @classmethod
    def load_or_generate(cls, path: Path) -> tuple[AuditSigner, bool]:
        """The signer at `path`, generated (mode 0600) when absent; True when generated."""
        if path.exists():
            if path.stat().st_mode & 0o077:
                raise ValueError(f"{path} is readable by group or others: run chmod 600 {path}")
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError(f"{path} does not hold an Ed25519 private key")
            return cls(key), False
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        return cls(key), True

    def public_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()

    def sign_payload(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """An attestation: the payload, this key's id and an Ed25519 signature over its RFC 8785 form."""
        signature = base64.b64encode(self._key.sign(rfc8785.dumps(dict(payload)))).decode()
        return {"payload": dict(payload), "key_id": self.key_id, "signature": signature}

    def sign(self, chain: str, seq: int, head_hash: str, signed_at: str) -> Checkpoint:
        unsigned = Checkpoint(chain, seq, head_hash, signed_at, self.key_id, "")
        signature = base64.b64encode(self._key.sign(unsigned.payload())).decode()
        return Checkpoint(chain, seq, head_hash, signed_at, self.key_id, signature)


@dataclass(frozen=True)
class ChainVerdict:
    """The outcome of checking a chain: `first_bad` names the first record that fails, if any."""

    chain: str
    checked: int
    head_seq: int
    head_hash: str
    first_bad: int | None = None
    reason: str | None = None
    checkpoint_seq: int | None = None

    @property
    def ok(self) -> bool:
        return self.first_bad is None

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "chain": self.chain,
            "checked": self.checked,
            "head_seq": self.head_seq,
            "head_hash": self.head_hash,
            "first_bad_seq": self.first_bad,
            "reason": self.reason,
            "checkpoint_seq": self.checkpoint_seq,
        }


class ChainWalk:
    """Checks a chain one record at a time, so a long chain can be streamed from the database.

    Feed `(stored seq, record)` pairs in order with `add`; it returns False at the first record
    that does not hold. Then `verdict` checks the end of the chain against the head row (or an
    export's stated head) and the signed checkpoints.
    """

    def __init__(
        self, chain: str, *, start_seq: int = 1, start_prev_hash: str = GENESIS, checkpoints: Iterable[Checkpoint] = ()
    ) -> None:
        self.chain = chain
        self.checkpoints = list(checkpoints)
        self._wanted = {checkpoint.seq for checkpoint in self.checkpoints}
        self._hashes: dict[int, str] = {}  # only at checkpoint seqs
        self._prev, self._next, self._checked = start_prev_hash, start_seq, 0
        self._start = start_seq
        self._failure: tuple[int, str] | None = None

    def add(self, stored_seq: int, record: Mapping[str, Any]) -> bool:
        if self._failure is not None:
            return False
        expected = self._next
        if stored_seq != expected:
            self._failure = (expected, f"record {expected} is missing (found {stored_seq} next)")
        elif record.get("seq") != stored_seq or record.get("chain") != self.chain:
            self._failure = (expected, "the record's seq or chain differs from where it is stored")
        elif record.get("prev_hash") != self._prev:
            self._failure = (expected, "prev_hash does not match the previous record's hash")
        elif record.get("hash") != record_hash(self._prev, record):
            self._failure = (expected, "the record's hash does not match its content")
        if self._failure is not None:
            return False
        self._prev = str(record["hash"])
        if stored_seq in self._wanted:
            self._hashes[stored_seq] = self._prev
        self._next += 1
        self._checked += 1
        return True

    def verdict(self, *, expected_head: tuple[int, str] | None = None, keys: TrustedKeys | None = None) -> ChainVerdict:
        """The chain's verdict; each checkpoint is checked with the key of `keys` its key id names."""
        last_seq, prev = self._next - 1, self._prev

        def bad(seq: int, reason: str) -> ChainVerdict:
            return ChainVerdict(self.chain, self._checked, last_seq, prev, seq, reason)

        if self._failure is not None:
            return bad(*self._failure)
        if expected_head is not None and expected_head != (last_seq, prev):
            head_seq = expected_head[0]
            if last_seq > head_seq:
                return bad(head_seq + 1, f"records continue past the chain head (seq {head_seq})")
            if last_seq < head_seq:
                return bad(last_seq + 1, f"records end at {last_seq} but the chain head is at seq {head_seq}")
            return bad(last_seq, "the last record's hash differs from the chain head")
        newest: int | None = None
        for checkpoint in self.checkpoints:
            if checkpoint.chain != self.chain:
                return bad(checkpoint.seq, "a checkpoint of another chain was presented")
            if keys is None:
                return bad(checkpoint.seq, "a checkpoint's signature is not valid (no audit public key to check it)")
            refusal = checkpoint.refusal(keys)
            if refusal is not None:
                return bad(checkpoint.seq, f"checkpoint {checkpoint.seq}: {refusal}")
            if checkpoint.seq < self._start:
                continue
            if checkpoint.seq > last_seq or self._hashes.get(checkpoint.seq) != checkpoint.head_hash:
                return bad(
                    min(checkpoint.seq, last_seq + 1),
                    f"the record at signed checkpoint {checkpoint.seq} is missing or differs",
                )
            newest = max(newest or 0, checkpoint.seq)
        return ChainVerdict(self.chain, self._checked, last_seq, prev, checkpoint_seq=newest)


def verify_chain_records(
    chain: str,
    records: Iterable[tuple[int, Mapping[str, Any]]],
    *,
    start_seq: int = 1,
    start_prev_hash: str = GENESIS,
    expected_head: tuple[int, str] | None = None,
    checkpoints: Iterable[Checkpoint] = (),
    keys: TrustedKeys | None = None,
) -> ChainVerdict:
    """Check `(stored seq, record)` pairs in order; see `ChainWalk`."""
    walk = ChainWalk(chain, start_seq=start_seq, start_prev_hash=start_prev_hash, checkpoints=checkpoints)
    for seq, record in records:
        if not walk.add(seq, record):
            break
    return walk.verdict(expected_head=expected_head, keys=keys)
