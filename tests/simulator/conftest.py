"""Fixtures for driving the simulator through the real google-genai SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from google import genai

from service.simulator import RunningSimulator, SimulatorConfig, start_simulator

MODEL = "gemini-3-flash-preview"


@pytest.fixture(scope="session")
def running() -> Iterator[RunningSimulator]:
    with start_simulator(SimulatorConfig(retention_seconds=60.0)) as sim:
        yield sim


@pytest.fixture
def sim(running: RunningSimulator) -> Iterator[RunningSimulator]:
    running.app.reset()
    yield running
    running.app.reset()


def make_client(sim: RunningSimulator, **retry: Any) -> genai.Client:
    """A real SDK client pointed at the simulator; retries off unless asked for."""
    retry_options = {"attempts": 1} | retry
    return genai.Client(
        api_key="test-key",
        http_options={"base_url": sim.base_url, "retry_options": retry_options, "timeout": 10_000},
    )


@pytest.fixture
def client(sim: RunningSimulator) -> genai.Client:
    return make_client(sim)


def text_input(text: str) -> dict[str, Any]:
    return {"type": "user_input", "content": [{"type": "text", "text": text}]}
