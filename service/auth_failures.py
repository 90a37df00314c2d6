"""Failed authentications: rate limits per source and per key id, and bounded audit accounting."""

from __future__ import annotations

import asyncio
import ipaddress
import math
import time
from collections.abc import Callable, Sized
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .audit import SYSTEM_CHAIN, AuditEntry, Auditor, RequestMeta, utc_instant
from .auth import Principal

__all__ = ["AuthFailureLimits", "AuthFailures", "Verdict"]

# Reason codes of `auth.failure` records. With no real key named there is no tenant to tell.
UNAUTHENTICATED = "unauthenticated"


@dataclass(frozen=True)
class AuthFailureLimits:
    """How many failures a window admits, and how much this replica may track."""

    # Failed attempts one source address (an IPv6 /64) may make per window; after that every
    # attempt from it is answered 429, before any database work, until its window ends.
    per_source: int = 20
    # Failed attempts on one real key id (from any sources) per window; after that its wrong
    # secrets are answered 429, while its right secret still works (no lock-out by a stranger).
    per_key: int = 50
    window_seconds: float = 60.0
    # Entries in each limiter table; past it the oldest window is forgotten early.
    max_tracked: int = 10_000
    # Accounting windows with their own summary record; past it failures are summed into one
    # overflow window per chain and reason, so a spray of addresses cannot flood the log.
    max_summaries: int = 1_000

    def __post_init__(self) -> None:
        if min(self.per_source, self.per_key, self.max_tracked, self.max_summaries) < 1:
            raise ValueError("auth-failure limits must be at least 1")
        if not (0 < self.window_seconds < math.inf):
            raise ValueError("the auth-failure window must be a positive number of seconds")


@dataclass(frozen=True)
class Verdict:
    """What to do with one failed attempt that reached the database."""

    # The first failure of an accounting window is recorded at once, so an alert can fire.
    record_now: bool
    # Seconds for Retry-After when the attempt is answered 429 instead of 401.
    retry_after: int | None


@dataclass
class _Window:
    start: float
    count: int = 0


@dataclass
class _Tally:
    """The failures of one accounting window not yet recorded one by one."""

    chain: str
    address: str | None
    actor: Principal | None
    reason: str
    start: float
    end: float
    count: int = 0
    rate_limited: int = 0
    overflow: bool = False

    def entry(self) -> AuditEntry:
        details: dict[str, Any] = {
            "count": self.count,
            "window_start": _instant(self.start),
            "window_end": _instant(self.end),
            "rate_limited": self.rate_limited,
        }
        if self.overflow:
            details["overflow"] = True
        meta = RequestMeta(address=self.address, request_id=None) if self.address is not None else None
        return AuditEntry("auth.failure", self.actor, meta, details=details, chain=self.chain)


# (chain, address, real key id or None, reason)
_TallyKey = tuple[str, str | None, str | None, str]


