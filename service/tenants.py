"""Tenants and their API keys: created, listed, issued and revoked; every change is audited in the
caller's transaction, under the identity of the operator (or the run) that made it.

A tenant is named by its name or by its id, both accepted wherever a tenant is asked for.
"""

from __future__ import annotations

import re
import secrets

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .audit import AuditEntry, Auditor
from .auth import KEY_PREFIX, ROLES
from .errors import InvalidInput
from .ids import new_id
from .keyed_digests import api_key_digest
from .models import ApiKey, Tenant

__all__ = ["create_tenant", "find_tenant", "issue_key", "list_keys", "list_tenants", "revoke_key"]

# Tenant names appear in CLI output and configuration; a plain shape keeps them out of trouble.
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_KEY_ID = re.compile(r"key_[0-9a-f]{16}")


async def find_tenant(session: AsyncSession, tenant: str) -> Tenant:
    """The tenant named `tenant`, by name or by id."""
    found = await session.scalar(select(Tenant).where(or_(Tenant.name == tenant, Tenant.id == tenant)))
    if found is None:
        raise InvalidInput("no such tenant (give its name or its id; `custody tenants list` shows them)")
    return found


async def create_tenant(
    auditor: Auditor, session: AsyncSession, name: str, *, operator: str | None, via: str
) -> Tenant:
    if not _TENANT_NAME.fullmatch(name):
        raise InvalidInput(
            "a tenant name is 1 to 100 letters, digits, `.`, `_` or `-`, starting with a letter or digit"
        )
    if await session.scalar(select(Tenant.id).where(or_(Tenant.name == name, Tenant.id == name))) is not None:
        raise InvalidInput(f"tenant {name} already exists")
    tenant = Tenant(id=new_id("ten"), name=name)
    session.add(tenant)
    await session.flush()
    # The tenant's own chain starts with its creation.
    await auditor.append(
        session,
        AuditEntry(
            "tenant.create",
            None,
            resource_type="tenant",
            resource_id=tenant.id,
            chain=tenant.id,
            details={"via": via},
            operator=operator,
        ),
    )
    return tenant


async def issue_key(
    auditor: Auditor,
    session: AsyncSession,
    pepper: bytes,
    tenant: str,
    role: str,
    *,
    operator: str | None,
    via: str,
) -> tuple[ApiKey, str]:
    """Create a key for `tenant` (name or id); returns its row and the full key, never shown again."""
    if role not in ROLES:
        raise InvalidInput(f"role must be one of {', '.join(ROLES)}")
    owner = await find_tenant(session, tenant)
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = ApiKey(id=f"key_{key_id}", tenant_id=owner.id, role=role, secret_hash=api_key_digest(pepper, secret))
    session.add(row)
    await session.flush()
    await auditor.append(
        session,
        AuditEntry(
            "api_key.issue",
            None,
            resource_type="api_key",
            resource_id=row.id,
            chain=owner.id,
            details={"role": role, "via": via},
            operator=operator,
        ),
    )
    return row, f"{KEY_PREFIX}{key_id}_{secret}"


async def revoke_key(auditor: Auditor, session: AsyncSession, key_id: str, *, operator: str | None, via: str) -> None:
    """Revoke a key at once."""
    if not _KEY_ID.fullmatch(key_id):
        raise InvalidInput("a key id reads key_ and 16 hex digits (`custody keys list` shows them)")
    tenant_id = await session.scalar(
        update(ApiKey)
        .where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
        .values(revoked_at=func.now())
        .returning(ApiKey.tenant_id)
    )
    if tenant_id is None:
        raise InvalidInput(f"no active key {key_id}")
    await auditor.append(
        session,
        AuditEntry(
            "api_key.revoke",
            None,
            resource_type="api_key",
            resource_id=key_id,
            chain=str(tenant_id),
            details={"via": via},
            operator=operator,
        ),
    )


async def list_tenants(session: AsyncSession) -> list[Tenant]:
    return list((await session.scalars(select(Tenant).order_by(Tenant.name))).all())


async def list_keys(session: AsyncSession, tenant: str | None = None) -> list[tuple[ApiKey, str]]:
    """Keys (never their secrets) with their tenant's name, of one tenant or of all."""
    query = (
        select(ApiKey, Tenant.name).join(Tenant, Tenant.id == ApiKey.tenant_id).order_by(Tenant.name, ApiKey.created_at)
    )
    if tenant is not None:
        query = query.where(ApiKey.tenant_id == (await find_tenant(session, tenant)).id)
    return [(key, name) for key, name in (await session.execute(query)).all()]
