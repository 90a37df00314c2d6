"""Tenants and API keys: issuing, revoking, and authenticating `Authorization: Bearer` keys.

A key reads `cust_<key id>_<secret>`: the `cust_` prefix lets secret scanners recognise a leaked
key, the id finds its row, and only an HMAC of the secret (keyed with a pepper kept outside the
database) is stored, so a database dump yields no usable key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Literal, get_args

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .errors import AuthenticationFailed, InvalidInput
from .ids import new_id
from .models import ApiKey, Tenant

__all__ = [
    "KEY_PREFIX",
    "ROLES",
    "Principal",
    "Role",
    "authenticate",
    "create_tenant",
    "issue_key",
    "revoke_key",
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


def _hash_secret(pepper: bytes, secret: str) -> bytes:
    return hmac.new(pepper, secret.encode(), hashlib.sha256).digest()


async def create_tenant(session: AsyncSession, name: str) -> Tenant:
    name = name.strip()
    if not name:
        raise InvalidInput("a tenant needs a name")
    existing = await session.scalar(select(Tenant).where(Tenant.name == name))
    if existing is not None:
        raise InvalidInput(f"tenant {name!r} already exists")
    tenant = Tenant(id=new_id("ten"), name=name)
    session.add(tenant)
    await session.flush()
    return tenant


async def issue_key(session: AsyncSession, pepper: bytes, tenant_name: str, role: str) -> tuple[ApiKey, str]:
    """Create a key; returns its row and the full key, which is never shown again."""
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    tenant = await session.scalar(select(Tenant).where(Tenant.name == tenant_name))
    if tenant is None:
        raise InvalidInput(f"no tenant named {tenant_name!r}")
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(id=f"key_{key_id}", tenant_id=tenant.id, role=role, secret_hash=_hash_secret(pepper, secret))
    session.add(row)
    await session.flush()
    return row, f"{KEY_PREFIX}{key_id}_{secret}"


async def revoke_key(session: AsyncSession, key_id: str) -> str:
    """Revoke a key at once; returns its tenant id."""
    tenant_id = await session.scalar(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(ApiKey.tenant_id)
    )
    if tenant_id is None:
        raise InvalidInput(f"no active key {key_id!r}")
    return str(tenant_id)


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
    matches = hmac.compare_digest(_hash_secret(pepper, secret), expected)
    if row is None or not matches or row.revoked_at is not None:
        # One message for every cause: the caller learns nothing about which keys exist.
        raise AuthenticationFailed("invalid or revoked API key")
    return Principal(tenant_id=row.tenant_id, key_id=row.id, role=row.role)
