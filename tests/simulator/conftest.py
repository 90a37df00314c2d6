"""Fixtures for driving the simulator through the real google-genai SDK."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

import pytest
from google import genai
from google.genai import _interactions as errors
from google.genai import interactions, types

from service.simulator import RunningSimulator, SimulatorConfig, start_simulator

# Final, so that mypy keeps the literal: the SDK types `model` as its list of known names.
MODEL: Final = "gemini-3-flash-preview"


@pytest.fixture(scope="session")
def running() -> Iterator[RunningSimulator]:
    with start_simulator(SimulatorConfig(retention_seconds=60.0)) as sim:
        yield sim


@pytest.fixture
def sim(running: RunningSimulator) -> Iterator[RunningSimulator]:
    running.app.reset()
    yield running
    running.app.reset()


def make_client(
    sim: RunningSimulator, *, attempts: int = 1, initial_delay: float | None = None, max_delay: float | None = None
) -> genai.Client:
    """A real SDK client pointed at the simulator; retries off unless asked for."""
    retry = types.HttpRetryOptions(attempts=attempts, initial_delay=initial_delay, max_delay=max_delay)
    return genai.Client(
        api_key="test-key",
        http_options=types.HttpOptions(base_url=sim.base_url, retry_options=retry, timeout=10_000),
    )


@pytest.fixture
def client(sim: RunningSimulator) -> genai.Client:
    return make_client(sim)


def text_input(text: str) -> dict[str, Any]:
    """A user_input step as wire JSON, as the simulator records it."""
    return {"type": "user_input", "content": [{"type": "text", "text": text}]}


def user_step(text: str) -> interactions.StepParam:
    """The same step typed as the SDK's parameter, for the typed `create`."""
    return {"type": "user_input", "content": [{"type": "text", "text": text}]}


def error_body(error: errors.APIStatusError) -> dict[str, Any]:
    """The JSON error body the SDK kept from a refused request (the SDK types it `object`)."""
    body = error.body
    assert isinstance(body, dict), body
    return body
