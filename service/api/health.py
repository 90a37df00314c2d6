"""Liveness and readiness probes."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from sqlalchemy import text

from ..context import ServiceContext
from ..crypto import unreadable_versions
from .problems import problem
from .wire import ApiOperation, problem_responses

__all__ = ["healthz", "readyz"]


@get("/healthz", operation_id="Healthz", tags=["health"], summary="Liveness", operation_class=ApiOperation)
async def healthz() -> dict[str, str]:
    """The process is up; it asks nothing of the database."""
    return {"status": "ok"}


@get(
    "/readyz",
    operation_id="Readyz",
    tags=["health"],
    summary="Readiness",
    operation_class=ApiOperation,
    responses=problem_responses(
        notes={
            503: "Not ready: the replica is shutting down, the database or the key store does not answer, or the "
            "keyring cannot unwrap some of the data keys the database holds; retry after `Retry-After` seconds."
        }
    ),
)
async def readyz(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    """The replica is not shutting down, the database and the key store answer and the keyring unwraps
    what the database holds: the service can take traffic. `upstream.breaker` says whether turns
    currently fail fast because the model service has been failing (`open`; `half_open` while a
    probe is out), with `retry_after` seconds until the next probe; it does not affect readiness."""
    ctx: ServiceContext = request.app.state.ctx
    if ctx.drain.draining:
        # At once, before any query: the load balancer must stop sending traffic here.
        return problem(503, "not-ready", "Not ready", "the replica is shutting down", retry_after=5)
    try:
        async with ctx.sessions() as session:
            await session.execute(text("SELECT 1"))
            unreadable = await unreadable_versions(session, ctx.keyring)
    except Exception:  # noqa: BLE001 - any failure means not ready
        return problem(503, "not-ready", "Not ready", "the database is not reachable", retry_after=5)
    try:
        # Every conversation with a deadline needs its day's expiry key to open.
        await ctx.expiry_keys.ping()
    except Exception:  # noqa: BLE001 - any failure means not ready
        return problem(503, "not-ready", "Not ready", "the key store is not reachable", retry_after=5)
    if unreadable:
        versions = ", ".join(str(v) for v in unreadable)
        return problem(
            503,
            "not-ready",
            "Not ready",
            f"the keyring cannot unwrap data keys wrapped under KEK version(s) {versions}",
            retry_after=5,
        )
    # The model service's breaker is shown, but an open one does not make the replica unready:
    # every replica sees the same upstream, and taking them all out of rotation would turn the
    # fast 503s of a degraded service into no service at all.
    breaker = ctx.upstream.breaker
    upstream: dict[str, Any] = {"breaker": breaker.state}
    if breaker.state != "closed":
        upstream["retry_after"] = round(breaker.retry_after(), 1)
    return Response({"status": "ready", "upstream": upstream})
