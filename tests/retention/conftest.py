"""A service on a database of its own, under a policy with retention rules and a clock tests move."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import yaml
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.auth_failures import AuthFailures
from service.background import BackgroundTasks
from service.clock import Clock
from service.config import EXAMPLE_POLICY
from service.context import ServiceContext
from service.database import make_engine, make_sessions
from service.key_store import ExpiryKeyStore
from service.policy import parse_policy
from service.simulator import RunningSimulator

from ..conftest import Tenant, asgi_transport, key_store_of, make_tenant

if TYPE_CHECKING:
    from .deployed import Deployed

DAY = 86400.0

# The example policy with retention rules, chosen so that every combination rule shows up:
#   public-faq/public        delete_after P7D; provider copies deleted after PT1H
#   patient-intake/phi       route P180D; phi keep P60D, delete P1Y -> delete P180D, keep P60D
#   patient-intake/phi+pii   pii P30D is shorter than the keep, so P180D still governs
#   billing-support/pan      pan P90D
#   billing-support/financial  keep P5Y, delete P7Y
RULES: dict[str, Any] = {
    "data_classes": {
        "public": {"delete_after": "P7D"},
        "pii": {"delete_after": "P30D"},
        "phi": {"keep_at_least": "P60D", "delete_after": "P1Y"},
        "pan": {"delete_after": "P90D"},
        "financial": {"keep_at_least": "P5Y", "delete_after": "P7Y"},
    },
    "routes": {
        "public-faq": {"delete_after": "P7D", "provider_ttl": "PT1H"},
        "patient-intake": {"delete_after": "P180D"},
    },
}


def retention_policy_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(EXAMPLE_POLICY.read_text())
    for kind, rules in RULES.items():
        for name, rule in rules.items():
            document[kind][name]["retention"] = rule
    return document


@dataclass
class RetentionService:
    ctx: ServiceContext
    engine: AsyncEngine
    api: httpx.AsyncClient
    tenant: Tenant

    async def open(self, route: str, classes: list[str], **extra: Any) -> str:
        response = await self.api.post(
            "/v1/conversations", json={"route": route, "data_classes": classes, **extra}, headers=self.tenant.headers()
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def turn(self, conversation: str, text: str) -> dict[str, Any]:
        response = await self.api.post(
            f"/v1/conversations/{conversation}/turns", json={"input": text}, headers=self.tenant.headers()
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    def advance_days(self, days: float) -> None:
        self.ctx.clock.advance(days * DAY)


@pytest.fixture
async def retention(
    ctx: ServiceContext, gemini: RunningSimulator, fresh_database: str
) -> AsyncIterator[RetentionService]:
    """The service on a database (and key store) of its own (a run purges what is due and
    destroys the expiry keys of passed days: nobody else's data), with the retention policy above
    and a clock of its own."""
    gemini.app.reset()
    engine = make_engine(fresh_database)
    expiry_keys = ExpiryKeyStore.connect(key_store_of(fresh_database))
    policy = parse_policy(retention_policy_document(), source="retention test policy")
    own = dataclasses.replace(
        ctx,
        sessions=make_sessions(engine),
        expiry_keys=expiry_keys,
        policy=policy,
        clock=Clock(),
        tasks=BackgroundTasks(),
        auth_failures=AuthFailures(),
    )
    try:
        tenant = await make_tenant(own)
        async with httpx.AsyncClient(
            transport=asgi_transport(create_app(own, max_body_bytes=64_000)), base_url="http://custody.test"
        ) as client:
            yield RetentionService(own, engine, client, tenant)
        await own.tasks.drain(timeout=10)
    finally:
        await engine.dispose()
        await expiry_keys.aclose()


@pytest.fixture
async def deployment(
    ctx: ServiceContext,
    gemini: RunningSimulator,
    tmp_path: Path,
    keyring_path: Path,
    signing_key_path: Path,
    pepper_path: Path,
) -> AsyncIterator[Deployed]:
    """A deployment on a database of its own where `public` conversations are due two seconds after their last activity."""
    # Imported here: tests.retention.deployed itself imports this module's policy.
    from .deployed import deployed

    gemini.app.reset()
    async with deployed(
        ctx, gemini, tmp_path, keyring=keyring_path, signing_key=signing_key_path, pepper=pepper_path
    ) as deployment:
        yield deployment
