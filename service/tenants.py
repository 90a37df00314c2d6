"""Tenant and API-key administration as audited units of work (used by the CLI and the
zero-config run): each change and its audit record share the caller's transaction."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from .audit import AuditEntry, append
from .auth import create_tenant, issue_key, revoke_key
from .models import ApiKey, Tenant

__all__ = ["audited_create_tenant", "audited_issue_key", "audited_revoke_key"]


async def audited_create_tenant(session: AsyncSession, name: str, *, via: str) -> Tenant:
    tenant = await create_tenant(session, name)
    # The tenant's own chain starts with its creation.
    await append(
        session,
        AuditEntry(
            "tenant.create", None, resource_type="tenant", resource_id=tenant.id, chain=tenant.id, details={"via": via}
        ),
    )
    return tenant


async def audited_issue_key(
    session: AsyncSession, pepper: bytes, tenant: str, role: str, *, via: str
) -> tuple[ApiKey, str]:
    row, key = await issue_key(session, pepper, tenant, role)
    await append(
        session,
        AuditEntry(
            "api_key.issue",
            None,
            resource_type="api_key",
            resource_id=row.id,
            chain=row.tenant_id,
            details={"role": role, "via": via},
        ),
    )
    return row, key


async def audited_revoke_key(session: AsyncSession, key_id: str, *, via: str) -> None:
    tenant_id = await revoke_key(session, key_id)
    await append(
        session,
        AuditEntry(
            "api_key.revoke", None, resource_type="api_key", resource_id=key_id, chain=tenant_id, details={"via": via}
        ),
    )
