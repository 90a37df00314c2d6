"""Deleting the copies the provider still holds, each attempt audited.

Every interaction the provider stored is in the `upstream_interactions` ledger; a copy whose
deletion fails keeps `deleted_at` empty and its error, so a later run can retry it. Copies go
when their conversation is deleted or erased, when they outlive the route's `provider_ttl`, and at
once when the conversation's classification rises to a class that forbids provider storage (or
its policy stops permitting it): `delete_conversation_copies`. A deleted copy can no longer be
chained onto, so it stops being the conversation's chain in the same transaction.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from sqlalchemy import func, select, update

from ..audit import AuditEntry, RequestMeta
from ..auth import Principal
from ..context import ServiceContext
from ..models import Conversation, UpstreamInteraction

__all__ = ["delete_conversation_copies", "delete_provider_copies"]

logger = logging.getLogger("custody.provider_copies")


async def delete_provider_copies(
    ctx: ServiceContext,
    principal: Principal | None,
    meta: RequestMeta | None,
    conversation_id: str,
    interaction_ids: Iterable[str],
    *,
    tenant_id: str | None = None,
    cause: str | None = None,
) -> tuple[list[int], list[str]]:
    """Ask the provider to delete each copy; shielded, so a caller who goes away cannot stop it
    half-way. Returns the seqs of the `upstream.delete` records and the copies still pending.

    The records go to the tenant's chain: the principal's, or `tenant_id` for a caller with no
    principal (the retention runner). `cause`, when given, says in each record why the copy went."""
    chain = tenant_id or (principal.tenant_id if principal else None)
    return await asyncio.shield(_delete_all(ctx, principal, meta, conversation_id, list(interaction_ids), chain, cause))


async def delete_conversation_copies(
    ctx: ServiceContext,
    principal: Principal | None,
    meta: RequestMeta | None,
    conversation_id: str,
    *,
    tenant_id: str,
    cause: str,
) -> tuple[list[int], list[str]]:
    """Delete every copy the provider still holds of a conversation that goes on (its
    classification or its policy no longer permits provider storage); a copy whose deletion fails
    stays on the ledger, pending, and the retention runner's sweep retries it."""
    async with ctx.sessions() as session:
        held = (
            await session.scalars(
                select(UpstreamInteraction.id)
                .where(
                    UpstreamInteraction.conversation_id == conversation_id,
                    UpstreamInteraction.stored.is_(True),
                    UpstreamInteraction.deleted_at.is_(None),
                )
                .order_by(UpstreamInteraction.created_at, UpstreamInteraction.id)
            )
        ).all()
    if not held:
        return [], []
    return await delete_provider_copies(ctx, principal, meta, conversation_id, held, tenant_id=tenant_id, cause=cause)


async def _delete_all(
    ctx: ServiceContext,
    principal: Principal | None,
    meta: RequestMeta | None,
    conversation_id: str,
    interaction_ids: list[str],
    chain: str | None,
    cause: str | None,
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
            details={"conversation_id": conversation_id} | ({"cause": cause} if cause else {}),
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
            if error is None:
                # Gone from the provider: a later turn replays the history instead of chaining onto it.
                await session.execute(
                    update(Conversation)
                    .where(Conversation.id == conversation_id, Conversation.provider_chain_id == interaction_id)
                    .values(provider_chain_id=None)
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
