"""Streamed turns from a real `custody serve` process: the SSE stream read with the SDK's own
event-stream parser, a client that disconnects mid-turn, and its events read again afterwards."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from google.genai._gaos.utils.eventstreaming import stream_events_async

from service.config import REPO_ROOT
from service.simulator import FaultSpec, RunningSimulator, SimulatorConfig, start_simulator

from ..conftest import CANARY, TEST_PEPPER, Tenant, key_store_of
from ..service_process import ServiceProcess, start_service
from .sse import Event, read_events

VALIDATOR = jsonschema.Draft202012Validator(json.loads((REPO_ROOT / "schemas" / "turn-events.schema.json").read_text()))


@pytest.fixture(scope="module")
def paced_gemini() -> Iterator[RunningSimulator]:
    with start_simulator(SimulatorConfig()) as sim:
        yield sim


@pytest.fixture
def service(
    database_url: str, paced_gemini: RunningSimulator, keyring_path: Path, signing_key_path: Path, tmp_path: Path
) -> Iterator[ServiceProcess]:
    pepper = tmp_path / "pepper"
    pepper.write_bytes(TEST_PEPPER)
    pepper.chmod(0o600)
    env = os.environ | {
        "DATABASE_URL": database_url,
        "CUSTODY_KEY_STORE_URL": key_store_of(database_url),
        "GEMINI_API_KEY": "test-key",
        "GOOGLE_GEMINI_BASE_URL": paced_gemini.base_url,
        "CUSTODY_KEYRING": str(keyring_path),
        "CUSTODY_PEPPER_FILE": str(pepper),
        "CUSTODY_DATA_DIR": str(tmp_path / "data"),
        "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key_path),
        "CUSTODY_RETENTION_INTERVAL_SECONDS": "0",
    }
    process = start_service(env, tmp_path / "serve.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()
    assert CANARY not in process.output()


async def test_custody_serve_streams_a_turn_and_keeps_it_when_the_client_leaves(
    service: ServiceProcess, tenant: Tenant, paced_gemini: RunningSimulator
) -> None:
    headers = tenant.headers()
    sse = headers | {"Accept": "text/event-stream"}
    async with httpx.AsyncClient(base_url=service.url, timeout=30) as http:
        created = await http.post(
            "/v1/conversations", headers=headers, json={"route": "patient-intake", "data_classes": ["phi"]}
        )
        conversation = created.json()["id"]
        turns = f"/v1/conversations/{conversation}/turns"

        # Read whole with the SDK's own SSE parser: every event a valid one, with its id.
        async with http.stream("POST", turns, headers=sse, json={"input": f"hello {CANARY}"}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            parsed: list[dict[str, Any]] = [e async for e in stream_events_async(response, decoder=json.loads)]
        assert [e["id"] for e in parsed] == [str(n) for n in range(1, len(parsed) + 1)]
        for item in parsed:
            VALIDATOR.validate(item["data"])
            assert item["event"] == item["data"]["type"]
        assert parsed[-1]["data"]["type"] == "turn.completed"
        assert CANARY in parsed[-1]["data"]["output_text"]

        # The model pauses after its third event; the client leaves after the first delta.
        paced_gemini.app.inject(FaultSpec(pause_after_events=3))
        async with http.stream("POST", turns, headers=sse, json={"input": "I am leaving"}) as response:
            seen: list[Event] = []
            async for event in read_events(response):
                seen.append(event)
                if event.type == "step.delta":
                    break
        turn_id = seen[0].data["turn_id"]
        paced_gemini.app.advance(3600)

        async def status() -> str:
            read = await http.get(f"{turns}/{turn_id}", headers=headers)
            return str(read.json()["status"])

        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while await status() == "in_progress":
            assert loop.time() < deadline, service.output()
            await asyncio.sleep(0.05)
        assert await status() == "completed"
        async with http.stream(
            "GET", f"{turns}/{turn_id}/events", headers=headers | {"Last-Event-ID": seen[-1].id or ""}
        ) as response:
            rest = [event async for event in read_events(response)]
        assert rest[0].id == str(int(seen[-1].id or 0) + 1)
        assert rest[-1].type == "turn.completed"
        assert rest[-1].data["output_text"].startswith('Turn 2: you said "I am leaving"')
        after = await http.post(turns, headers=headers, json={"input": "how many messages"})
        assert after.json()["output_text"] == "You have sent 3 messages."
