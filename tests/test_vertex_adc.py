"""Vertex AI with Application Default Credentials, end to end: `custody serve` configured only by
the SDK's own variables (GOOGLE_GENAI_USE_VERTEXAI, GOOGLE_CLOUD_PROJECT, GOOGLE_CLOUD_LOCATION,
GOOGLE_APPLICATION_CREDENTIALS), no API key, reaching the simulator at Vertex's URL shape with a
bearer token from a service-account file whose token endpoint is local (offline)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.simulator import RunningSimulator

from .api.helpers import take_turn
from .conftest import Tenant, deployment_env
from .service_process import ServiceProcess, start_service
from .test_upstream_wire import ACCESS_TOKEN, adc

__all__ = ["adc"]

PROJECT, LOCATION = "custody-test-proj", "europe-west4"
PREFIX = f"/v1beta1/projects/{PROJECT}/locations/{LOCATION}/interactions"


@pytest.fixture
def vertex_service(
    adc: None,
    database_url: str,
    gemini: RunningSimulator,
    keyring_path: Path,
    signing_key_path: Path,
    pepper_path: Path,
    tmp_path: Path,
) -> Iterator[ServiceProcess]:
    """`custody serve` on the session database, on Vertex AI with ADC, the simulator as its endpoint."""
    env = dict(os.environ) | deployment_env(database_url, keyring_path, signing_key_path, pepper_path)
    for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "CUSTODY_USE_SIMULATOR"):
        # No key anywhere (or it would be express mode), and no built-in simulator to fall back on.
        env.pop(name, None)
    env |= {
        "GOOGLE_GENAI_USE_VERTEXAI": "true",
        "GOOGLE_CLOUD_PROJECT": PROJECT,
        "GOOGLE_CLOUD_LOCATION": LOCATION,
        "GOOGLE_GEMINI_BASE_URL": gemini.base_url,
        "CUSTODY_DATA_DIR": str(tmp_path / "data"),
        # The session database is shared with other tests: no runner purging it from here.
        "CUSTODY_RETENTION_INTERVAL_SECONDS": "0",
    }
    assert env["GOOGLE_APPLICATION_CREDENTIALS"].endswith("adc.json")
    gemini.app.reset()
    service = start_service(env, tmp_path / "serve.log")
    try:
        service.wait_ready()
        yield service
    finally:
        service.stop()
        gemini.app.reset()


async def test_turns_reach_vertex_with_application_default_credentials(
    vertex_service: ServiceProcess, gemini: RunningSimulator, tenant: Tenant
) -> None:
    """A replayed conversation and a chained one (provider storage) through the API: every request the model gets is on Vertex's project/location path with the ADC bearer token, and deleting the conversation deletes the provider's copies on that path too."""
    async with httpx.AsyncClient(base_url=vertex_service.url, timeout=30) as http:
        created = await http.post(
            "/v1/conversations", headers=tenant.headers(), json={"route": "patient-intake", "data_classes": ["phi"]}
        )
        assert created.status_code == 201, created.text
        private = created.json()["id"]
        await take_turn(http, tenant.headers(), private, "my knee hurts")
        answer = await take_turn(http, tenant.headers(), private, "what did I say first?")
        assert answer["output_text"] == 'You first said: "my knee hurts".'

        created = await http.post(
            "/v1/conversations", headers=tenant.headers(), json={"route": "public-faq", "data_classes": ["public"]}
        )
        public = created.json()["id"]
        await take_turn(http, tenant.headers(), public, "opening hours?")
        await take_turn(http, tenant.headers(), public, "and on Sundays?")
        deleted = await http.delete(f"/v1/conversations/{public}", headers=tenant.headers())
        assert deleted.status_code == 200, deleted.text

    requests = gemini.app.requests
    creates = gemini.app.create_requests()
    assert len(creates) == 4
    assert [r.body["store"] for r in creates] == [False, False, True, True]
    # The public conversation's second turn chained onto the first's copy, on the same path.
    assert creates[3].body["previous_interaction_id"] == creates[2].response["id"]
    deletes = [r for r in requests if r.method == "DELETE"]
    assert {r.path for r in deletes} == {f"{PREFIX}/{c.response['id']}" for c in creates[2:]}
    for request in requests:
        assert request.path.startswith(PREFIX), request.path
        assert request.headers["authorization"] == f"Bearer {ACCESS_TOKEN}"
        assert "x-goog-api-key" not in request.headers
