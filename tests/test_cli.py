"""The `custody` command line."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
from google import genai


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_simulator_runs_standalone() -> None:
    """`custody simulator --host --port` serves the Interactions API to the real SDK."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "simulator", "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                httpx.get(f"{base}/_simulator/health").raise_for_status()
                break
            except httpx.TransportError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "simulator did not start"
                time.sleep(0.1)
        client = genai.Client(api_key="k", http_options={"base_url": base, "retry_options": {"attempts": 1}})
        result = client.interactions.create(model="gemini-3-flash-preview", input="standalone", store=False)
        assert result.output_text is not None
        assert 'you said "standalone"' in result.output_text
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_unreachable_database_is_one_line_without_the_password() -> None:
    """`custody migrate` against a database nobody answers on exits 2 with one line, no traceback, no password."""
    env = {
        "PATH": "/usr/bin:/bin",
        "DATABASE_URL": "postgresql://postgres:s3cret@127.0.0.1:1/custody",
        "CUSTODY_KEY_STORE_URL": "postgresql://postgres:s3cret@127.0.0.1:1/custody_keys",
    }
    result = subprocess.run(
        [sys.executable, "-m", "service", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "cannot reach the database at DATABASE_URL" in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr
