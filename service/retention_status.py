"""Retention as ops see it through the API, for their own tenant: what a run would purge, runs
started in the background and their status, and the provider copies still waiting for deletion.

Each function is one audited unit of work, and shows ids, names, counts and times only: a
retention run's row holds counts, and the ledger of provider copies holds interaction ids and the
type of the last error, never content. A run started here is the runner's own
(`service.retention.run_retention`), scoped to the tenant; its `retention.start` record is
committed before it starts, so no run goes unrecorded, and the start answers once the run's row
exists, so that its status can be read at once (from any replica).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from .audit import AuditEntry, RequestMeta
from .auth import Principal
from .context import ServiceContext
from .errors import DatabaseUnavailable, RetentionRunNotFound
from .ids import is_id_of, new_id
from .models import RetentionRun
from .retention import Candidate, pending_provider_copies, preview, run_retention

__all__ = ["PendingCopies", "RunView", "due_for_purge", "pending_copies", "read_run", "start_run"]

# A run writes its row first thing; if it has not after this long, the database is in trouble.
_START_WAIT_SECONDS = 30.0
_START_POLL_SECONDS = 0.01


@dataclass(frozen=True)
class RunView:
    """A retention run: its status, counts and times."""

    id: str
    dry_run: bool
    status: str  # running | completed | failed
    started_by: str
    policy_version: str
    counts: dict[str, Any]
    started_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True)
class PendingCopies:
    """The provider copies whose deletion was asked for and has not succeeded yet, oldest first."""

    copies: list[dict[str, Any]]  # as `pending_provider_copies` gives them
    oldest_seconds: float | None


async def due_for_purge(
    ctx: ServiceContext, principal: Principal, meta: RequestMeta | None, *, limit: int
) -> tuple[list[Candidate], bool]:
    """The dry run for the caller's tenant: up to `limit` conversations a run would purge now,
    and whether there are more; changes nothing."""
    entry = AuditEntry(
        "retention.preview",
        principal,
        meta,
        resource_type="conversation",
        policy_version=ctx.policy.version,
        details={"limit": limit},
    )
    async with ctx.auditor.action(ctx.sessions, entry) as (_, entry):
        # Its own reads, inside the action: nothing is answered unless the record commits.
        found = await preview(ctx, tenant_id=principal.tenant_id, limit=limit + 1)
        entry.details["returned"] = min(len(found), limit)
    return found[:limit], len(found) > limit


async def start_run(
    ctx: ServiceContext, principal: Principal, meta: RequestMeta | None, *, dry_run: bool, limit: int | None
) -> RunView:
    """Start a retention run for the caller's tenant in the background; returns it once it has
    started (its row exists)."""
    run_id = new_id("run")
    entry = AuditEntry(
        "retention.start",
        principal,
        meta,
        resource_type="retention_run",
        resource_id=run_id,
        policy_version=ctx.policy.version,
        details={"dry_run": dry_run, "limit": limit},
    )
    async with ctx.auditor.action(ctx.sessions, entry):
        pass  # the record alone, committed before the run starts
    task = ctx.tasks.spawn(
        run_retention(
            ctx,
            started_by=principal.key_id,
            dry_run=dry_run,
            tenant_id=principal.tenant_id,
            limit=limit,
            run_id=run_id,
        ),
        name=f"retention run {run_id}",
    )
    return await _started(ctx, principal.tenant_id, run_id, task)


async def read_run(ctx: ServiceContext, principal: Principal, meta: RequestMeta | None, run_id: str) -> RunView:
    """One of the caller's tenant's runs; another tenant's (or a run over every tenant, started
    from the CLI) is indistinguishable from a missing one."""
    entry = AuditEntry(
        "retention.status",
        principal,
        meta,
        resource_type="retention_run",
        # An id from the request path is recorded only in Custody's id shape.
        resource_id=run_id if is_id_of("run", run_id) else None,
    )
    async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
        if not is_id_of("run", run_id):
            raise RetentionRunNotFound(run_id)
        view = await _find(session, principal.tenant_id, run_id)
        if view is None:
            raise RetentionRunNotFound(run_id)
        entry.details["status"] = view.status
        return view
    raise AssertionError("unreachable")  # the audited block returns or raises


async def pending_copies(ctx: ServiceContext, principal: Principal, meta: RequestMeta | None) -> PendingCopies:
    """The caller's tenant's provider copies still waiting for deletion, with the oldest's age
    (on the clock retention deadlines use)."""
    entry = AuditEntry("upstream.list", principal, meta, resource_type="upstream_interaction")
    async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
        copies = await pending_provider_copies(ctx, principal.tenant_id)
        oldest: float | None = None
        if copies:
            now = await session.scalar(select(ctx.clock.now()))
            first = datetime.fromisoformat(copies[0]["created_at"])
            oldest = (now - first).total_seconds() if now is not None else None
        entry.details |= {"pending": len(copies), "oldest_seconds": oldest}
    return PendingCopies(copies, oldest)


async def _started(ctx: ServiceContext, tenant_id: str, run_id: str, task: asyncio.Task[Any]) -> RunView:
    """The run's row, once the run has written it: its first step, so this is a matter of
    milliseconds. A run that ends without one (the database refused it) raises its error."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _START_WAIT_SECONDS
    while True:
        async with ctx.sessions() as session:
            view = await _find(session, tenant_id, run_id)
        if view is not None:
            return view
        if task.done():
            task.result()  # the run's own error, if it failed before its row was written
            raise RuntimeError("the retention run ended without writing its row")
        if loop.time() > deadline:
            raise DatabaseUnavailable("the retention run has not started yet; its status will show once it has")
        await asyncio.wait({task}, timeout=_START_POLL_SECONDS)


async def _find(session: AsyncSession, tenant_id: str, run_id: str) -> RunView | None:
    run = await session.scalar(
        select(RetentionRun).where(RetentionRun.id == run_id, RetentionRun.tenant_id == tenant_id)
    )
    if run is None:
        return None
    return RunView(
        id=run.id,
        dry_run=run.dry_run,
        status=run.status,
        started_by=run.started_by,
        policy_version=run.policy_version,
        counts=dict(run.counts),
        started_at=run.started_at,
        finished_at=run.finished_at,
    )
