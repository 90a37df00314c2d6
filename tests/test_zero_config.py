"""The README's zero-config run: embedded Postgres, simulated Gemini, demo keys, then the walkthrough."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def zero_config_service() -> Iterator[tuple[str, Path, list[str]]]:
    """`custody serve` with no DATABASE_URL, no API key and no keyring, in a fresh data dir."""
    # Not tmp_path: pytest keeps /tmp/pytest-of-root at 0700, which the embedded Postgres (run as
    # an unprivileged user, since Postgres refuses root) cannot enter.
    with tempfile.TemporaryDirectory() as scratch:
        data_dir = Path(scratch) / "data"
        port = _free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if k
            not in {
                "DATABASE_URL",
                "GEMINI_API_KEY",
                "GOOGLE_API_KEY",
                "CUSTODY_KEYRING",
                "CUSTODY_PEPPER_FILE",
                "GOOGLE_GEMINI_BASE_URL",
                "GOOGLE_GENAI_USE_VERTEXAI",
            }
        }
        env |= {"CUSTODY_DATA_DIR": str(data_dir), "CUSTODY_PORT": str(port)}
        log_path = Path(scratch) / "serve.log"
        with log_path.open("w") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "service", "serve"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 90
            while True:
                assert process.poll() is None, log_path.read_text()
                try:
                    if httpx.get(f"{base}/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.1)
            yield base, data_dir, log_path.read_text().splitlines()
        finally:
            process.terminate()
            process.wait(timeout=30)
        # A clean stop also stops the embedded Postgres it started.
        assert not (data_dir / "postgres" / "postmaster.pid").exists()


def test_zero_config_run_announces_defaults_and_serves_the_walkthrough(
    zero_config_service: tuple[str, Path, list[str]],
) -> None:
    """With nothing configured, every embedded default is announced, demo keys are printed, the README walkthrough works, and /metrics answers the generated token."""
    base, data_dir, lines = zero_config_service
    output = "\n".join(lines)
    assert "EMBEDDED DEFAULT: no DATABASE_URL" in output
    assert "EMBEDDED DEFAULT: no CUSTODY_KEY_STORE_URL, keeping the expiry keys in the database custody_keys" in output
    assert "EMBEDDED DEFAULT: no GEMINI_API_KEY" in output
    assert "SIMULATOR" in output
    assert "EMBEDDED DEFAULT: generated a local keyring" in output
    assert (data_dir / "keyring.json").stat().st_mode & 0o777 == 0o600
    keys = dict(re.findall(r"^\s+(backend|auditor|ops)\s+(cust_\S+)$", output, re.M))
    assert set(keys) == {"backend", "auditor", "ops"}

    auth = {"Authorization": f"Bearer {keys['backend']}"}
    with httpx.Client(base_url=base, headers=auth) as http:
        created = http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
        assert created.status_code == 201, created.text
        conversation = created.json()["id"]
        first = http.post(f"/v1/conversations/{conversation}/turns", json={"input": "I have had a cough for 3 days"})
        assert first.json()["storage"]["store"] is False
        second = http.post(f"/v1/conversations/{conversation}/turns", json={"input": "What did I say first?"})
        assert second.json()["output_text"] == 'You first said: "I have had a cough for 3 days".'
        history = http.get(f"/v1/conversations/{conversation}/steps").json()
        assert len(history["steps"]) == 8
        assert http.delete(f"/v1/conversations/{conversation}").status_code == 200
        assert http.get(f"/v1/conversations/{conversation}").status_code == 404

    # /metrics, with the token the run generated and announced.
    token_path = data_dir / "metrics-token"
    assert f"generated the /metrics bearer token at {token_path}" in output
    scrape = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {token_path.read_text().strip()}"})
    assert scrape.status_code == 200
    assert 'custody_turns_total{route="patient-intake",status="completed"} 2.0' in scrape.text
