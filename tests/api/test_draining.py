"""A draining replica, in process: not ready, and refusing new `/v1` requests before any handler runs."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest

from service.api import create_app
from service.auth_failures import AuthFailures
from service.context import ServiceContext
from service.drain import Drain

from ..conftest import Tenant, asgi_transport
from .helpers import assert_problem, open_conversation


@pytest.fixture
async def draining_api(ctx: ServiceContext) -> AsyncIterator[tuple[httpx.AsyncClient, Drain]]:
    """A client of an app with a drain of its own, not yet begun."""
    drain = Drain()
    own = dataclasses.replace(ctx, drain=drain, auth_failures=AuthFailures())
    async with httpx.AsyncClient(transport=asgi_transport(create_app(own)), base_url="http://custody.test") as client:
        yield client, drain


async def test_draining_replica_is_not_ready_but_alive(draining_api: tuple[httpx.AsyncClient, Drain]) -> None:
    """Once the drain begins, /readyz answers 503 not-ready saying the replica is shutting down, while /healthz still answers 200."""
    api, drain = draining_api
    assert (await api.get("/readyz")).status_code == 200
    drain.begin()
    ready = await api.get("/readyz")
    assert_problem(ready, 503, "not-ready")
    assert "shutting down" in ready.json()["detail"]
    assert ready.headers["retry-after"] == "5"
    assert (await api.get("/healthz")).status_code == 200


async def test_draining_replica_refuses_new_requests_and_changes_nothing(
    draining_api: tuple[httpx.AsyncClient, Drain], api: httpx.AsyncClient, tenant: Tenant
) -> None:
    """Once the drain begins, a new /v1 request is answered 503 shutting-down with Retry-After and Connection: close, and does not run."""
    stopping, drain = draining_api
    conversation = await open_conversation(stopping, tenant.headers())
    drain.begin()
    refused = await stopping.delete(f"/v1/conversations/{conversation}", headers=tenant.headers())
    assert_problem(refused, 503, "shutting-down")
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    assert refused.headers["x-request-id"]
    assert drain.in_flight == 0
    # It did not run: a replica that is not stopping still finds the conversation.
    assert (await api.get(f"/v1/conversations/{conversation}", headers=tenant.headers())).status_code == 200
