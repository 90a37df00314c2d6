"""Turns: what a client may send, the turn engine, and the lease a turn holds on its conversation."""

from ._engine import TurnEngine, output_text
from ._input import check_function_results, normalize_client_input, pending_calls
from ._leases import close_abandoned, reap_expired_leases, renew_lease

__all__ = [
    "TurnEngine",
    "check_function_results",
    "close_abandoned",
    "normalize_client_input",
    "output_text",
    "pending_calls",
    "reap_expired_leases",
    "renew_lease",
]
