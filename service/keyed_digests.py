"""Every digest Custody stores over something a client sent, each keyed with the pepper.

The pepper lives outside the database (a file, like the keyring), so none of these digests can
be reversed by trying candidates against a database dump: an unkeyed SHA-256 of a turn whose input
was a card number gives the number back in seconds. Each use has its own label, so a digest made
for one purpose is never valid for another.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

import rfc8785

__all__ = ["api_key_digest", "canonical_json", "idempotency_key_digest", "request_fingerprint", "subject_digest"]

# RFC 8785 (like I-JSON) admits integers only within +-(2**53 - 1).
_SAFE_INTEGER = 2**53 - 1


def api_key_digest(pepper: bytes, secret: str) -> bytes:
    """What is stored of an API key's secret part: a database dump yields no usable key."""
    return hmac.new(pepper, secret.encode(), hashlib.sha256).digest()


def subject_digest(pepper: bytes, tenant_id: str, subject: str) -> bytes:
    """A stable digest of a data subject's identifier, scoped to the tenant (finds a subject's
    conversations for erasure and access requests without storing the identifier)."""
    message = b"subject\x00" + tenant_id.encode() + b"\x00" + subject.encode()
    return hmac.new(pepper, message, hashlib.sha256).digest()


def idempotency_key_digest(pepper: bytes, tenant_id: str, key: str) -> str:
    """What is stored in place of a client's Idempotency-Key (keys are client text)."""
    message = b"idempotency-key\x00" + tenant_id.encode() + b"\x00" + key.encode()
    return hmac.new(pepper, message, hashlib.sha256).hexdigest()


def request_fingerprint(pepper: bytes, canonical_request: bytes) -> str:
    """The digest that tells a repeated request from another one under the same key."""
    return hmac.new(pepper, b"request-fingerprint\x00" + canonical_request, hashlib.sha256).hexdigest()


def canonical_json(value: Any) -> bytes:
    """RFC 8785 canonical JSON, so that the same request with its keys in another order or its
    numbers spelt otherwise (`1.0`, `1e0`) is the same request.

    RFC 8785 cannot hold integers past 2**53 - 1 exactly; JSON can, so those are written as
    tagged strings holding their exact digits. A client could send that very string instead of
    the number; that only makes two of its own requests under one key look alike.
    """
    return rfc8785.dumps(_representable(value))


def _representable(value: Any) -> Any:
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value if -_SAFE_INTEGER <= value <= _SAFE_INTEGER else f"\x00int:{value}"
    if isinstance(value, float):
        return value if math.isfinite(value) else f"\x00float:{value!r}"
    if isinstance(value, dict):
        return {str(k): _representable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_representable(v) for v in value]
    return str(value)
