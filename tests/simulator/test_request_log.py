"""The request log: exactly what the client sent, and nothing on disk unless asked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
from google import genai

from service.simulator import RunningSimulator, SimulatorConfig, start_simulator

from .conftest import MODEL, make_client


def test_log_records_method_path_query_headers_and_body(client: genai.Client, sim: RunningSimulator) -> None:
    """Each API request is logged with its method, path, query, headers and parsed body."""
    created = client.interactions.create(
        model=MODEL, input="log me", store=True, extra_headers={"Api-Revision": "2026-05-20"}
    )
    client.interactions.get(created.id, include_input=True)
    create, get = sim.app.requests
    assert (create.method, create.path) == ("POST", "/v1/interactions")
    assert create.headers["api-revision"] == "2026-05-20"
    assert create.headers["x-goog-api-key"] == "test-key"
    assert create.body == {"model": MODEL, "input": "log me", "store": True}
    assert (get.method, get.path, get.query) == (
        "GET",
        f"/v1/interactions/{created.id}",
        {"include_input": "true", "stream": "false"},
    )


def test_admin_calls_are_not_logged(sim: RunningSimulator) -> None:
    """Reading the log over HTTP does not add to it, and redacts the API key."""
    client = make_client(sim)  # keep a reference: a collected Client closes its transport
    client.interactions.create(model=MODEL, input="hi", store=False)
    logged = httpx.get(f"{sim.base_url}/_simulator/requests").json()
    again = httpx.get(f"{sim.base_url}/_simulator/requests").json()
    assert len(logged) == len(again) == 1
    assert logged[0]["headers"]["x-goog-api-key"] == "<redacted>"


def test_nothing_is_written_to_disk_unless_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a log path no file appears; with one, every request is a JSON line with keys redacted."""
    monkeypatch.chdir(tmp_path)
    with start_simulator() as quiet:
        quiet_client = make_client(quiet)
        quiet_client.interactions.create(model=MODEL, input="hi", store=False)
    assert os.listdir(tmp_path) == []
    log_path = tmp_path / "requests.jsonl"
    with start_simulator(SimulatorConfig(request_log_path=log_path)) as loud:
        loud_client = make_client(loud)
        loud_client.interactions.create(model=MODEL, input="hi", store=False)
    (line,) = log_path.read_text().splitlines()
    entry = json.loads(line)
    assert entry["body"]["input"] == "hi"
    assert entry["headers"]["x-goog-api-key"] == "<redacted>"


def test_in_memory_log_is_bounded() -> None:
    """The in-memory log keeps only the newest `request_log_limit` requests."""
    with start_simulator(SimulatorConfig(request_log_limit=2)) as bounded:
        client = make_client(bounded)
        for text in ("one", "two", "three"):
            client.interactions.create(model=MODEL, input=text, store=False)
        assert [r.body["input"] for r in bounded.app.requests] == ["two", "three"]
