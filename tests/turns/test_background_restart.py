"""A background turn survives its service: `custody serve` starts it and is stopped mid-run, and a
service started afterwards on the same database (a restart, or another replica) completes it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.simulator import RunningSimulator, SimulatorConfig, start_simulator

from ..conftest import CANARY, TEST_PEPPER, Tenant, key_store_of
from ..service_process import ServiceProcess, start_service

# The model runs until the test moves the simulator's clock past this.
RUN_SECONDS = 3600.0


@pytest.fixture(scope="module")
def slow_gemini() -> Iterator[RunningSimulator]:
    with start_simulator(SimulatorConfig(background_run_seconds=RUN_SECONDS)) as sim:
        yield sim


@pytest.fixture
def launch(
    database_url: str, slow_gemini: RunningSimulator, keyring_path: Path, signing_key_path: Path, tmp_path: Path
) -> Iterator[Any]:
    """Starts `custody serve` processes on the session database, calling the slow simulator."""
    pepper = tmp_path / "pepper"
    pepper.write_bytes(TEST_PEPPER)
    pepper.chmod(0o600)
    started: list[ServiceProcess] = []

    def start(name: str) -> ServiceProcess:
        env = os.environ | {
            "DATABASE_URL": database_url,
            "CUSTODY_KEY_STORE_URL": key_store_of(database_url),
            "GEMINI_API_KEY": "test-key",
            "GOOGLE_GEMINI_BASE_URL": slow_gemini.base_url,
            "CUSTODY_KEYRING": str(keyring_path),
            "CUSTODY_PEPPER_FILE": str(pepper),
            "CUSTODY_DATA_DIR": str(tmp_path / name),
            "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key_path),
            # Short leases: a stopped service's turn is free to resume within seconds.
            "CUSTODY_TURN_LEASE_SECONDS": "3",
            "CUSTODY_RETENTION_INTERVAL_SECONDS": "0",
        }
        service = start_service(env, tmp_path / f"{name}.log")
        started.append(service)
        service.wait_ready()
        return service

    try:
        yield start
    finally:
        for service in started:
            service.stop()


@pytest.mark.parametrize("how", ["stopped", "killed"])
async def test_a_restarted_service_completes_a_background_turn(
    launch: Any, tenant: Tenant, slow_gemini: RunningSimulator, how: str
) -> None:
    """The first service answers 202 and is stopped (SIGTERM) or killed (SIGKILL) while the model works; the conversation still refuses new turns (409); a service started afterwards takes the expired lease, polls the model, and stores the answer, which the history then holds."""
    slow_gemini.app.reset(state=True)
    headers = tenant.headers()
    first = launch("first")
    async with httpx.AsyncClient(timeout=30) as http:
        created = await http.post(
            f"{first.url}/v1/conversations", headers=headers, json={"route": "public-faq", "data_classes": ["public"]}
        )
        conversation = created.json()["id"]
        started = await http.post(
            f"{first.url}/v1/conversations/{conversation}/turns",
            headers=headers,
            json={"input": f"What are your opening hours? {CANARY}", "background": True},
        )
        assert started.status_code == 202, started.text
        turn_id = started.json()["turn_id"]
        if how == "stopped":
            first.stop()
            assert first.process.returncode == 0, first.output()
        else:
            first.process.kill()
            first.process.wait()

        second = launch("second")
        refused = await http.post(
            f"{second.url}/v1/conversations/{conversation}/turns", headers=headers, json={"input": "meanwhile"}
        )
        assert refused.status_code == 409, refused.text
        slow_gemini.app.advance(RUN_SECONDS + 1)

        async def status() -> dict[str, Any]:
            response = await http.get(f"{second.url}/v1/conversations/{conversation}/turns/{turn_id}", headers=headers)
            assert response.status_code == 200, response.text
            return dict(response.json())

        # Bounded wait for a state: the lease runs out (3 s), a sweep takes it, a poll sees the end.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        view = await status()
        while view["status"] == "in_progress":
            assert loop.time() < deadline, second.output()
            await asyncio.sleep(0.2)
            view = await status()
        assert view["status"] == "completed", view
        history = await http.get(f"{second.url}/v1/conversations/{conversation}/steps", headers=headers)
        steps = history.json()["steps"]
        assert [s["turn_id"] for s in steps] == [turn_id] * (1 + len(view["result"]["steps"]))
        assert CANARY in steps[0]["step"]["content"][0]["text"]
        # The conversation takes turns again.
        after = await http.post(
            f"{second.url}/v1/conversations/{conversation}/turns", headers=headers, json={"input": "thanks"}
        )
        assert after.status_code == 200, after.text
    second.stop()
    for service in (first, second):
        assert CANARY not in service.output()
