"""Turns: what a client may send, the claim, the model call and the settling of its outcome."""

from ._background import BackgroundTurns, TurnView
from ._engine import TurnEngine
from ._input import check_function_results, normalize_client_input, pending_calls
from ._stream import StreamingTurns
from ._types import TurnRequest, TurnResult

__all__ = [
    "BackgroundTurns",
    "StreamingTurns",
    "TurnEngine",
    "TurnRequest",
    "TurnResult",
    "TurnView",
    "check_function_results",
    "normalize_client_input",
    "pending_calls",
]