class AuthFailures:
    """Per-replica, in-memory state of failed authentications; every method but `flush` is
    synchronous, so requests on one event loop never see it half-updated.

    Windows are fixed: one opens at a failure and lasts `window_seconds`. Since every window has
    the same length and tables keep insertion order, the oldest entry is always the first to
    expire, so expiry and eviction are cheap.
    """

    def __init__(self, limits: AuthFailureLimits | None = None, *, clock: Callable[[], float] = time.time) -> None:
        # Set once by the composition root from the settings, before the service takes requests.
        self.limits = limits or AuthFailureLimits()
        self._clock = clock
        self._sources: dict[str, _Window] = {}
        self._keys: dict[str, _Window] = {}
        self._tallies: dict[_TallyKey, _Tally] = {}
        # (address, real key id) -> its open tally, to charge refused attempts to the key's tenant.
        self._by_key: dict[tuple[str | None, str], _TallyKey] = {}
        # Closed windows waiting to be written.
        self._pending: list[_Tally] = []
        self._writing = asyncio.Lock()

    def tracked(self) -> int:
        """Entries held in memory, over all tables."""
        tables: tuple[Sized, ...] = (self._sources, self._keys, self._tallies, self._by_key, self._pending)
        return sum(len(table) for table in tables)

    def refused(self, address: str | None, claimed_key_id: str | None) -> int | None:
        """Before any database work: the Retry-After seconds when the source is over its limit
        (the attempt is then counted as rate limited), else None.

        `claimed_key_id` is client text: it only finds an open tally of a real key, and is
        never stored.
        """
        now = self._clock()
        self._expire(now)
        window = self._sources.get(_source(address))
        if window is None or window.count < self.limits.per_source:
            return None
        ident = self._by_key.get((address, claimed_key_id)) if claimed_key_id is not None else None
        tally = self._tallies.get(ident) if ident is not None else None
        if tally is None:
            tally, _ = self._tally(now, address, None, UNAUTHENTICATED)
        tally.count += 1
        tally.rate_limited += 1
        return self._remaining(window, now)

    def failed(self, address: str | None, key: Principal | None, reason: str) -> Verdict:
        """After the database said no: count the failure against its source and (for a real
        key, `key`) its key id; say whether to record it now and whether to answer 429."""
        now = self._clock()
        self._expire(now)
        self._window(self._sources, _source(address), now).count += 1
        retry_after = None
        if key is not None:
            window = self._window(self._keys, key.key_id, now)
            if window.count >= self.limits.per_key:
                retry_after = self._remaining(window, now)
            window.count += 1
        tally, opened = self._tally(now, address, key, reason)
        if opened:
            return Verdict(record_now=True, retry_after=retry_after)
        tally.count += 1
        if retry_after is not None:
            tally.rate_limited += 1
        return Verdict(record_now=False, retry_after=retry_after)

    def unrecorded(self, address: str | None, key: Principal | None, reason: str, *, rate_limited: bool) -> None:
        """A failure whose own record could not be written: count it in its window's summary."""
        tally, _ = self._tally(self._clock(), address, key, reason)
        tally.count += 1
        tally.rate_limited += int(rate_limited)

    async def flush(
        self,
        auditor: Auditor,
        sessions: async_sessionmaker[AsyncSession],
        now: float | None = None,
        *,
        final: bool = False,
    ) -> int:
        """Write one summary record per closed window (every window when `final`, at shutdown);
        returns how many were written. A summary that fails to write stays for the next flush."""
        now = self._clock() if now is None else now
        self._expire(now)
        if final:
            for tally in self._tallies.values():
                tally.end = min(tally.end, now)
                if tally.count:
                    self._park(tally)
            self._tallies.clear()
            self._by_key.clear()
        written = 0
        async with self._writing:
            while self._pending:
                tally = self._pending.pop(0)
                try:
                    await auditor.record(sessions, tally.entry(), outcome="denied", reason=tally.reason)
                except BaseException:
                    # Cancelled or failed: it is written by a later flush (or the final one).
                    self._pending.insert(0, tally)
                    raise
                written += 1
        return written

    def pending(self) -> int:
        """Summaries waiting to be written (closed windows)."""
        return len(self._pending)

    # --- internals -------------------------------------------------------------------------

    def _remaining(self, window: _Window, now: float) -> int:
        return max(1, math.ceil(window.start + self.limits.window_seconds - now))

    def _window(self, table: dict[str, _Window], ident: str, now: float) -> _Window:
        window = table.get(ident)
        if window is None:
            if len(table) >= self.limits.max_tracked:
                # Forget the window nearest its end: the least a spray of addresses can buy.
                del table[next(iter(table))]
            window = table[ident] = _Window(start=now)
        return window

    def _tally(self, now: float, address: str | None, key: Principal | None, reason: str) -> tuple[_Tally, bool]:
        """The open tally for this failure, and whether it was opened just now."""
        chain = key.tenant_id if key is not None else SYSTEM_CHAIN
        ident: _TallyKey = (chain, address, key.key_id if key is not None else None, reason)
        tally = self._tallies.get(ident)
        if tally is not None:
            return tally, False
        end = now + self.limits.window_seconds
        if len(self._tallies) >= self.limits.max_summaries:
            ident = (chain, None, None, reason)
            tally = self._tallies.get(ident)
            if tally is not None:
                return tally, False
            tally = _Tally(chain, None, None, reason, now, end, overflow=True)
        else:
            tally = _Tally(chain, address, key, reason, now, end)
            if key is not None:
                self._by_key[(address, key.key_id)] = ident
        self._tallies[ident] = tally
        return tally, True

    def _expire(self, now: float) -> None:
        horizon = now - self.limits.window_seconds
        for table in (self._sources, self._keys):
            while table and table[first := next(iter(table))].start <= horizon:
                del table[first]
        while self._tallies:
            ident = next(iter(self._tallies))
            tally = self._tallies[ident]
            if tally.end > now:
                break
            del self._tallies[ident]
            if tally.actor is not None and self._by_key.get((tally.address, tally.actor.key_id)) == ident:
                del self._by_key[(tally.address, tally.actor.key_id)]
            if tally.count:
                self._park(tally)

    def _park(self, tally: _Tally) -> None:
        """Queue a closed window for writing; while the queue is full (the database is down),
        fold it into an overflow summary of its chain and reason, so memory stays bounded."""
        if len(self._pending) < self.limits.max_summaries:
            self._pending.append(tally)
            return
        for queued in self._pending:
            if queued.overflow and (queued.chain, queued.reason) == (tally.chain, tally.reason):
                queued.count += tally.count
                queued.rate_limited += tally.rate_limited
                queued.start, queued.end = min(queued.start, tally.start), max(queued.end, tally.end)
                return
        self._pending.append(
            _Tally(
                tally.chain,
                None,
                None,
                tally.reason,
                tally.start,
                tally.end,
                tally.count,
                tally.rate_limited,
                overflow=True,
            )
        )


def _source(address: str | None) -> str:
    """The unit a source limit applies to: the address, or its /64 for IPv6 (one host's share)."""
    if address is None:
        return ""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _instant(seconds: float) -> str:
    return utc_instant(datetime.fromtimestamp(seconds, UTC))
