"""Failed authentications are rate limited per source and per key id, and summarised in the log."""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import jsonschema
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.audit import to_fhir_audit_event
from service.auth import parse_bearer
from service.auth_failures import AuthFailureLimits, AuthFailures
from service.config import REPO_ROOT
from service.context import ServiceContext
from service.tenants import revoke_key

from ..conftest import NewTenant, Tenant, asgi_transport
from .helpers import assert_problem

WINDOW = 60.0
SCHEMA = json.loads((REPO_ROOT / "schemas" / "audit-event.schema.json").read_text())


class Clock:
    """The limiter's clock, moved by the test instead of by sleeping."""

    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


class Service:
    """One app with a limiter of its own, reached from any client address."""

    def __init__(self, ctx: ServiceContext, limits: AuthFailureLimits) -> None:
        self.clock = Clock()
        self.failures = AuthFailures(limits, clock=self.clock)
        self.ctx = dataclasses.replace(ctx, auth_failures=self.failures)
        self.app = create_app(self.ctx, max_body_bytes=64_000)
        self._clients: dict[str, httpx.AsyncClient] = {}

    def client(self, address: str) -> httpx.AsyncClient:
        if address not in self._clients:
            transport = asgi_transport(self.app, client=(address, 40000))
            self._clients[address] = httpx.AsyncClient(transport=transport, base_url="http://custody.test")
        return self._clients[address]

    async def flush_after_window(self) -> int:
        self.clock.now += WINDOW
        return await self.failures.flush(self.ctx.auditor, self.ctx.sessions)

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()


MakeService = Callable[..., Service]


@pytest.fixture
async def service(ctx: ServiceContext) -> AsyncIterator[MakeService]:
    """Makes services with limits of their own (`AuthFailureLimits` fields), closed afterwards."""
    services: list[Service] = []

    def make(**limits: int) -> Service:
        services.append(Service(ctx, AuthFailureLimits(window_seconds=WINDOW, **limits)))
        return services[-1]

    yield make
    for made in services:
        await made.aclose()


def wrong(tenant: Tenant, role: str = "backend") -> tuple[str, dict[str, str]]:
    """A real key id with a made-up secret: (the secret, the headers)."""
    key_id, _ = parse_bearer(tenant.headers(role)["Authorization"])
    secret = f"WRONG{secrets.token_hex(12)}"
    return secret, {"Authorization": f"Bearer cust_{key_id}_{secret}"}


def key_id_of(tenant: Tenant, role: str = "backend") -> str:
    return "key_" + parse_bearer(tenant.headers(role)["Authorization"])[0]


async def records(engine: AsyncEngine, chain: str, *, address: str | None = None) -> list[dict[str, Any]]:
    """The auth.failure records of one chain (from one address, if given), oldest first."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                "SELECT record FROM audit_events WHERE chain = :chain AND record->>'action' = 'auth.failure' "
                "ORDER BY seq"
            ),
            {"chain": chain},
        )
        found = [dict(row) for row in rows.scalars().all()]
    return [r for r in found if address is None or r["source"]["address"] == address]


async def chain_of(engine: AsyncEngine, tenant: Tenant) -> str:
    async with engine.connect() as connection:
        query = text("SELECT id FROM tenants WHERE name = :name")
        return str((await connection.execute(query, {"name": tenant.name})).scalar_one())


def attempts(found: list[dict[str, Any]]) -> int:
    """How many attempts the records stand for: a summary says `count`, any other record is one."""
    return sum(int(r["details"].get("count", 1)) for r in found)


async def test_wrong_secrets_on_a_real_key_are_summarised_in_its_tenants_chain(
    service: MakeService, tenant: Tenant, engine: AsyncEngine, spans: InMemorySpanExporter
) -> None:
    """200 wrong secrets from one address: 20 answered 401, the rest 429, and two records in the key's tenant chain counting all 200."""
    svc = service()
    secret, headers = wrong(tenant)
    attacker = svc.client("198.51.100.7")
    spans.clear()
    statuses = []
    for _ in range(200):
        response = await attacker.get("/v1/conversations/conv_x", headers=headers)
        statuses.append(response.status_code)
        if response.status_code == 429:
            assert_problem(response, 429, "too-many-authentication-failures")
            assert response.headers["retry-after"] == "60"
    assert statuses == [401] * 20 + [429] * 180
    assert await svc.flush_after_window() == 1

    auditor = svc.client("192.0.2.10")
    listed = await auditor.get("/v1/audit/events", params={"action": "auth.failure"}, headers=tenant.headers("auditor"))
    assert listed.status_code == 200, listed.text
    events = listed.json()["events"]
    assert len(events) == 2
    assert attempts(events) == 200
    first, summary = events
    for record in events:
        jsonschema.validate(record, SCHEMA)
        to_fhir_audit_event(record)
        assert record["actor"]["key_id"] == key_id_of(tenant)
        assert record["source"]["address"] == "198.51.100.7"
        assert (record["outcome"], record["reason"]) == ("denied", "invalid_secret")
    assert first["details"] == {"operation": "GetConversation"}
    assert summary["details"]["count"] == 199
    assert summary["details"]["rate_limited"] == 180
    assert summary["details"]["window_start"] < summary["details"]["window_end"]
    assert summary["source"]["request_id"] is None
    # Nothing of it went to the system chain, and the secret went nowhere.
    assert await records(engine, "system", address="198.51.100.7") == []
    assert secret not in json.dumps(events)
    assert all(secret not in json.dumps(dict(s.attributes or {})) for s in spans.get_finished_spans())


