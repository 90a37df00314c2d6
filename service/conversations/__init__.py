"""Conversations: lifecycle, listing, subject erasure, sealed history, retention deadlines, provider
copies and deletion receipts."""

from ._data_keys import (
    DAY_LOCK_CLASS,
    align_data_keys,
    create_cipher,
    load_cipher,
    reseal,
    seal_day_for,
    unsealed,
    utc_day,
    utc_today,
)
from ._deadlines import interval, last_activity_deadline, recompute_deadlines, rule_values
from ._erasure import erase_subject
from ._history import (
    ConversationCipher,
    append_steps,
    decode_json,
    encode_json,
    read_steps,
    shred_data_key,
)
from ._lifecycle import (
    ConversationView,
    Deleted,
    Erased,
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
from ._receipts import RECEIPT_FORMAT, Destroyed, Kept, issue_receipt, receipt_valid

__all__ = [
    "DAY_LOCK_CLASS",
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
    "align_data_keys",
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
    "interval",
    "issue_receipt",
    "last_activity_deadline",
    "list_conversations",
    "load_cipher",
    "open_conversation",
    "owned_conversation",
    "read_conversation",
    "read_history",
    "read_steps",
    "receipt_valid",
    "recompute_deadlines",
    "reseal",
    "rule_values",
    "seal_day_for",
    "shred_data_key",
    "unsealed",
    "utc_day",
    "utc_today",
]
