"""`/v1/ops`: operations staff see and steer retention for their own tenant, never content.

The policy in force, what a retention run would purge now, runs started in the background and
their status, legal holds, and the provider copies still waiting for deletion. Every call is
audited. A subject hold names its subject by identifier in the request body; only the keyed
digest is kept, and the identifier is never recorded, shown or logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import MappingProxyType
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, delete, get, post
from litestar.di import NamedDependency, Provide
from litestar.openapi.spec import Reference
from litestar.params import FromPath, JSONBody, QueryParameter
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditEntry, RequestMeta, outcome_of
from ..auth import Principal
from ..context import ServiceContext
from ..errors import MalformedRequest
from ..ids import is_id_of
from ..legal_holds import list_holds, place_hold, release_hold
from ..retention_status import due_for_purge, pending_copies, read_run, start_run
from .security import provide_meta, require_role
from .wire import (
    AUTHENTICATED,
    ApiOperation,
    ConversationHoldCreate,
    HoldCreate,
    HoldOut,
    HoldsOut,
    PolicyOut,
    ProviderCopiesOut,
    RetentionCandidateOut,
    RetentionPreviewOut,
    RetentionRunCreate,
    RetentionRunOut,
    SubjectHoldCreate,
    problem_responses,
)

__all__ = ["OpsController"]

logger = logging.getLogger("custody.api")


def _ctx(request: Request[Any, Any, Any]) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


@dataclass
class _OptionalBodyOperation(ApiOperation):
    """An operation whose body may be left out (Litestar documents every body as required)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.request_body is None or isinstance(self.request_body, Reference):
            raise TypeError("an operation with an optional body documents its body")
        self.request_body.required = False


@asynccontextmanager
async def _hold_change(ctx: ServiceContext, entry: AuditEntry) -> AsyncIterator[AsyncSession]:
    """A transaction for placing or releasing a hold. `service.legal_holds` writes the success
    record in it; a refusal or failure is recorded here, in a transaction of its own."""
    try:
        async with ctx.sessions.begin() as session:
            yield session
    except BaseException as exc:
        outcome, reason = outcome_of(exc)
        try:
            # Shielded, as `Auditor.action` does: a second cancellation must not lose the record.
            await asyncio.shield(ctx.auditor.record(ctx.sessions, entry, outcome=outcome, reason=reason))
        except Exception as audit_error:  # noqa: BLE001 - the action's own error is the one to raise
            logger.error(
                "audit: the failure record of %s could not be written (%s)", entry.action, type(audit_error).__name__
            )
        raise


class _RunOptionTypes(msgspec.Struct):
    """The JSON types of `RetentionRunCreate`'s members, as the document gives them (an integer may
    be written `5.0`, which Litestar's conversion checks, but not `"5"`)."""

    dry_run: bool = False
    limit: int | float | None = None


async def _strict(request: Request[Any, Any, Any], data: RetentionRunCreate | None) -> RetentionRunCreate:
    """The run's options, only if the body has the JSON types the document gives: Litestar converts
    bodies leniently (`0` or `"true"` for a boolean, `"5"` for an integer)."""
    if data is None:
        return RetentionRunCreate()
    try:
        msgspec.json.decode(await request.body(), type=_RunOptionTypes, strict=True)
    except msgspec.ValidationError:
        # msgspec's message names the member and the type expected; the answer needs neither.
        raise MalformedRequest("the request body does not match the API schema") from None
    return data


