"""A real `custody serve` believes X-Forwarded-For only from proxies it was told to trust."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.simulator import RunningSimulator

from .conftest import TEST_PEPPER, Tenant, key_store_of

SPOOFED = "203.0.113.9"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Served:
    """One `custody serve` process on the test database."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process, self.url, self.log = process, url, log

    def stop(self) -> None:
        """SIGTERM, as an orchestrator sends it, and wait for the shutdown to finish."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


@pytest.fixture
def serve(
    database_url: str, gemini: RunningSimulator, keyring_path: Path, signing_key_path: Path, tmp_path: Path
) -> Iterator[Callable[..., Served]]:
    """Starts `custody serve` with extra environment variables, ready to take requests."""
    pepper = tmp_path / "pepper"
    pepper.write_bytes(TEST_PEPPER)
    pepper.chmod(0o600)
    started: list[Served] = []

    def start(**extra: str) -> Served:
        port = _free_port()
        env = os.environ | {
            "DATABASE_URL": database_url,
            "CUSTODY_KEY_STORE_URL": key_store_of(database_url),
            "GEMINI_API_KEY": "test-key",
            "GOOGLE_GEMINI_BASE_URL": gemini.base_url,
            "CUSTODY_KEYRING": str(keyring_path),
            "CUSTODY_PEPPER_FILE": str(pepper),
            "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key_path),
            "CUSTODY_DATA_DIR": str(tmp_path / f"data{len(started)}"),
            "CUSTODY_PORT": str(port),
            **extra,
        }
        log = tmp_path / f"serve{len(started)}.log"
        with log.open("w") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
            )
        served = Served(process, f"http://127.0.0.1:{port}", log)
        started.append(served)
        # Waiting on another process: there is no clock of ours to move.
        for _ in range(600):
            assert process.poll() is None, log.read_text()
            try:
                if httpx.get(f"{served.url}/readyz").status_code == 200:
                    return served
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"custody serve did not become ready:\n{log.read_text()}")

    yield start
    for served in started:
        served.stop()


async def _records(engine: AsyncEngine, where: str, **params: Any) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        rows = await connection.execute(text(f"SELECT record FROM audit_events WHERE {where} ORDER BY seq"), params)
        return [dict(row) for row in rows.scalars().all()]


@pytest.mark.parametrize(
    ("trusted", "recorded"),
    [("", "127.0.0.1"), ("127.0.0.1", SPOOFED), ("10.0.0.0/8, ::1", "127.0.0.1")],
    ids=["no proxies", "the peer is a trusted proxy", "the peer is not among them"],
)
async def test_forwarded_for_is_believed_only_from_trusted_proxies(
    serve: Callable[..., Served], tenant: Tenant, engine: AsyncEngine, trusted: str, recorded: str
) -> None:
    """With CUSTODY_TRUSTED_PROXIES empty (uvicorn's FORWARDED_ALLOW_IPS notwithstanding) or not naming the peer, the record holds the peer's address; naming it, the forwarded one."""
    served = serve(CUSTODY_TRUSTED_PROXIES=trusted, FORWARDED_ALLOW_IPS="*")
    request_id = f"proxy-{secrets.token_hex(3)}"
    async with httpx.AsyncClient(timeout=30) as http:
        response = await http.post(
            f"{served.url}/v1/conversations",
            json={"route": "public-faq", "data_classes": ["public"]},
            headers=tenant.headers() | {"X-Forwarded-For": SPOOFED, "X-Request-Id": request_id},
        )
    assert response.status_code == 201, response.text
    (record,) = await _records(engine, "record->'source'->>'request_id' = :rid", rid=request_id)
    assert record["action"] == "conversation.create"
    assert record["source"]["address"] == recorded


async def test_failures_from_a_spoofing_client_are_summarised_at_shutdown(
    serve: Callable[..., Served], engine: AsyncEngine
) -> None:
    """Failed authentications still in their window are written when the service stops, under the peer's address, never the spoofed one."""
    served = serve()
    async with engine.connect() as connection:
        query = text("SELECT coalesce(max(seq), 0) FROM audit_events WHERE chain = 'system'")
        before = int((await connection.execute(query)).scalar_one())
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(5):
            response = await http.get(
                f"{served.url}/v1/conversations/conv_x",
                headers={"Authorization": "Bearer cust_0000_nope", "X-Forwarded-For": SPOOFED},
            )
            assert response.status_code == 401, response.text
    served.stop()
    assert served.process.returncode == 0, served.log.read_text()
    found = await _records(
        engine,
        "chain = 'system' AND seq > :before AND record->>'action' = 'auth.failure'",
        before=before,
    )
    assert len(found) == 2, found
    assert sum(int(r["details"].get("count", 1)) for r in found) == 5
    assert {r["source"]["address"] for r in found} == {"127.0.0.1"}
