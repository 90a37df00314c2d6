"""`/v1/audit`: auditors query, export and verify their tenant's audit chain.

Auditors' own reads are audited too: each call appends its record to the same chain, in the
same transaction as the read (an export records its range first, then streams those records,
which are append-only and so cannot change in between).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Annotated, Any

from litestar import Controller, Request, get
from litestar.di import NamedDependency, Provide
from litestar.openapi.spec import OpenAPIHeader, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Schema
from litestar.params import FromQuery, QueryParameter
from litestar.response import Stream

from ..audit import (
    ACTIONS,
    FHIR_NDJSON,
    AuditEntry,
    RequestMeta,
    export_header,
    export_lines,
    export_range,
    header_token,
    query_events,
    utc_instant,
    verify_chain,
)
from ..auth import Principal
from ..context import ServiceContext
from ..errors import InvalidInput
from ..ids import ID_PATTERN, has_id_shape
from .security import MAX_CURSOR, provide_meta, require_role
from .wire import AUTHENTICATED, ApiOperation, AuditEventsOut, AuditVerifyOut, problem_responses

__all__ = ["AuditController"]

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
        if not has_id_shape(actor):
            raise InvalidInput("actor must be an API key id (key_…)", pointer="actor")
        filters["actor"] = {"key_id": actor}
    if resource is not None:
        if not has_id_shape(resource):
            raise InvalidInput("resource must be a resource id such as conv_…", pointer="resource")
        filters["resource"] = {"id": resource}
    return filters


@dataclass
class _ExportOperation(ApiOperation):
    """The export's 200, which Litestar documents as JSON of any shape: it is one of two line
    formats, chosen by `format`, with the headers that make a FHIR export verifiable offline."""

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = (self.responses or {}).get("200")
        if not isinstance(ok, OpenAPIResponse):
            raise TypeError(f"the export's 200 is documented as {type(ok).__name__}, not a response to fill in")
        ok.content = {
            _NDJSON: OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description="`format=ndjson`: one JSON object per line, the export header (with the signed "
                    "attestation of the range) first, then the audit records in seq order.",
                )
            ),
            FHIR_NDJSON: OpenAPIMediaType(
                schema=Schema(
                    type=OpenAPIType.STRING,
                    description="`format=fhir`: one FHIR R4 AuditEvent per line, in seq order.",
                )
            ),
        }
        ok.headers = {
            **(ok.headers or {}),
            "X-Custody-Chain": OpenAPIHeader(
                description="The chain exported: the tenant's id.",
                schema=Schema(type=OpenAPIType.STRING),
                required=True,
            ),
            "X-Custody-Range": OpenAPIHeader(
                description="The first and last seq of the range, `first-last`; `empty` when no record falls in it.",
                schema=Schema(type=OpenAPIType.STRING, pattern=r"^([0-9]+-[0-9]+|empty)$"),
                required=True,
            ),
            "X-Custody-Range-Head-Hash": OpenAPIHeader(
                description="The hash of the range's last record; absent when the range is empty.",
                schema=Schema(type=OpenAPIType.STRING, pattern=r"^[0-9a-f]{64}$"),
                required=False,
            ),
            "X-Custody-Export-Header": OpenAPIHeader(
                description="The whole export header as one URL-safe base64 token, so that a FHIR export verifies "
                "offline too (`custody audit verify --file F --header TOKEN`).",
                schema=Schema(type=OpenAPIType.STRING),
                required=True,
            ),
        }


class AuditController(Controller):
    path = "/v1/audit"
    # Immutable class attributes: Litestar copies them into each router it registers the controller on.
    tags = ("audit",)
    dependencies = MappingProxyType({"principal": Provide(require_role("auditor")), "meta": Provide(provide_meta)})
    security = ({"bearerAuth": []},)

    @get(
        "/events",
        operation_id="ListAuditEvents",
        summary="Query audit records",
        operation_class=ApiOperation,
        responses=problem_responses(
            400,
            *AUTHENTICATED,
            notes={
                422: "A filter is not a known action, outcome or id shape, or a time has no timezone "
                "(`pointer` names the parameter)."
            },
        ),
    )
    async def events(
        self,
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        since: FromQuery[datetime | None] = None,
        until: FromQuery[datetime | None] = None,
        # Documentation only (`schema_extra`): `_filters` checks these and answers 422 (not 400).
        action: Annotated[
            str | None, QueryParameter(description="An audited action.", schema_extra={"enum": sorted(ACTIONS)})
        ] = None,
        actor: Annotated[
            str | None,
            QueryParameter(description="The API key id (`key_…`) that acted.", schema_extra={"pattern": ID_PATTERN}),
        ] = None,
        resource: Annotated[
            str | None,
            QueryParameter(description="A resource id, such as `conv_…`.", schema_extra={"pattern": ID_PATTERN}),
        ] = None,
        outcome: Annotated[
            str | None, QueryParameter(description="The action's outcome.", schema_extra={"enum": sorted(_OUTCOMES)})
        ] = None,
        cursor: Annotated[int, QueryParameter(ge=0, le=MAX_CURSOR)] = 0,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> AuditEventsOut:
        """Audit records of the caller's tenant, filtered, oldest first, by seq cursor.

        `next_cursor` is the `cursor` of the next page, or null after the last record. The query
        is itself audited, with its filters.
        """
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

    @get(
        "/export",
        operation_id="ExportAuditEvents",
        summary="Export a range of the audit chain",
        operation_class=_ExportOperation,
        responses=problem_responses(
            400, *AUTHENTICATED, notes={422: "A time has no timezone (`pointer` names the parameter)."}
        ),
    )
    async def export(
        self,
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        since: FromQuery[datetime | None] = None,
        until: FromQuery[datetime | None] = None,
        format: Annotated[str, QueryParameter(pattern="^(ndjson|fhir)$")] = "ndjson",
    ) -> Stream:
        """A contiguous range of the tenant's chain as NDJSON (with its proof) or FHIR R4 AuditEvents.

        The range holds every record from `since` (inclusive) to `until` (exclusive); exports never
        skip records. Verify it offline with `custody audit verify`.
        """
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

        empty = span.first_seq is None or span.last_seq is None
        headers = {
            "X-Custody-Chain": principal.tenant_id,
            "X-Custody-Range": "empty" if empty else f"{span.first_seq}-{span.last_seq}",
            # The whole native header (chain head, the range's last checkpoint, signed
            # attestation), so that a FHIR export verifies offline too (`custody audit verify
            # --file F --header TOKEN`). It holds at most two checkpoints, so it stays a few KB.
            "X-Custody-Export-Header": header_token(header),
        }
        if not empty:
            headers["X-Custody-Range-Head-Hash"] = str(header["range_head_hash"])
        media_type = _NDJSON if format == "ndjson" else FHIR_NDJSON
        return Stream(body(), media_type=media_type, headers=headers)

    @get(
        "/verify",
        operation_id="VerifyAuditChain",
        summary="Verify the audit chain",
        operation_class=ApiOperation,
        responses=problem_responses(*AUTHENTICATED),
    )
    async def verify(
        self, request: Request[Any, Any, Any], principal: NamedDependency[Principal], meta: NamedDependency[RequestMeta]
    ) -> AuditVerifyOut:
        """Recompute the tenant's chain and check its signed checkpoints; names the first bad record.

        Each checkpoint is checked with the key its `key_id` names: the audit signing key in use,
        or a retired one the service still trusts. A broken chain, or a checkpoint signed by a key
        it does not trust (named in `reason`), is a 200 with `ok: false`, `first_bad_seq` and
        `reason`.
        """
        ctx = _ctx(request)
        entry = AuditEntry("audit.verify", principal, meta, resource_type="audit_log", resource_id=principal.tenant_id)
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            verdict = await verify_chain(session, principal.tenant_id, ctx.auditor.trusted_keys)
            entry.details |= {"ok": verdict.ok, "checked": verdict.checked, "first_bad_seq": verdict.first_bad}
        return AuditVerifyOut(**verdict.as_json())
