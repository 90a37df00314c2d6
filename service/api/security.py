"""Authentication, role checks and request metadata, as Litestar dependencies.

Authentication failures and role denials are audited here, each in its own transaction, before
the error reaches the caller; failed authentications are rate limited and summarised through
`service.auth_failures`, so attacks on a key show in its tenant's chain without flooding it.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request
from litestar.types import Scope
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditEntry, RequestMeta
from ..auth import Principal, authenticate, parse_bearer
from ..context import ServiceContext
from ..database import read_only_session
from ..errors import AuthenticationFailed, PermissionDenied, TooManyAuthenticationFailures
from ..models import ApiKey

__all__ = [
    "MAX_CURSOR",
    "REQUEST_ID_REPLACED",
    "assign_request_id",
    "operation_name",
    "provide_meta",
    "request_id_replaced",
    "require_role",
    "safe_request_id",
]

# Cursors are recorded in audit details, whose canonical JSON allows integers up to 2**53 - 1.
MAX_CURSOR = 2**53 - 1

# Response header present exactly when the client's X-Request-Id was refused and replaced.
REQUEST_ID_REPLACED = "x-custody-request-id-replaced"

# A client's request id is copied into audit records, spans and exports, so only shapes that
# cannot carry a card number, an SSN or a phone number are kept: a canonical UUID (its digit
# runs may not hold a card number), or a short token whose runs of digits and separators hold
# at most 6 digits (an SSN has 9, a phone number 7 or more, a card number 13 to 19).
_UUID = re.compile(r"[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}")
_UUID_NUMERIC_RUN = re.compile(r"[0-9-]+")
_UUID_MAX_DIGITS = 12
_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_TOKEN_NUMERIC_RUN = re.compile(r"[0-9._-]+")
_TOKEN_MAX_DIGITS = 6


def safe_request_id(value: str) -> bool:
    """Whether a client's X-Request-Id has a shape that cannot carry a card, SSN or phone number."""
    if _UUID.fullmatch(value):
        runs, limit = _UUID_NUMERIC_RUN.findall(value), _UUID_MAX_DIGITS
    elif _TOKEN.fullmatch(value):
        runs, limit = _TOKEN_NUMERIC_RUN.findall(value), _TOKEN_MAX_DIGITS
    else:
        return False
    return all(sum(char.isdigit() for char in run) <= limit for run in runs)


def assign_request_id(scope: Scope) -> str:
    """The request's id, decided once: the client's X-Request-Id when it has a safe shape, else
    an assigned `req_…` (and the request is marked, so the response can say it was replaced)."""
    state = scope.setdefault("state", {})
    if "request_id" not in state:
        given = [value for name, value in scope.get("headers", ()) if name.lower() == b"x-request-id"]
        # Two ids for one request are as unusable as a malformed one.
        if len(given) == 1 and safe_request_id(given[0].decode("latin-1")):
            state["request_id"] = given[0].decode("latin-1")
        else:
            state["request_id"] = f"req_{secrets.token_hex(12)}"
            state["request_id_replaced"] = bool(given)
    return str(state["request_id"])


def request_id_replaced(scope: Scope) -> bool:
    """Whether the client sent an X-Request-Id that was refused (see `assign_request_id`)."""
    return bool(scope.get("state", {}).get("request_id_replaced"))


def request_meta(request: Request[Any, Any, Any]) -> RequestMeta:
    """The caller's address and the request id (see `assign_request_id`)."""
    request_id = assign_request_id(request.scope)
    return RequestMeta(address=request.client.host if request.client else None, request_id=request_id)


async def provide_meta(request: Request[Any, Any, Any]) -> RequestMeta:
    return request_meta(request)


def require_role(*roles: str) -> Callable[[Request[Any, Any, Any]], Awaitable[Principal]]:
    """A dependency that authenticates the caller and admits only the given roles."""

    async def principal(request: Request[Any, Any, Any]) -> Principal:
        ctx: ServiceContext = request.app.state.ctx
        meta = request_meta(request)
        header = request.headers.get("authorization")
        claimed = _claimed_key_id(header)
        # A source over its limit costs no database work at all.
        if (retry_after := ctx.auth_failures.refused(meta.address, claimed)) is not None:
            ctx.metrics.auth_failure("rate_limited")
            raise TooManyAuthenticationFailures(retry_after)
        failure: AuthenticationFailed | None = None
        async with read_only_session(ctx.sessions) as session:
            try:
                caller = await authenticate(session, ctx.pepper, header)
            except AuthenticationFailed as exc:
                failure = exc
                key, reason = await _named_key(session, claimed)
        if failure is not None:
            await _account_failure(ctx, request, meta, key, reason)
            raise failure
        if caller.role not in roles:
            ctx.metrics.auth_failure("forbidden", caller.tenant_id)
            await ctx.auditor.record(
                ctx.sessions,
                AuditEntry("access.denied", caller, meta, details={"operation": operation_name(request)}),
                outcome="denied",
                reason="forbidden",
            )
            raise PermissionDenied(f"role {caller.role!r} may not call this endpoint")
        return caller

    return principal


def _claimed_key_id(header: str | None) -> str | None:
    """The key id (`key_…`) an Authorization header names, if it has one: client text, never
    recorded unless it turns out to name a real key."""
    try:
        return f"key_{parse_bearer(header)[0]}"
    except AuthenticationFailed:
        return None


async def _named_key(session: AsyncSession, claimed: str | None) -> tuple[Principal | None, str]:
    """The real key a failed attempt named, if any, and the reason code of the failure.

    `authenticate` has just loaded that row into this session, so this reads no more rows.
    """
    row = await session.get(ApiKey, claimed) if claimed is not None else None
    if row is None:
        return None, "unauthenticated"
    key = Principal(tenant_id=row.tenant_id, key_id=row.id, role=row.role)
    return key, "revoked_key" if row.revoked_at is not None else "invalid_secret"


async def _account_failure(
    ctx: ServiceContext, request: Request[Any, Any, Any], meta: RequestMeta, key: Principal | None, reason: str
) -> None:
    """Count a failed authentication, record it now if it opens its window (a failure on a real
    key goes to that key's tenant chain, others to the system chain), and raise 429 when a
    limit holds."""
    failures = ctx.auth_failures
    verdict = failures.failed(meta.address, key, reason)
    ctx.metrics.auth_failure(reason, key.tenant_id if key is not None else None)
    if verdict.record_now:
        details: dict[str, Any] = {"operation": operation_name(request)}
        if verdict.retry_after is not None:
            details["rate_limited"] = True
        try:
            await ctx.auditor.record(
                ctx.sessions, AuditEntry("auth.failure", key, meta, details=details), outcome="denied", reason=reason
            )
        except Exception:
            # Still accounted for, in the window's summary; the request fails as before.
            failures.unrecorded(meta.address, key, reason, rate_limited=verdict.retry_after is not None)
            raise
    if verdict.retry_after is not None:
        raise TooManyAuthenticationFailures(verdict.retry_after)


def operation_name(request: Request[Any, Any, Any]) -> str:
    """The operation's name, not the path: a path holds whatever the caller put in it."""
    handler = request.scope.get("route_handler")
    if handler is None:
        return "unrouted"
    operation_id = getattr(handler, "operation_id", None)
    return operation_id if isinstance(operation_id, str) else str(handler.handler_name)
