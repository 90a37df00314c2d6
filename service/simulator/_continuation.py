"""Long turns split over several interactions (`requires_continuation`), as the real API may do.

A turn whose newest user text says ``sim:continue N`` (1 to 5) is answered in N + 1 hops: each of
the first N ends ``requires_continuation`` with a single-use ``continuation_token``; the client
continues with a new create carrying that token, the interaction-scoped settings again and either
the whole original ``input`` (``store=false``) or ``previous_interaction_id`` of the hop
(``store=true``), as the SDK does. Every hop is an interaction of its own, with its own id. A
continuation hop starts with the turn's user input again, which clients drop when they merge the
hops (the SDK does); the final hop carries the rest of the model's answer.
"""

from __future__ import annotations

import re
import secrets
import threading
from dataclasses import dataclass
from typing import Any

from ._errors import invalid
from ._steps import digest

__all__ = ["Continuations", "Hop", "requested_hops", "split_into_hops"]

_TRIGGER = re.compile(r"\bsim:continue\s+([1-5])\b", re.I)


def requested_hops(latest_user_text: str) -> int:
    """How many continuation hops the newest user text asks for (0: none)."""
    match = _TRIGGER.search(latest_user_text)
    return int(match.group(1)) if match else 0


@dataclass
class Hop:
    steps: list[dict[str, Any]]
    last: bool


def split_into_hops(steps: list[dict[str, Any]], echo: dict[str, Any] | None, extra_hops: int) -> list[Hop]:
    """The model's steps spread over `extra_hops + 1` interactions: the first keeps the opening
    thought, each middle one a progress note, the last the rest of the answer."""
    head, rest = steps[:1], steps[1:]
    hops = [Hop([*head, _note(1, extra_hops + 1)], last=False)]
    lead = [echo] if echo is not None else []
    for number in range(2, extra_hops + 1):
        hops.append(Hop([*lead, _note(number, extra_hops + 1)], last=False))
    hops.append(Hop([*lead, *rest], last=True))
    return hops


def _note(number: int, total: int) -> dict[str, Any]:
    return {"type": "model_output", "content": [{"type": "text", "text": f"(part {number} of {total})"}]}


@dataclass
class _Pending:
    hops: list[Hop]
    store: bool
    input_digest: str  # of the whole original input, which store=false continuations resend
    previous_id: str  # the hop the next continuation must follow (store=true)
    final_status: str
    usage: dict[str, int]


class Continuations:
    """The tokens handed out and not yet used; each token continues exactly one hop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}

    def open(
        self,
        hops: list[Hop],
        *,
        store: bool,
        original_input: Any,
        hop_id: str,
        final_status: str,
        usage: dict[str, int],
    ) -> str:
        token = "ct_" + secrets.token_hex(12)
        with self._lock:
            self._pending[token] = _Pending(hops, store, digest(original_input), hop_id, final_status, usage)
        return token

    def take(self, body: dict[str, Any]) -> tuple[Hop, _Pending]:
        """The next hop for a continuation request; refuses an unknown or reused token, and a
        request that does not continue the same turn the way the API requires."""
        token = body.get("continuation_token")
        with self._lock:
            pending = self._pending.pop(token, None) if isinstance(token, str) else None
        if pending is None:
            raise invalid("continuation_token is unknown or was already used")
        if pending.store:
            if body.get("previous_interaction_id") != pending.previous_id:
                raise invalid("a stored continuation needs previous_interaction_id of the interaction it continues")
        elif "input" not in body or digest(body["input"]) != pending.input_digest:
            raise invalid("a continuation with store=false must resend the original input unchanged")
        if body.get("store", True) != pending.store:
            raise invalid("a continuation must use the same store setting as the interaction it continues")
        return pending.hops.pop(0), pending

    def reopen(self, pending: _Pending, hop_id: str) -> str:
        """A fresh token for the next hop of `pending`."""
        token = "ct_" + secrets.token_hex(12)
        pending.previous_id = hop_id
        with self._lock:
            self._pending[token] = pending
        return token

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
