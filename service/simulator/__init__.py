"""A local, strict stand-in for Gemini's Interactions REST API, reached only by base URL."""

from ._app import RecordedRequest, Simulator
from ._config import SimulatorConfig
from ._faults import FaultSpec
from ._model import json_from_schema
from ._server import RunningSimulator, serve_forever, start_simulator

__all__ = [
    "FaultSpec",
    "RecordedRequest",
    "RunningSimulator",
    "Simulator",
    "SimulatorConfig",
    "json_from_schema",
    "serve_forever",
    "start_simulator",
]
