"""Conversations: their lifecycle (open, read, delete), their sealed history and the provider's copies."""

from ._history import (
    ConversationCipher,
    append_steps,
    create_cipher,
    decode_json,
    encode_json,
    load_cipher,
    read_steps,
    shred_data_key,
)
from ._lifecycle import (
    ConversationView,
    Deleted,
    HistoryPage,
    delete_conversation,
    open_conversation,
    owned_conversation,
    read_conversation,
    read_history,
)
from ._provider_copies import delete_provider_copies

__all__ = [
    "ConversationCipher",
    "ConversationView",
    "Deleted",
    "HistoryPage",
    "append_steps",
    "create_cipher",
    "decode_json",
    "delete_conversation",
    "delete_provider_copies",
    "encode_json",
    "load_cipher",
    "open_conversation",
    "owned_conversation",
    "read_conversation",
    "read_history",
    "read_steps",
    "shred_data_key",
]