async def test_the_right_secret_still_works_while_its_key_id_is_limited(service: MakeService, tenant: Tenant) -> None:
    """Past the per-key limit wrong secrets get 429 from any address, while the key's own secret still authenticates."""
    svc = service(per_source=100, per_key=3)
    _, headers = wrong(tenant)
    attacker, elsewhere = svc.client("198.51.100.8"), svc.client("198.51.100.9")
    for _ in range(3):
        assert (await attacker.get("/v1/conversations/conv_x", headers=headers)).status_code == 401
    limited = await attacker.get("/v1/conversations/conv_x", headers=headers)
    assert_problem(limited, 429, "too-many-authentication-failures")
    assert int(limited.headers["retry-after"]) == 60
    assert (await elsewhere.get("/v1/conversations/conv_x", headers=headers)).status_code == 429
    owner = await attacker.get("/v1/conversations/conv_x", headers=tenant.headers())
    assert owner.status_code == 404, owner.text
    svc.clock.now += 45
    assert (await attacker.get("/v1/conversations/conv_x", headers=headers)).headers["retry-after"] == "15"
    svc.clock.now += 15
    assert (await attacker.get("/v1/conversations/conv_x", headers=headers)).status_code == 401


async def test_a_limited_address_does_not_limit_another(
    service: MakeService, tenant: Tenant, new_tenant: NewTenant
) -> None:
    """Once one address is over its limit everything from it gets 429, and another address is answered as usual."""
    svc = service()
    _, headers = wrong(tenant)
    first, second = svc.client("198.51.100.20"), svc.client("198.51.100.21")
    for _ in range(20):
        assert (await first.get("/v1/conversations/conv_x", headers=headers)).status_code == 401
    assert (await first.get("/v1/conversations/conv_x", headers=headers)).status_code == 429
    # Refused before the key is even looked at: the right key too, and no key at all.
    assert (await first.get("/v1/conversations/conv_x", headers=tenant.headers())).status_code == 429
    assert (await first.get("/v1/conversations/conv_x")).status_code == 429
    assert (await second.get("/v1/conversations/conv_x", headers=headers)).status_code == 401
    assert (await second.get("/v1/conversations/conv_x", headers=tenant.headers())).status_code == 404


async def test_unknown_key_ids_go_to_the_system_chain_unrecorded(service: MakeService, engine: AsyncEngine) -> None:
    """Attempts with a made-up key id, a malformed key or none are summarised in the system chain, and the made-up id is recorded nowhere."""
    svc = service()
    client = svc.client("203.0.113.77")
    made_up = f"feed{secrets.token_hex(6)}"
    for header in [f"Bearer cust_{made_up}_secret"] * 3 + ["Bearer nope", None]:
        response = await client.get("/v1/conversations/conv_x", headers={"Authorization": header} if header else {})
        assert_problem(response, 401, "unauthenticated")
    await svc.flush_after_window()
    found = await records(engine, "system", address="203.0.113.77")
    assert len(found) == 2
    assert attempts(found) == 5
    assert all(r["actor"] == {"tenant_id": None, "key_id": None, "role": None} for r in found)
    assert all((r["outcome"], r["reason"]) == ("denied", "unauthenticated") for r in found)
    assert made_up not in json.dumps(found)


async def test_a_revoked_keys_attempts_reach_its_tenant(
    service: MakeService, tenant: Tenant, engine: AsyncEngine, ctx: ServiceContext
) -> None:
    """A revoked key still in use is recorded in its tenant's chain with the reason revoked_key."""
    svc = service()
    async with ctx.sessions.begin() as session:
        await revoke_key(ctx.auditor, session, key_id_of(tenant), operator="test-suite", via="test")
    client = svc.client("198.51.100.30")
    for _ in range(3):
        assert (await client.get("/v1/conversations/conv_x", headers=tenant.headers())).status_code == 401
    await svc.flush_after_window()
    found = await records(engine, await chain_of(engine, tenant), address="198.51.100.30")
    assert [r["reason"] for r in found] == ["revoked_key", "revoked_key"]
    assert attempts(found) == 3
    assert all(r["actor"]["key_id"] == key_id_of(tenant) for r in found)


async def test_memory_stays_bounded_with_a_hundred_thousand_sources(ctx: ServiceContext, engine: AsyncEngine) -> None:
    """100,000 distinct failing addresses stay within the tracking caps, and every attempt is still counted."""
    clock = Clock()
    limits = AuthFailureLimits(window_seconds=WINDOW)
    failures = AuthFailures(limits, clock=clock)
    # Addresses from 100.64.0.0/10, which nothing else in the tests uses.
    addresses = [f"100.{64 + (i >> 16)}.{(i >> 8) & 255}.{i & 255}" for i in range(100_000)]
    recorded_at_once = 0
    for address in addresses:
        verdict = failures.failed(address, None, "unauthenticated")
        recorded_at_once += verdict.record_now
        assert verdict.retry_after is None
    bound = limits.max_tracked + limits.max_summaries + 1
    assert failures.tracked() <= bound
    assert recorded_at_once == limits.max_summaries + 1

    clock.now += WINDOW
    assert await failures.flush(ctx.auditor, ctx.sessions) == 1
    overflow = (await records(engine, "system"))[-1]
    assert overflow["details"]["overflow"] is True
    assert overflow["source"]["address"] is None
    assert recorded_at_once + overflow["details"]["count"] == 100_000
    assert failures.tracked() == 0
