"""Deleting the copies the provider still holds (design invariant 7), each attempt audited.

Every interaction the provider stored is in the `upstream_interactions` ledger; a copy whose
deletion fails keeps `deleted_at` empty and its error, so a later run can retry it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, update

from ..audit import AuditEntry, RequestMeta
from ..auth import Principal
from ..context import ServiceContext
from ..models import UpstreamInteraction

__all__ = ["delete_provider_copies"]

logger = logging.getLogger("custody.provider_copies")


async def delete_provider_copies(
    ctx: ServiceContext,
    principal: Principal | None,
    meta: RequestMeta | None,
    conversation_id: str,
    interaction_ids: Iterable[str],
    *,
    tenant_id: str | None = None,
) -> tuple[list[int], list[str]]:
    """Ask the provider to delete each copy; shielded, so a caller who goes away cannot stop it
    half-way. Returns the seqs of the `upstream.delete` records and the copies still pending.

    The records go to the tenant's chain: the principal's, or `tenant_id` for a caller with no
    principal (the retention runner)."""
    chain = tenant_id or (principal.tenant_id if principal else None)
    return await asyncio.shield(_delete_all(ctx, principal, meta, conversation_id, list(interaction_ids), chain))


async def _delete_all(
    ctx: ServiceContext,
    principal: Principal | None,
    meta: RequestMeta | None,
    conversation_id: str,
    interaction_ids: list[str],
    chain: str | None,
) -> tuple[list[int], list[str]]:
    seqs: list[int] = []
    pending: list[str] = []
    for interaction_id in interaction_ids:
        error: str | None = None
        try:
            await ctx.upstream.delete(interaction_id)
        except Exception as exc:  # noqa: BLE001 - any failure is retried later, and named only by type
            error = type(exc).__name__
            logger.warning("provider copy %s not deleted yet (%s)", interaction_id, error)
        entry = AuditEntry(
            "upstream.delete",
            principal,
            meta,
            resource_type="upstream_interaction",
            resource_id=interaction_id,
            details={"conversation_id": conversation_id},
            chain=chain,
        )
        async with ctx.sessions.begin() as session:
            values: dict[str, Any] = {
                "delete_attempts": UpstreamInteraction.delete_attempts + 1,
                "last_error": error,
            }
            if error is None:
                values["deleted_at"] = func.now()
            await session.execute(
                update(UpstreamInteraction).where(UpstreamInteraction.id == interaction_id).values(**values)
            )
            record = await ctx.auditor.append(
                session,
                entry,
                outcome="success" if error is None else "error",
                reason=None if error is None else "provider_delete_failed",
            )
        seqs.append(int(record["seq"]))
        if error is not None:
            pending.append(interaction_id)
    return seqs, pending
