"""What a model's reply means for a turn: kept or not, its status, usage and output text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..upstream import UpstreamReply

__all__ = ["Outcome", "outcome_of_reply", "output_text"]

# Only these statuses leave a history the model can continue from.
_KEPT = frozenset({"completed", "requires_action"})
_USAGE_FIELDS = (
    "total_input_tokens",
    "total_output_tokens",
    "total_thought_tokens",
    "total_cached_tokens",
    "total_tool_use_tokens",
    "total_tokens",
)


@dataclass(frozen=True)
class Outcome:
    """A reply read, before anything is stored. A turn the model did not complete stores nothing,
    so it shows nothing either: output the next turn's model will never see would mislead."""

    kept: bool
    status: str
    error_code: str | None
    upstream_status: str
    usage: dict[str, int]
    reply: UpstreamReply = field(repr=False)
    model_steps: list[Any] = field(repr=False)
    # The same steps as the upstream's exact bytes: what is stored and replayed.
    model_step_bytes: list[bytes] = field(repr=False)

    @property
    def last_interaction(self) -> str | None:
        ids = self.reply.interaction_ids
        return ids[-1] if ids else None


def outcome_of_reply(reply: UpstreamReply) -> Outcome:
    body = reply.body
    upstream_status = str(body.get("status", ""))
    kept = upstream_status in _KEPT
    model_steps: list[Any] = (body.get("steps") or []) if kept else []
    error_code = None if kept else f"model_{upstream_status or 'no_status'}"[:80]
    status = upstream_status if kept else "failed"
    usage = _usage(body.get("usage"))
    return Outcome(kept, status, error_code, upstream_status, usage, reply, model_steps, reply.steps if kept else [])


def _usage(raw: Any) -> dict[str, int]:
    if not isinstance(raw, dict):
        return {}
    return {k: int(raw[k]) for k in _USAGE_FIELDS if isinstance(raw.get(k), int)}


def output_text(steps: list[Any]) -> str:
    """The trailing run of text in model_output steps, as the SDK computes `output_text`:
    thought steps are skipped, and any other step or block ends the run."""
    texts: list[str] = []
    for step in reversed(steps):
        if not isinstance(step, dict) or step.get("type") == "thought":
            continue
        if step.get("type") != "model_output":
            break
        blocks = step.get("content") or []
        run = []
        for block in reversed(blocks):
            if not isinstance(block, dict) or block.get("type") != "text":
                break
            run.append(str(block.get("text", "")))
        texts.extend(run)
        if len(run) != len(blocks):
            break
    return "".join(reversed(texts))
