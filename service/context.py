"""What the domain code needs from the outside world, built once by the composition root."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from . import keyed_digests
from .audit import Auditor
from .auth_failures import AuthFailures
from .background import BackgroundTasks
from .clock import Clock
from .crypto import DataKeyCache, Keyring
from .drain import Drain
from .key_store import ExpiryKeyStore
from .metrics import Metrics
from .policy import Policy
from .turn_events import TurnEventLogs
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
    # The expiry keys (one per UTC day), in a database of their own: see service.key_store.
    expiry_keys: ExpiryKeyStore
    turn_lease_seconds: float = 10.0
    # See Settings: how long a finished turn keeps trying to store its reply while the database is
    # unreachable, and how long its caller waits for that.
    turn_store_retry_seconds: float = 300.0
    turn_store_wait_seconds: float = 10.0
    # A turn chains onto the provider's copy of its history only while that copy is younger than
    # this (and the route's provider_ttl); older, the whole history is replayed (see the claim).
    provider_chain_max_age_seconds: float = 43_200.0
    # The most a turn's model call may take in all (see Settings); a request may ask for less.
    turn_deadline_seconds: float = 180.0
    # Work that outlives its request: storing a reply, releasing a lease, renewing one.
    tasks: BackgroundTasks = field(default_factory=BackgroundTasks)
    # The pollers of background turns this replica follows (service/turns/_background.py): at
    # shutdown they are cancelled, not waited for; their leases run out and a replica resumes them.
    polls: BackgroundTasks = field(default_factory=BackgroundTasks)
    # How often a background turn's interaction is polled (one GET each time).
    background_poll_seconds: float = 2.0
    # The clock retention deadlines are compared with (the database's; tests move it forward).
    clock: Clock = field(default_factory=Clock)
    # This replica's failed-authentication limits and the summaries of failures it owes the log.
    auth_failures: AuthFailures = field(default_factory=AuthFailures)
    # Whether this replica is stopping, and its requests in flight (service/drain.py).
    drain: Drain = field(default_factory=Drain)
    # Data keys this replica unwrapped recently (bounded, with a TTL; see service/crypto/_key_cache.py).
    data_keys: DataKeyCache = field(default_factory=DataKeyCache)
    # The instruments (service/metrics.py); recording nothing unless the runtime gave real ones.
    metrics: Metrics = field(default_factory=Metrics.disabled)
    # The events of the streamed turns this replica runs, for their relays and for clients that
    # reconnect (service/turn_events.py).
    turn_events: TurnEventLogs = field(default_factory=TurnEventLogs)

    def subject_digest(self, tenant_id: str, subject: str) -> bytes:
        """A stable, keyed digest of a data subject's identifier, scoped to the tenant."""
        return keyed_digests.subject_digest(self.pepper, tenant_id, subject)
