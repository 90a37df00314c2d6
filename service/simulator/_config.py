"""Settings of one simulator instance."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["SimulatorConfig"]


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated Interactions API behaves; every default mirrors the real service or is
    stricter than it."""

    # Stored interactions expire after this many seconds (the real API: 55 days paid, 1 day free).
    retention_seconds: float = 55 * 24 * 3600.0
    # A background interaction is `queued` for this long, then `in_progress` for run_seconds.
    background_queued_seconds: float = 0.2
    background_run_seconds: float = 0.5
    # Latency added to every API request (not to /_simulator/ admin calls).
    latency_ms: float = 0.0
    # When set, requests must carry exactly this key; otherwise any non-empty key is accepted.
    api_key: str | None = None
    # Emit an unknown step type and unknown fields on every turn, so that clients which drop what
    # their SDK does not know are caught.
    emit_unknown: bool = True
    # Refuse replayed model steps that differ from what this simulator produced. The real API is
    # lenient (it may answer an altered history with an empty reply); we fail loudly instead.
    strict_replay: bool = True
    # Append each request as one JSON line to this file; None keeps the log in memory only.
    request_log_path: Path | None = None
    # How many requests the in-memory log keeps (oldest dropped first; 0 keeps none). Bodies
    # replaying long histories are large, and an unbounded log would slow the simulator's own
    # garbage collection in long benchmarks.
    request_log_limit: int = 1000
    # Words per SSE text delta.
    stream_chunk_words: int = 3