class OpsController(Controller):
    path = "/v1/ops"
    # Immutable class attributes: Litestar copies them into each router it registers the controller on.
    tags = ("ops",)
    dependencies = MappingProxyType({"principal": Provide(require_role("ops")), "meta": Provide(provide_meta)})
    security = ({"bearerAuth": []},)

    @get(
        "/policy",
        operation_id="GetPolicy",
        summary="Read the policy in force",
        operation_class=ApiOperation,
        responses=problem_responses(*AUTHENTICATED),
    )
    async def policy(
        self, request: Request[Any, Any, Any], principal: NamedDependency[Principal], meta: NamedDependency[RequestMeta]
    ) -> PolicyOut:
        """The policy this service runs under: its version, the data classes (provider storage and
        retention rule of each), the routes (their data classes, provider storage, retention rule,
        provider_ttl, the classes they block, and the settings sent to the model with every turn)
        and the detectors (each one's class, and its built-in or pattern).

        The settings (system instruction, tools, generation config) are the operator's configuration,
        not conversation content, so ops see them whole.
        """
        ctx = _ctx(request)
        entry = AuditEntry("policy.read", principal, meta, resource_type="policy", policy_version=ctx.policy.version)
        async with ctx.auditor.action(ctx.sessions, entry):
            out = PolicyOut.of(ctx.policy)
        return out

    @get(
        "/retention/preview",
        operation_id="PreviewRetention",
        summary="List what a retention run would purge now",
        operation_class=ApiOperation,
        responses=problem_responses(400, *AUTHENTICATED),
    )
    async def preview(
        self,
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
    ) -> RetentionPreviewOut:
        """The dry run for the caller's tenant: the conversations past their deadline that no legal
        hold covers, oldest deadline first, each with its route, data classes, the rule that governs
        it and the deadline it gives. Changes nothing.

        Deadlines are as stored: a changed policy is applied to them when the service starts and by
        every run.
        """
        candidates, more = await due_for_purge(_ctx(request), principal, meta, limit=limit)
        return RetentionPreviewOut([RetentionCandidateOut.of(c) for c in candidates], more)

    @post(
        "/retention/runs",
        operation_id="StartRetentionRun",
        status_code=202,
        summary="Start a retention run",
        operation_class=_OptionalBodyOperation,
        responses=problem_responses(
            400,
            413,
            *AUTHENTICATED,
            notes={
                503: "The database cannot be reached right now, or the run did not start within 30 s (it may "
                "still); retry after `Retry-After` seconds.",
            },
        ),
    )
    async def start(
        self,
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        data: JSONBody[RetentionRunCreate | None] = None,
    ) -> RetentionRunOut:
        """Start a retention run for the caller's tenant in the background: it purges the tenant's
        conversations past their deadline (each under a signed receipt), retries failed deletions of
        provider copies and deletes those past their route's provider_ttl.

        Answers once the run has started, with its id; follow it with `GET /v1/ops/retention/runs/{run_id}`.
        Runs may overlap (each conversation is purged once).
        """
        options = await _strict(request, data)
        run = await start_run(_ctx(request), principal, meta, dry_run=options.dry_run, limit=options.limit)
        return RetentionRunOut.of(run)

    @get(
        "/retention/runs/{run_id:str}",
        operation_id="GetRetentionRun",
        summary="Read a retention run's status",
        operation_class=ApiOperation,
        responses=problem_responses(
            *AUTHENTICATED,
            notes={404: "No such retention run for this tenant (another tenant's run looks the same)."},
        ),
    )
    async def run(
        self,
        request: Request[Any, Any, Any],
        run_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> RetentionRunOut:
        """A run of the caller's tenant: `running`, `completed` or `failed`, its counts so far (saved
        after every batch) and its times."""
        return RetentionRunOut.of(await read_run(_ctx(request), principal, meta, run_id))

    @post(
        "/holds",
        operation_id="PlaceHold",
        status_code=201,
        summary="Place a legal hold",
        operation_class=ApiOperation,
        responses=problem_responses(
            400,
            413,
            *AUTHENTICATED,
            notes={422: "The conversation is not one of this tenant's, or the reason is empty once trimmed."},
        ),
    )
    async def place(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[HoldCreate],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> HoldOut:
        """Hold the whole tenant, one conversation or one data subject: while the hold is active,
        nothing it covers is purged or deleted, by anyone (a deletion answers 409 naming the hold).

        A subject hold covers the subject's conversations present and future. The subject is named
        by its identifier; only its keyed digest is kept, and the identifier is never recorded,
        shown or logged.
        """
        ctx = _ctx(request)
        scope = str(data.__struct_config__.tag)  # the body's `scope`, one of the three the document lists
        entry = AuditEntry("legal_hold.place", principal, meta, resource_type="legal_hold", details={"scope": scope})
        async with _hold_change(ctx, entry) as session:
            hold = await place_hold(
                ctx.auditor,
                session,
                principal,
                meta,
                scope=scope,
                reason=data.reason,
                conversation_id=data.conversation_id if isinstance(data, ConversationHoldCreate) else None,
                subject_digest=(
                    ctx.subject_digest(principal.tenant_id, data.subject)
                    if isinstance(data, SubjectHoldCreate)
                    else None
                ),
            )
        return HoldOut.of(hold)

    @get(
        "/holds",
        operation_id="ListHolds",
        summary="List legal holds",
        operation_class=ApiOperation,
        responses=problem_responses(400, *AUTHENTICATED),
    )
    async def holds(
        self,
        request: Request[Any, Any, Any],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
        active: Annotated[
            bool | None,
            QueryParameter(description="`true`: the active holds only; `false`: the released ones only; absent: all."),
        ] = None,
    ) -> HoldsOut:
        """The tenant's legal holds, oldest first."""
        ctx = _ctx(request)
        entry = AuditEntry("legal_hold.list", principal, meta, resource_type="legal_hold", details={"active": active})
        async with ctx.auditor.action(ctx.sessions, entry) as (session, entry):
            found = await list_holds(session, principal.tenant_id, active_only=active is True)
            if active is False:
                found = [hold for hold in found if hold.released_at is not None]
            entry.details["returned"] = len(found)
        return HoldsOut([HoldOut.of(hold) for hold in found])

    @delete(
        "/holds/{hold_id:str}",
        operation_id="ReleaseHold",
        status_code=200,
        summary="Release a legal hold",
        operation_class=ApiOperation,
        responses=problem_responses(
            *AUTHENTICATED,
            notes={
                404: "No such legal hold for this tenant (another tenant's hold looks the same).",
                409: "The hold was released already.",
            },
        ),
    )
    async def release(
        self,
        request: Request[Any, Any, Any],
        hold_id: FromPath[str],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> HoldOut:
        """Release an active hold; what it covered may be purged and deleted again (unless another
        hold covers it)."""
        ctx = _ctx(request)
        entry = AuditEntry(
            "legal_hold.release",
            principal,
            meta,
            resource_type="legal_hold",
            # An id from the request path is recorded only in Custody's id shape.
            resource_id=hold_id if is_id_of("hold", hold_id) else None,
        )
        async with _hold_change(ctx, entry) as session:
            hold = await release_hold(ctx.auditor, session, principal, meta, hold_id)
        return HoldOut.of(hold)

    @get(
        "/provider-copies",
        operation_id="ListPendingProviderCopies",
        summary="List provider copies pending deletion",
        operation_class=ApiOperation,
        responses=problem_responses(*AUTHENTICATED),
    )
    async def provider_copies(
        self, request: Request[Any, Any, Any], principal: NamedDependency[Principal], meta: NamedDependency[RequestMeta]
    ) -> ProviderCopiesOut:
        """The copies the provider still holds although their deletion was asked for (it failed, and
        the next run retries it) or their conversation is gone, oldest first, with how many there are
        and the oldest one's age. Ids, times and error types only."""
        return ProviderCopiesOut.of(await pending_copies(_ctx(request), principal, meta))
