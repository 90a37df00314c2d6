"""`/v1/audit`: auditors query, export and verify their tenant's audit chain.

Auditors' own reads are audited too: each call appends its record to the same chain, in the
same transaction as the read (an export records its range first, then streams those records,
which are append-only and so cannot change in between).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency, Provide
from litestar.params import FromQuery, QueryParameter
from litestar.response import Stream

from ..audit import ACTIONS, AuditEntry, RequestMeta, query_events, utc_instant, verify_chain
from ..audit_export import export_header, export_lines, export_range, header_token
from ..audit_fhir import FHIR_NDJSON
from ..auth import Principal
from ..context import ServiceContext
from ..errors import InvalidInput
from .security import MAX_CURSOR, provide_meta, require_role
from .wire import AuditEventsOut, AuditVerifyOut

__all__ = ["AuditController"]

_ID = re.compile(r"^[a-z]+_[0-9a-f]{16,40}$")
_OUTCOMES = frozenset({"success", "denied", "error"})
_NDJSON = "application/x-ndjson"


def _ctx(request: Request[Any, Any, Any]) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


def _instant(value: datetime | None, name: str) -> str | None:
    """A query time in the records' fixed-width UTC form, so that string order is time order."""
    if value is None:
        return None
    try:
        return utc_instant(value)
    except ValueError:
        raise InvalidInput(f"`{name}` needs a timezone (e.g. 2026-11-24T10:00:00Z)", pointer=name) from None


def _filters(action: str | None, actor: str | None, resource: str | None, outcome: str | None) -> dict[str, Any]:
    # Filter values are checked against known codes and id shapes: they are echoed into the
    # audit record of the query, which must never hold free text.
    filters: dict[str, Any] = {}
    if action is not None:
        if action not in ACTIONS:
            raise InvalidInput(f"unknown action; known: {', '.join(sorted(ACTIONS))}", pointer="action")
        filters["action"] = action
    if outcome is not None:
        if outcome not in _OUTCOMES:
            raise InvalidInput("outcome must be success, denied or error", pointer="outcome")
        filters["outcome"] = outcome
    if actor is not None:
        if not _ID.match(actor):
            raise InvalidInput("actor must be an API key id (key_…)", pointer="actor")
        filters["actor"] = {"key_id": actor}
    if resource is not None:
        if not _ID.match(resource):
            raise InvalidInput("resource must be a resource id such as conv_…", pointer="resource")
        filters["resource"] = {"id": resource}
    return filters


class AuditController(Controller):
    path = "/v1/audit"
    tags = ["audit"]
    dependencies = {"principal": Provide(require_role("auditor")), "meta": Provide(provide_meta)}

    @get("/events", operation_id="ListAuditEvents")
    async def events(
        self,
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        since: FromQuery[datetime | None] = None,
        until: FromQuery[datetime | None] = None,
        action: FromQuery[str | None] = None,
        actor: FromQuery[str | None] = None,
        resource: FromQuery[str | None] = None,
        outcome: FromQuery[str | None] = None,
        cursor: Annotated[int, QueryParameter(ge=0, le=MAX_CURSOR)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> AuditEventsOut:
        """Audit records of the caller's tenant, filtered, oldest first, by seq cursor."""
        ctx = _ctx(request)
        filters = _filters(action, actor, resource, outcome)
        entry = AuditEntry(
            "audit.query",
            principal,
            meta,
            resource_type="audit_log",
            resource_id=principal.tenant_id,
            details={
                "filters": filters,
                "cursor": cursor,
                "limit": limit,
                "since": _instant(since, "since"),
                "until": _instant(until, "until"),
            },
        )
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            found = await query_events(
                session,
                principal.tenant_id,
                after_seq=cursor,
                limit=limit,
                since=_instant(since, "since"),
                until=_instant(until, "until"),
                filters=filters,
            )
            entry.details["returned"] = len(found)
        next_cursor = found[-1]["seq"] if len(found) == limit else None
        return AuditEventsOut(chain=principal.tenant_id, events=found, next_cursor=next_cursor)

    @get("/export", operation_id="ExportAuditEvents")
    async def export(
        self,
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        since: FromQuery[datetime | None] = None,
        until: FromQuery[datetime | None] = None,
        format: Annotated[str, QueryParameter(pattern="^(ndjson|fhir)$")] = "ndjson",
    ) -> Stream:
        """A contiguous range of the tenant's chain as NDJSON (with its proof) or FHIR R4 AuditEvents."""
        ctx = _ctx(request)
        entry = AuditEntry(
            "audit.export",
            principal,
            meta,
            resource_type="audit_log",
            resource_id=principal.tenant_id,
            details={"format": format, "since": _instant(since, "since"), "until": _instant(until, "until")},
        )
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            span = await export_range(session, principal.tenant_id, _instant(since, "since"), _instant(until, "until"))
            header = await export_header(session, span, ctx.auditor.signer)
            entry.details |= {"first_seq": span.first_seq, "last_seq": span.last_seq}

        async def body() -> AsyncIterator[str]:
            async with ctx.sessions() as session:
                async for line in export_lines(session, header, fhir=format == "fhir"):
                    yield line

        headers = {
            "X-Custody-Chain": principal.tenant_id,
            "X-Custody-Range": f"{span.first_seq}-{span.last_seq}",
            "X-Custody-Range-Head-Hash": str(header["range_head_hash"]),
            # The whole native header (chain head, the range's last checkpoint, signed
            # attestation), so that a FHIR export verifies offline too (`custody audit verify
            # --file F --header TOKEN`). It holds at most two checkpoints, so it stays a few KB.
            "X-Custody-Export-Header": header_token(header),
        }
        media_type = _NDJSON if format == "ndjson" else FHIR_NDJSON
        return Stream(body(), media_type=media_type, headers=headers)

    @get("/verify", operation_id="VerifyAuditChain")
    async def verify(
        self, request: Request[Any, Any, Any], principal: NamedDependency[Principal], meta: NamedDependency[RequestMeta]
    ) -> AuditVerifyOut:
        """Recompute the tenant's chain and check its signed checkpoints; names the first bad record."""
        ctx = _ctx(request)
        entry = AuditEntry("audit.verify", principal, meta, resource_type="audit_log", resource_id=principal.tenant_id)
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            verdict = await verify_chain(session, principal.tenant_id, ctx.auditor.signer)
            entry.details |= {"ok": verdict.ok, "checked": verdict.checked, "first_bad_seq": verdict.first_bad}
        return AuditVerifyOut(**verdict.as_json())
