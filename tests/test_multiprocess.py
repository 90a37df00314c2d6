"""Two `custody serve` processes racing turns on one conversation leave one unbroken history."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.simulator import FaultSpec, RunningSimulator

from .conftest import TEST_PEPPER, Tenant, key_store_of
from .service_process import ServiceProcess, start_service


@pytest.fixture
def replicas(
    database_url: str, gemini: RunningSimulator, keyring_path: Path, signing_key_path: Path, tmp_path: Path
) -> Iterator[list[str]]:
    """Two service processes on one database, keyring and pepper, calling the test simulator."""
    pepper = tmp_path / "pepper"
    pepper.write_bytes(TEST_PEPPER)
    pepper.chmod(0o600)
    services: list[ServiceProcess] = []
    try:
        for index in range(2):
            env = os.environ | {
                "DATABASE_URL": database_url,
                "CUSTODY_KEY_STORE_URL": key_store_of(database_url),
                "GEMINI_API_KEY": "test-key",
                "GOOGLE_GEMINI_BASE_URL": gemini.base_url,
                "CUSTODY_KEYRING": str(keyring_path),
                "CUSTODY_PEPPER_FILE": str(pepper),
                "CUSTODY_DATA_DIR": str(tmp_path / f"data{index}"),
                "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key_path),
            }
            services.append(start_service(env, tmp_path / f"replica{index}.log"))
        for service in services:
            service.wait_ready()
        yield [service.url for service in services]
    finally:
        for service in services:
            service.stop()


async def test_racing_replicas_never_fork_history(
    replicas: list[str], tenant: Tenant, gemini: RunningSimulator
) -> None:
    """Turns sent at the same moment to two replicas are serialized or refused with 409; the history stays linear and replayable."""
    headers = tenant.headers()
    async with httpx.AsyncClient(timeout=30) as http:
        created = await http.post(
            f"{replicas[0]}/v1/conversations",
            headers=headers,
            json={"route": "patient-intake", "data_classes": ["phi"]},
        )
        conversation = created.json()["id"]
        accepted: list[str] = []
        refused = 0
        for round_ in range(8):
            gemini.app.inject(FaultSpec(latency_ms=50, count=2))
            texts = [f"round {round_} via replica {i}" for i in range(2)]
            responses = await asyncio.gather(
                *(
                    http.post(f"{url}/v1/conversations/{conversation}/turns", headers=headers, json={"input": text})
                    for url, text in zip(replicas, texts, strict=True)
                )
            )
            for text, response in zip(texts, responses, strict=True):
                if response.status_code == 200:
                    accepted.append(text)
                else:
                    assert response.status_code == 409, response.text
                    assert response.json()["type"] == "urn:custody:problem:turn-in-progress"
                    refused += 1
        history: list[dict[str, Any]] = []
        cursor: int | None = 0
        while cursor is not None:
            page = (
                await http.get(
                    f"{replicas[1]}/v1/conversations/{conversation}/steps",
                    headers=headers,
                    params={"cursor": cursor, "limit": 500},
                )
            ).json()
            history.extend(page["steps"])
            cursor = page["next_cursor"]
        final = await http.post(
            f"{replicas[1]}/v1/conversations/{conversation}/turns",
            headers=headers,
            json={"input": "what did I say first?"},
        )
        audit = (await http.get(f"{replicas[0]}/v1/audit/verify", headers=tenant.headers("auditor"))).json()

    assert refused > 0, "the two replicas never overlapped: the test proved nothing"
    assert len(accepted) >= 8
    assert [step["position"] for step in history] == list(range(4 * len(accepted)))
    user_texts = [s["step"]["content"][0]["text"] for s in history if s["step"]["type"] == "user_input"]
    assert user_texts == accepted
    # Each turn's four steps are contiguous: its input, then the model's three steps.
    for index in range(0, len(history), 4):
        assert len({s["turn_id"] for s in history[index : index + 4]}) == 1
    # The strict simulator accepts the whole replayed history only if nothing was lost or altered.
    assert final.status_code == 200, final.text
    assert final.json()["output_text"] == f'You first said: "{accepted[0]}".'
    # Both replicas appended to the tenant's audit chain at once; it is still one unbroken chain.
    assert audit["ok"] is True, audit
    assert audit["checked"] >= 2 * len(accepted) + refused, audit
