"""A deployment on a database of its own, for tests that run `custody` processes against it.

A process has no movable clock, so the policy here gives `public` a rule of a few seconds: a
conversation on `public-faq` is really due that long after its last activity. The test's own
context (the same policy, keyring, pepper and signing key as the processes) opens conversations
and takes turns through the API.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.auth_failures import AuthFailures
from service.background import BackgroundTasks
from service.clock import Clock
from service.context import ServiceContext
from service.database import make_engine, make_sessions
from service.key_store import ExpiryKeyStore
from service.policy import Policy, load_policy
from service.simulator import RunningSimulator

from ..conftest import (
    Tenant,
    asgi_transport,
    deployment_env,
    key_store_of,
    make_tenant,
    make_upstream,
    migrated_database,
)
from .conftest import retention_policy_document


def short_policy_document(delete_after: str) -> dict[str, Any]:
    """The retention test policy, with `public` conversations due `delete_after` after their last activity."""
    document = copy.deepcopy(retention_policy_document())
    document["data_classes"]["public"]["retention"] = {"delete_after": delete_after}
    return document


@dataclass
class Deployed:
    url: str
    ctx: ServiceContext
    engine: AsyncEngine
    api: httpx.AsyncClient
    tenant: Tenant
    policy_path: Path
    env: dict[str, str]
    directory: Path

    def command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "service", *args]

    def run(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        """`custody ARGS` as a deployment on this database, to completion."""
        return subprocess.run(
            self.command(*args), env=self.env | (env or {}), capture_output=True, text=True, timeout=timeout
        )

    async def open(
        self, route: str = "public-faq", classes: tuple[str, ...] = ("public",), tenant: Tenant | None = None
    ) -> str:
        response = await self.api.post(
            "/v1/conversations",
            json={"route": route, "data_classes": list(classes)},
            headers=(tenant or self.tenant).headers(),
        )
        assert response.status_code == 201, response.text
        return str(response.json()["id"])

    async def turn(self, conversation: str, words: str, tenant: Tenant | None = None) -> dict[str, Any]:
        response = await self.api.post(
            f"/v1/conversations/{conversation}/turns", json={"input": words}, headers=(tenant or self.tenant).headers()
        )
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def scalar(self, sql: str, **params: Any) -> Any:
        async with self.engine.connect() as connection:
            return (await connection.execute(text(sql), params)).scalar_one()

    async def column(self, sql: str, **params: Any) -> list[Any]:
        async with self.engine.connect() as connection:
            return list((await connection.execute(text(sql), params)).scalars().all())

    async def records(self, action: str, **match: Any) -> list[dict[str, Any]]:
        return await self.column(
            "SELECT record FROM audit_events WHERE record @> CAST(:p AS jsonb) ORDER BY chain, seq",
            p=json.dumps({"action": action, **match}),
        )

    async def wait_until(self, sql: str, expected: Any, *, bound: float = 60.0, **params: Any) -> None:
        """Poll `sql` until it answers `expected`; fail after `bound` seconds (a bound, not a measurement)."""
        deadline = time.monotonic() + bound
        while (found := await self.scalar(sql, **params)) != expected:
            assert time.monotonic() < deadline, f"{sql} still answers {found!r}, not {expected!r}"
            await asyncio.sleep(0.1)

    async def wait_due(self, count: int) -> None:
        """Wait (really: a process has no movable clock) until `count` conversations are past their deadline."""
        await self.wait_until("SELECT count(*) FROM conversations WHERE purge_at <= now()", count)


@asynccontextmanager
async def deployed(
    ctx: ServiceContext,
    gemini: RunningSimulator,
    directory: Path,
    *,
    keyring: Path,
    signing_key: Path,
    pepper: Path,
    delete_after: str = "PT2S",
) -> AsyncIterator[Deployed]:
    """A migrated database of its own under the short policy, the test's context on it (calling
    `gemini`), and the environment of a `custody` process on it calling the same simulator."""
    policy_path = directory / "policy.yaml"
    policy_path.write_text(yaml.safe_dump(short_policy_document(delete_after), sort_keys=False), encoding="utf-8")
    policy: Policy = load_policy(policy_path)
    async with migrated_database("custody_test_deployed") as url:
        engine = make_engine(url)
        expiry_keys = ExpiryKeyStore.connect(key_store_of(url))
        own = dataclasses.replace(
            ctx,
            sessions=make_sessions(engine),
            expiry_keys=expiry_keys,
            policy=policy,
            upstream=make_upstream(gemini, attempts=1, timeout_seconds=10),
            clock=Clock(),
            tasks=BackgroundTasks(),
            auth_failures=AuthFailures(),
        )
        env = (
            dict(os.environ)
            | deployment_env(url, keyring, signing_key, pepper, CUSTODY_DATA_DIR=str(directory / "data"))
            | {
                "CUSTODY_POLICY": str(policy_path),
                # The test's simulator, so that the process deletes the copies the test's turns left.
                "GEMINI_API_KEY": "test-key",
                "GOOGLE_GEMINI_BASE_URL": gemini.base_url,
            }
        )
        try:
            tenant = await make_tenant(own)
            async with httpx.AsyncClient(
                transport=asgi_transport(create_app(own, max_body_bytes=64_000)), base_url="http://custody.test"
            ) as client:
                yield Deployed(url, own, engine, client, tenant, policy_path, env, directory)
            await own.tasks.drain(timeout=10)
        finally:
            await own.upstream.aclose()
            await engine.dispose()
            await expiry_keys.aclose()
