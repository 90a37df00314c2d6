"""Conversations: lifecycle, listing, subject erasure, sealed history, retention deadlines, provider
copies and deletion receipts."""

from ._deadlines import interval, last_activity_deadline, recompute_deadlines, rule_values
from ._erasure import erase_subject
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
    check_deletable,
    delete_conversation,
    erase,
    erase_owned,
    open_conversation,
    owned_conversation,
    read_conversation,
    read_history,
)
from ._listing import ConversationPage, ConversationSummary, list_conversations
from ._provider_copies import delete_provider_copies
from ._receipts import (
    RECEIPT_FORMAT,
    Destroyed,
    Erased,
    Kept,
    OwedReceipt,
    holding,
    owing_receipt,
    receipt_valid,
    recover_receipt,
)

__all__ = [
    "RECEIPT_FORMAT",
    "ConversationCipher",
    "ConversationPage",
    "ConversationSummary",
    "ConversationView",
    "Deleted",
    "Destroyed",
    "Erased",
    "HistoryPage",
    "Kept",
    "OwedReceipt",
    "append_steps",
    "check_deletable",
    "create_cipher",
    "decode_json",
    "delete_conversation",
    "delete_provider_copies",
    "encode_json",
    "erase",
    "erase_owned",
    "erase_subject",
    "holding",
    "interval",
    "last_activity_deadline",
    "list_conversations",
    "load_cipher",
    "open_conversation",
    "owing_receipt",
    "owned_conversation",
    "read_conversation",
    "read_history",
    "read_steps",
    "receipt_valid",
    "recompute_deadlines",
    "recover_receipt",
    "rule_values",
    "shred_data_key",
]
