"""Tenants and API keys: issuing, revoking, and authenticating `Authorization: Bearer` keys.

A key reads `cust_<key id>_<secret>`: the `cust_` prefix lets secret scanners recognise a leaked
key, the id finds its row, and only an HMAC of the secret (keyed with a pepper kept outside the
database) is stored, so a database dump yields no usable key.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Literal, get_args

from sqlalchemy.ext.asyncio import AsyncSession

from .errors import AuthenticationFailed
from .keyed_digests import api_key_digest
from .models import ApiKey

__all__ = [
    "KEY_PREFIX",
    "ROLES",
    "Principal",
    "Role",
    "authenticate",
]

KEY_PREFIX = "cust_"
Role = Literal["backend", "auditor", "ops"]
ROLES: tuple[str, ...] = get_args(Role)
# Compared against when the key id is unknown, so that both paths cost one HMAC and one compare.
_DUMMY_HASH = bytes(32)


@dataclass(frozen=True)
class Principal:
    """Who is calling: the tenant, the key and its role."""

    tenant_id: str
    key_id: str
    role: str


def parse_bearer(header: str | None) -> tuple[str, str]:
    """`Bearer cust_<id>_<secret>` -> (key id, secret); anything else fails authentication."""
    if not header:
        raise AuthenticationFailed("missing Authorization: Bearer <API key>")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(KEY_PREFIX):
        raise AuthenticationFailed("the Authorization header must be `Bearer cust_…`")
    key_id, sep, secret = token[len(KEY_PREFIX) :].partition("_")
    if not sep or not key_id or not secret:
        raise AuthenticationFailed("malformed API key")
    return key_id, secret


async def authenticate(session: AsyncSession, pepper: bytes, header: str | None) -> Principal:
    """The principal behind an Authorization header, or AuthenticationFailed."""
    key_id, secret = parse_bearer(header)
    row = await session.get(ApiKey, f"key_{key_id}")
    expected = row.secret_hash if row is not None else _DUMMY_HASH
    matches = hmac.compare_digest(api_key_digest(pepper, secret), expected)
    if row is None or not matches or row.revoked_at is not None:
        # One message for every cause: the caller learns nothing about which keys exist.
        raise AuthenticationFailed("invalid or revoked API key")
    return Principal(tenant_id=row.tenant_id, key_id=row.id, role=row.role)
