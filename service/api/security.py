"""Authentication, role checks and request metadata, as Litestar dependencies.

Authentication failures and role denials are audited here, each in its own transaction, before
the error reaches the caller.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request

from ..audit import AuditEntry, RequestMeta
from ..auth import Principal, authenticate
from ..context import ServiceContext
from ..errors import AuthenticationFailed, PermissionDenied

__all__ = ["MAX_CURSOR", "operation_name", "provide_meta", "require_role"]

# Cursors are recorded in audit details, whose canonical JSON allows integers up to 2**53 - 1.
MAX_CURSOR = 2**53 - 1

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_meta(request: Request[Any, Any, Any]) -> RequestMeta:
    """The caller's address and the request id (the client's X-Request-Id when well-formed)."""
    state = request.scope.setdefault("state", {})
    if "request_id" not in state:
        given = request.headers.get("x-request-id", "")
        state["request_id"] = given if _REQUEST_ID.match(given) else f"req_{secrets.token_hex(12)}"
    return RequestMeta(address=request.client.host if request.client else None, request_id=state["request_id"])


async def provide_meta(request: Request[Any, Any, Any]) -> RequestMeta:
    return request_meta(request)


def require_role(*roles: str) -> Callable[[Request[Any, Any, Any]], Awaitable[Principal]]:
    """A dependency that authenticates the caller and admits only the given roles."""

    async def principal(request: Request[Any, Any, Any]) -> Principal:
        ctx: ServiceContext = request.app.state.ctx
        meta = request_meta(request)
        try:
            async with ctx.sessions() as session:
                caller = await authenticate(session, ctx.pepper, request.headers.get("authorization"))
        except AuthenticationFailed:
            # No tenant is known for a failed authentication: it goes to the system chain.
            await ctx.auditor.record(
                ctx.sessions,
                AuditEntry("auth.failure", None, meta, details={"operation": operation_name(request)}),
                outcome="denied",
                reason="unauthenticated",
            )
            raise
        if caller.role not in roles:
            await ctx.auditor.record(
                ctx.sessions,
                AuditEntry("access.denied", caller, meta, details={"operation": operation_name(request)}),
                outcome="denied",
                reason="forbidden",
            )
            raise PermissionDenied(f"role {caller.role!r} may not call this endpoint")
        return caller

    return principal


def operation_name(request: Request[Any, Any, Any]) -> str:
    """The operation's name, not the path: a path carries whatever the caller put in it."""
    handler = request.scope.get("route_handler")
    if handler is None:
        return "unrouted"
    operation_id = getattr(handler, "operation_id", None)
    return operation_id if isinstance(operation_id, str) else str(handler.handler_name)
