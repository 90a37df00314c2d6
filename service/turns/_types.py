"""What a turn is asked to do, and what it came to: the value objects the turn engine passes on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..audit import RequestMeta
from ..auth import Principal

__all__ = ["TurnRequest", "TurnResult"]

# The sealed idempotent answer is this record, tagged with its version, so that the HTTP wire
# format can change without touching what is stored (and replayed) under a key.
_RESULT_FORMAT = "turn-result-v1"


@dataclass(frozen=True)
class TurnRequest:
    """One call to take a turn: who asks, from where, on which conversation, with what."""

    principal: Principal
    meta: RequestMeta
    conversation_id: str
    raw_input: Any = field(repr=False)  # content: never in a repr
    idempotency_key: str | None = field(default=None, repr=False)
    # The request body's size, to decide whether to scan it off the event loop.
    input_bytes: int = 0
    # The caller's Request-Timeout in seconds, if it sent one (the context's deadline caps it).
    timeout_seconds: float | None = None


@dataclass(frozen=True)
class TurnResult:
    """What a turn came to, as the caller sees it (and as a repeated Idempotency-Key replays it)."""

    conversation_id: str
    turn_id: str
    turn_number: int
    status: str  # completed | requires_action | failed
    error_code: str | None
    steps: list[Any] = field(repr=False)
    output_text: str = field(repr=False)
    usage: dict[str, int]
    # Whether the provider was allowed to keep this turn (`store` as sent), and why.
    store: bool
    storage_reason: str
    policy_version: str

    def to_record(self) -> dict[str, Any]:
        return {"format": _RESULT_FORMAT, **asdict(self)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> TurnResult:
        if record.get("format") != _RESULT_FORMAT:
            raise ValueError("not a stored turn result")
        return cls(**{name: value for name, value in record.items() if name != "format"})
