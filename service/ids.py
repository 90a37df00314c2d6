"""Custody's identifiers: how they are made, and the one shape every one of them has."""

from __future__ import annotations

import re
import secrets

__all__ = [
    "ID_PATTERN",
    "audited_conversation_id",
    "has_id_shape",
    "id_pattern",
    "is_conversation_id",
    "is_id_of",
    "new_id",
]

# `<prefix>_<30 hex>`: 120 bits of entropy. API key ids are shorter (`key_<16 hex>`), which
# the generic shape admits too. ID_PATTERN is the same shape anchored, for JSON Schema documents
# (whose `pattern` searches rather than matches).
_ID = re.compile(r"[a-z]{2,8}_[0-9a-f]{16,40}")
ID_PATTERN = f"^{_ID.pattern}$"
_CONVERSATION_ID = re.compile(r"conv_[0-9a-f]{30}")


def new_id(prefix: str) -> str:
    """A random, URL-safe identifier such as `conv_3k9…`; 120 bits of entropy."""
    return f"{prefix}_{secrets.token_hex(15)}"


def has_id_shape(value: str) -> bool:
    """Whether `value` looks like one of Custody's ids (a key, conversation, turn or tenant id).

    `fullmatch`, never `match` with `$`, which also accepts a trailing newline.
    """
    return _ID.fullmatch(value) is not None


def is_conversation_id(value: str) -> bool:
    """Whether `value` has a conversation id's shape; anything else cannot name a conversation,
    so it is refused before any query (a NUL byte, for one, makes Postgres fail the statement)."""
    return _CONVERSATION_ID.fullmatch(value) is not None


def is_id_of(prefix: str, value: str) -> bool:
    """Whether `value` has the shape `new_id(prefix)` gives (`hold_…`, `run_…`): anything else
    names nothing of that kind, so it is refused before any query."""
    return re.fullmatch(f"{re.escape(prefix)}_[0-9a-f]{{30}}", value) is not None


def id_pattern(prefix: str) -> str:
    """The anchored JSON Schema pattern of the ids `new_id(prefix)` makes, for documents."""
    return f"^{prefix}_[0-9a-f]{{30}}$"


def audited_conversation_id(value: str) -> str | None:
    """A conversation id from a request path, for an audit record, only when it has our id
    shape: a path holds whatever the caller typed, and audit records never hold content."""
    return value if is_conversation_id(value) else None
