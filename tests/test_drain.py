"""`custody serve` told to stop (SIGTERM) with a turn in flight: it drains, then exits."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.simulator import FaultSpec, RunningSimulator

from .api.helpers import take_turn
from .conftest import CANARY, Tenant, deployment_env
from .service_process import ServiceProcess, start_service
from .turns.support import conversation_row, model_called, turns, wait_until

# Far longer than any test here: a conversation freed by these tests was freed by the drain, not
# because its lease ran out.
LEASE_SECONDS = "600"
# The bound a drained process gets to exit in, past its drain time: releasing the cancelled turns
# and closing the database pool (a bound, not a measurement).
EXIT_MARGIN_SECONDS = 15

StartService = Callable[[float], ServiceProcess]


@pytest.fixture
def serve(
    database_url: str,
    gemini: RunningSimulator,
    keyring_path: Path,
    signing_key_path: Path,
    pepper_path: Path,
    tmp_path: Path,
) -> Iterator[StartService]:
    """Starts `custody serve` on the session database, calling the test simulator, with a given drain time."""
    started: list[ServiceProcess] = []

    def start(drain_seconds: float) -> ServiceProcess:
        env = (
            dict(os.environ)
            | deployment_env(database_url, keyring_path, signing_key_path, pepper_path)
            | {
                "GEMINI_API_KEY": "test-key",
                "GOOGLE_GEMINI_BASE_URL": gemini.base_url,
                "CUSTODY_DATA_DIR": str(tmp_path / "data"),
                "CUSTODY_DRAIN_SECONDS": str(drain_seconds),
                "CUSTODY_TURN_LEASE_SECONDS": LEASE_SECONDS,
                # The session database is shared with other tests: no runner purging it from here.
                "CUSTODY_RETENTION_INTERVAL_SECONDS": "0",
            }
        )
        service = start_service(env, tmp_path / f"serve{len(started)}.log")
        started.append(service)
        service.wait_ready()
        return service

    gemini.app.reset()
    try:
        yield start
    finally:
        for service in started:
            service.stop()
        gemini.app.reset()


async def _open(http: httpx.AsyncClient, tenant: Tenant) -> str:
    created = await http.post(
        "/v1/conversations", headers=tenant.headers(), json={"route": "patient-intake", "data_classes": ["phi"]}
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def _exit_code(service: ServiceProcess, bound: float) -> int:
    """The process's exit status, once it has exited; fails if it is still running after `bound` seconds."""
    await wait_until(lambda: service.process.poll() is not None, what="custody serve exited", within=bound)
    code = service.process.returncode
    assert code is not None
    return code


async def _step_rows(engine: AsyncEngine, conversation: str) -> int:
    async with engine.connect() as connection:
        return int(
            (
                await connection.execute(
                    text("SELECT count(*) FROM steps WHERE conversation_id = :c"), {"c": conversation}
                )
            ).scalar_one()
        )


async def test_sigterm_lets_the_turn_in_flight_finish_and_store_it_then_exits_0(
    serve: StartService, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine
) -> None:
    """On SIGTERM the replica is not ready at once and refuses new requests (503 shutting-down, Connection: close), while the turn already at the model finishes, is stored and answered 200; then the process exits 0 within its drain time."""
    drain_seconds = 20.0
    service = serve(drain_seconds)
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
        conversation = await _open(http, tenant)
        gemini.app.inject(FaultSpec(latency_ms=2500))
        creates = len(gemini.app.creates())
        turn = asyncio.create_task(
            http.post(
                f"/v1/conversations/{conversation}/turns",
                headers=tenant.headers(),
                json={"input": "a turn the model answers slowly"},
            )
        )
        await model_called(gemini, creates + 1)
        service.process.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            return (await http.get("/readyz")).status_code == 503

        await wait_until(not_ready, what="/readyz answers 503", within=5)
        refused = await http.post(
            "/v1/conversations", headers=tenant.headers(), json={"route": "patient-intake", "data_classes": ["phi"]}
        )
        answered = await turn
        code = await _exit_code(service, drain_seconds)

    assert refused.status_code == 503, refused.text
    assert refused.json()["type"] == "urn:custody:problem:shutting-down"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    assert answered.status_code == 200, answered.text
    assert answered.json()["status"] == "completed"
    assert code == 0, service.output()
    assert await turns(engine, conversation) == [(1, "completed", None)]
    row = await conversation_row(engine, conversation)
    assert row is not None
    assert (row["lease_token"], row["step_count"]) == (None, await _step_rows(engine, conversation))
    assert row["step_count"] >= 2  # the input and the model's reply
    assert "stopping: not ready" in service.output()


async def test_a_turn_outlasting_the_drain_is_given_back_so_the_next_starts_at_once(
    serve: StartService, tenant: Tenant, gemini: RunningSimulator, engine: AsyncEngine, api: httpx.AsyncClient
) -> None:
    """A turn still at the model when the drain time runs out is cancelled: its caller gets 503 shutting-down, the process exits 0 without the turn's content in its output, the turn is closed failed/shutdown with nothing appended and its lease released, so the same turn retried with its Idempotency-Key runs at once elsewhere (leases here last 10 minutes)."""
    drain_seconds = 1.0
    service = serve(drain_seconds)
    async with httpx.AsyncClient(base_url=service.url, timeout=60) as http:
        conversation = await _open(http, tenant)
        gemini.app.inject(FaultSpec(latency_ms=60_000))
        creates = len(gemini.app.creates())
        turn = asyncio.create_task(
            http.post(
                f"/v1/conversations/{conversation}/turns",
                headers=tenant.headers() | {"Idempotency-Key": "drained-1"},
                json={"input": f"a turn the model never finishes in time {CANARY}"},
            )
        )
        await model_called(gemini, creates + 1)
        service.process.send_signal(signal.SIGTERM)
        answered = await turn
        code = await _exit_code(service, drain_seconds + EXIT_MARGIN_SECONDS)

    assert answered.status_code == 503, answered.text
    assert answered.json()["type"] == "urn:custody:problem:shutting-down"
    assert code == 0, service.output()
    assert CANARY not in service.output()
    assert await turns(engine, conversation) == [(1, "failed", "shutdown")]
    row = await conversation_row(engine, conversation)
    assert row is not None
    assert (row["lease_token"], row["lease_expires_at"], row["step_count"]) == (None, None, 0)
    assert await _step_rows(engine, conversation) == 0
    async with engine.connect() as connection:
        reasons = (
            await connection.execute(
                text(
                    "SELECT record->>'outcome', record->>'reason' FROM audit_events "
                    "WHERE record->>'action' = 'turn.create' AND record->'details'->>'conversation_id' = :c"
                ),
                {"c": conversation},
            )
        ).all()
    assert [tuple(r) for r in reasons] == [("error", "shutdown")]
    # Another replica (this test's in-process one, on the same database) takes the retried turn now.
    retried = await take_turn(
        api,
        tenant.headers(),
        conversation,
        f"a turn the model never finishes in time {CANARY}",
        **{"Idempotency-Key": "drained-1"},
    )
    assert (retried["status"], retried["turn_number"]) == ("completed", 2)
