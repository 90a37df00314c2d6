"""Rotating the audit signing key: the handover recorded in every chain and signed there."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from ._chain import AuditSigner, Checkpoint
from ._checkpoints import CHECKPOINT_LOCK, checkpoint_entry, sign_checkpoint
from ._queries import chains
from ._writer import SYSTEM_CHAIN, AuditEntry, Auditor

__all__ = ["SigningKeyRotation", "rotate_signing_key"]


@dataclass(frozen=True)
class SigningKeyRotation:
    """What `rotate_signing_key` did: the keys, and the checkpoint it signed in each chain."""

    old_key_id: str
    new_key_id: str
    trusted_until: str | None  # the old key's limit, for a compromised key; None otherwise
    checkpoints: list[Checkpoint]

    @property
    def signed_with(self) -> str:
        """The key the handover's checkpoints are signed with."""
        return self.new_key_id if self.trusted_until is not None else self.old_key_id


async def rotate_signing_key(
    auditor: Auditor,
    sessions: async_sessionmaker[AsyncSession],
    new_signer: AuditSigner,
    *,
    trusted_until: str | None,
    operator: str | None,
) -> SigningKeyRotation:
    """Record the handover from the auditor's signing key to `new_signer` in every chain, each
    record followed by a checkpoint over it.

    The checkpoint is the old key's last word on the chain: it covers every record up to and
    including the handover, so whoever checks the chain later sees where one key's checkpoints end
    and the next's begin. When the old key is compromised (`trusted_until` set: nothing it signs
    after that is believed), the new key signs it instead, since the stolen key's signature would
    prove nothing its thief could not also produce.

    Nothing here touches the key files: the caller has written the old public key into the
    retired set, and the replicas take the new key at their next start. One chain at a time, each
    in its own transaction, under the checkpoint signers' lock (waited for, not tried: every chain
    must get its handover). Running it again records a second handover; nothing is lost.
    """
    old = auditor.signer
    if old is None:
        raise ValueError("rotating the audit signing key needs the key in use (CUSTODY_AUDIT_SIGNING_KEY)")
    signer = new_signer if trusted_until is not None else old
    async with sessions() as session:
        names = list(await chains(session))
    if SYSTEM_CHAIN not in names:
        names.append(SYSTEM_CHAIN)
    signed: list[Checkpoint] = []
    for chain in names:
        async with sessions.begin() as session:
            await session.execute(select(func.pg_advisory_xact_lock(CHECKPOINT_LOCK)))
            await auditor.append(
                session,
                AuditEntry(
                    "audit.signing_key_rotate",
                    None,
                    resource_type="audit_log",
                    resource_id=chain,
                    chain=chain,
                    details={
                        "old_key_id": old.key_id,
                        "new_key_id": new_signer.key_id,
                        "compromised": trusted_until is not None,
                        "old_key_trusted_until": trusted_until,
                        "handover_signed_with": signer.key_id,
                    },
                    operator=operator,
                ),
            )
            checkpoint = await sign_checkpoint(session, signer, chain)
            if checkpoint is None:  # the chain holds the handover record now: never empty
                raise RuntimeError(f"the audit chain {chain} is empty after its handover record")
            await auditor.append(session, checkpoint_entry(checkpoint, operator=operator))
            signed.append(checkpoint)
    return SigningKeyRotation(old.key_id, new_signer.key_id, trusted_until, signed)
