"""What the domain code needs from the outside world, built once by the composition root."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .audit import Auditor
from .keyring import Keyring
from .policy import Policy
from .upstream import Upstream

__all__ = ["ServiceContext"]


@dataclass(frozen=True)
class ServiceContext:
    sessions: async_sessionmaker[AsyncSession]
    keyring: Keyring
    policy: Policy
    upstream: Upstream
    auditor: Auditor
    # Keys the HMACs of API-key secrets and subject identifiers; kept outside the database.
    pepper: bytes
    turn_lease_seconds: float = 900.0

    def subject_digest(self, tenant_id: str, subject: str) -> bytes:
        """A stable, keyed digest of a data subject's identifier, scoped to the tenant."""
        message = b"subject\x00" + tenant_id.encode() + b"\x00" + subject.encode()
        return hmac.new(self.pepper, message, hashlib.sha256).digest()
