"""The request and response bodies of the REST API (msgspec structs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

__all__ = [
    "AuditEventsOut",
    "AuditVerifyOut",
    "ConversationCreate",
    "ConversationOut",
    "HistoryOut",
    "HistoryStep",
    "StorageOut",
    "TurnCreate",
    "TurnOut",
]


class ConversationCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Open a conversation on a route, declaring the data classes it will carry."""

    route: str
    data_classes: list[str]
    # An identifier of the data subject (e.g. a patient or card holder id); stored encrypted,
    # with a keyed digest for retention and erasure requests.
    subject: str | None = None
    metadata: dict[str, Any] | None = None


class ConversationOut(msgspec.Struct):
    id: str
    route: str
    data_classes: list[str]
    subject: str | None
    metadata: dict[str, Any]
    policy_version: str
    turn_count: int
    step_count: int
    created_at: datetime
    updated_at: datetime


class TurnCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A turn's input: a string, a list of content blocks, or `user_input` / `function_result`
    steps."""

    input: str | list[dict[str, Any]] | dict[str, Any]


class StorageOut(msgspec.Struct):
    """Whether the provider was allowed to keep this turn (`store`), and why."""

    store: bool
    provider_storage: bool
    reason: str


class TurnOut(msgspec.Struct):
    conversation_id: str
    turn_id: str
    turn_number: int
    status: str  # completed | requires_action | failed
    # Why a turn failed (e.g. `model_failed`, `model_incomplete`); a failed turn stores nothing
    # and returns no steps.
    error_code: str | None
    steps: list[dict[str, Any]]
    output_text: str
    usage: dict[str, int]
    storage: StorageOut
    policy_version: str


class HistoryStep(msgspec.Struct):
    position: int
    turn_id: str
    step: dict[str, Any]


class HistoryOut(msgspec.Struct):
    conversation_id: str
    steps: list[HistoryStep]
    next_cursor: int | None


class AuditEventsOut(msgspec.Struct):
    chain: str
    events: list[dict[str, Any]]  # records as in schemas/audit-event.schema.json
    next_cursor: int | None


class AuditVerifyOut(msgspec.Struct):
    ok: bool
    chain: str
    checked: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None
    reason: str | None
    checkpoint_seq: int | None
