"""Authentication and role checks, as Litestar dependencies."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request

from ..auth import Principal, authenticate
from ..context import ServiceContext
from ..errors import PermissionDenied

__all__ = ["require_role"]


def require_role(*roles: str) -> Callable[[Request[Any, Any, Any]], Awaitable[Principal]]:
    """A dependency that authenticates the caller and admits only the given roles."""

    async def principal(request: Request[Any, Any, Any]) -> Principal:
        ctx: ServiceContext = request.app.state.ctx
        async with ctx.sessions() as session:
            caller = await authenticate(session, ctx.pepper, request.headers.get("authorization"))
        if caller.role not in roles:
            raise PermissionDenied(f"role {caller.role!r} may not call this endpoint")
        return caller

    return principal
