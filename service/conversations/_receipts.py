"""Deletion receipts: what was destroyed, when, and where it is on record, signed with the audit key.

A receipt is proof a backend (or an auditor, or a data subject's lawyer) can keep and check
offline: for each conversation, its id, how many steps it held, the KEK version its data key was
wrapped under, when its data key was destroyed, which copies the provider held were deleted and
which are still pending, and the seqs of the audit records of all of it. The audit signing key
(Ed25519, never in the database) signs the receipt's RFC 8785 form; `custody receipts verify`
checks one against the public key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from sqlalchemy.ext.asyncio import AsyncSession

from ..audit import AuditSigner, attestation_valid, iso_now
from ..ids import new_id
from ..models import DeletionReceipt

__all__ = ["RECEIPT_FORMAT", "Destroyed", "Kept", "issue_receipt", "receipt_valid"]

RECEIPT_FORMAT = "custody-deletion-receipt-v1"


@dataclass(frozen=True)
class Destroyed:
    """One conversation destroyed: its data key first, then its rows, then the provider's copies."""

    conversation_id: str
    step_count: int
    data_key_version: int | None  # the KEK version its data key was wrapped under
    destroyed_at: str
    provider_copies_deleted: list[str] = field(default_factory=list)
    provider_copies_pending: list[str] = field(default_factory=list)
    audit_seqs: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Kept:
    """A conversation a request asked to erase that had to stay, and why."""

    conversation_id: str
    reason: str  # legal_hold | minimum_retention | turn_in_progress
    hold_id: str | None = None
    deletable_from: str | None = None


async def issue_receipt(
    session: AsyncSession,
    signer: AuditSigner | None,
    *,
    tenant_id: str,
    chain: str,
    cause: str,
    destroyed: Iterable[Destroyed],
    kept: Iterable[Kept] = (),
) -> dict[str, Any]:
    """Sign a receipt and keep it (in the caller's transaction); returns the signed document."""
    if signer is None:
        raise RuntimeError("deletion receipts need the audit signing key")
    receipt_id = new_id("rcpt")
    payload = {
        "format": RECEIPT_FORMAT,
        "receipt_id": receipt_id,
        "tenant_id": tenant_id,
        "audit_chain": chain,
        "cause": cause,
        "issued_at": iso_now(),
        "destroyed": [asdict(d) for d in destroyed],
        "kept": [asdict(k) for k in kept],
    }
    document = signer.sign_payload(payload) | {"public_key": signer.public_pem()}
    session.add(DeletionReceipt(id=receipt_id, tenant_id=tenant_id, receipt=document))
    await session.flush()
    return document


def receipt_valid(document: Any, public_key: Ed25519PublicKey) -> bool:
    """Whether `document` is a receipt signed by `public_key`, unaltered."""
    if not isinstance(document, dict) or not isinstance(document.get("payload"), dict):
        return False
    if document["payload"].get("format") != RECEIPT_FORMAT:
        return False
    # The signature covers the payload as it was signed: a re-encoded file (keys reordered,
    # spacing changed) still verifies, any changed value does not.
    return bool(attestation_valid(json.loads(json.dumps(document)), public_key))
