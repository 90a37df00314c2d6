"""Audit appends on one chain, the append before and after it was cut down, side by side.

Run: .venv/bin/python ops/bench/audit_append.py [--appends 1200] [--rounds 3] [--writers 1,8,32]

Every append of a chain queues on the chain's head row, so a tenant's appends per second are
bounded by how long each one holds that row. Two appends are measured in the same run, on the same
fresh database of the local Postgres (BENCH_ADMIN_URL, default the test server's `postgres`
database; created, migrated with Alembic and dropped here):

  - before: the append as it was (kept below, as `before_append`): an INSERT ... ON CONFLICT DO
    NOTHING of the head row, the ORM's SELECT ... FOR UPDATE of it, then a unit-of-work flush
    adding the record and updating the head (two statements), then the commit: three statements
    and the commit under the lock;
  - after: the service's own append (service.audit._writer._append): one statement that locks the
    head, reads the clock, hashes the record, stores it and moves the head, then the commit.

W writers (1, 8, 32) append at once to one chain of their own, each append a transaction of its
own on a pooled connection of its own, like `Auditor.record`; `--appends` in all per measurement,
after a warm-up that prepares every statement on every connection. Rounds alternate which append
goes first. Per append: its latency (begin to commit, waiting for the lock included) and how long
it held the lock (from the locking statement's return to the end of the commit: for "after" that
leaves out the part of its one statement that runs once the lock is taken, a few microseconds of
the server's time). Appends/s is appends
over the measurement's wall time. Every chain is verified at the end. Writers and the database
share this machine's cores, so the figures compare the two appends; they are not a capacity.
Prints a table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC
from typing import Any

import asyncpg
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import Span
from sqlalchemy import event, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.audit import GENESIS, AuditEntry, RequestMeta, TrustedKeys, record_hash, verify_chain
from service.audit._writer import _append, _storable
from service.auth import Principal
from service.database import make_engine, make_sessions, migrate
from service.models import AuditChainHead, AuditEvent

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TRACER = TracerProvider().get_tracer("bench")
ACTOR = Principal(tenant_id="ten_" + "b" * 26, key_id="key_" + "c" * 16, role="backend")

Append = Callable[[AsyncSession, AuditEntry, Span, str, "str | None"], Awaitable[dict[str, Any]]]


# --- the append before (as of 3947ba4), kept whole to be measured beside the current one --------


async def before_append(
    session: AsyncSession, entry: AuditEntry, span: Span, outcome: str, reason: str | None
) -> dict[str, Any]:
    chain = entry.resolved_chain()
    head, recorded_at = await before_lock_head(session, chain)
    context = span.get_span_context()
    actor = entry.actor
    who: dict[str, Any] = {
        "tenant_id": actor.tenant_id if actor else None,
        "key_id": actor.key_id if actor else None,
        "role": actor.role if actor else None,
    }
    if entry.operator is not None:
        who["operator"] = entry.operator
    record: dict[str, Any] = {
        "seq": head.seq + 1,
        "chain": chain,
        "recorded_at": recorded_at,
        "action": entry.action,
        "outcome": outcome,
        "reason": reason,
        "actor": who,
        "resource": {"type": entry.resource_type, "id": entry.resource_id},
        "source": {
            "address": entry.meta.address if entry.meta else None,
            "request_id": entry.meta.request_id if entry.meta else None,
        },
        "data_classes": sorted(entry.data_classes),
        "policy_version": entry.policy_version,
        "trace_id": format(context.trace_id, "032x") if context.is_valid else None,
        "span_id": format(context.span_id, "016x") if context.is_valid else None,
        "details": dict(entry.details),
        "prev_hash": head.head_hash,
    }
    record = _storable(record)
    record["hash"] = record_hash(head.head_hash, record)
    session.add(AuditEvent(chain=chain, seq=record["seq"], record=record))
    head.seq, head.head_hash = record["seq"], record["hash"]
    await session.flush()
    span.set_attribute("custody.audit_seq", record["seq"])
    entry.written = record
    return record


async def before_lock_head(session: AsyncSession, chain: str) -> tuple[AuditChainHead, str]:
    await session.execute(
        insert(AuditChainHead)
        .values(chain=chain, seq=0, head_hash=GENESIS)
        .on_conflict_do_nothing(index_elements=["chain"])
    )
    row = (
        await session.execute(
            select(AuditChainHead, func.clock_timestamp())
            .where(AuditChainHead.chain == chain)
            .with_for_update(of=AuditChainHead)
            .execution_options(populate_existing=True)
        )
    ).one()
    head, clock = row
    return head, clock.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --- measuring --------------------------------------------------------------------------------

APPENDS: dict[str, Append] = {"before": before_append, "after": _append}


def stamp_locks(engine: AsyncEngine) -> None:
    """Note on each connection when its locking read of a chain head returned."""

    def returned(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if "FOR UPDATE" in statement:
            conn.info["locked_at"] = time.perf_counter()

    event.listen(engine.sync_engine, "after_cursor_execute", returned)


def entry_for(chain: str, writer: int, n: int) -> AuditEntry:
    """A record the size of a turn's."""
    return AuditEntry(
        "turn.create",
        ACTOR,
        meta=RequestMeta(address="127.0.0.1", request_id=f"req-{writer}-{n}"),
        resource_type="conversation",
        resource_id=f"conv_{writer:08x}{n:022x}",
        data_classes=["phi"],
        policy_version="policy-2026-11",
        details={"turn_id": f"turn_{n:026x}", "turn_number": n, "route": "patient-intake", "store": False},
        chain=chain,
    )


async def one_append(
    sessions: async_sessionmaker[AsyncSession], append: Append, entry: AuditEntry
) -> tuple[float, float]:
    """(latency, lock held) of one append in a transaction of its own, in seconds."""
    with TRACER.start_as_current_span("custody.turn.create") as span:
        started = time.perf_counter()
        async with sessions.begin() as session:
            await append(session, entry, span, "success", None)
            connection = await session.connection()
            locked_at: float = connection.info.pop("locked_at")
        ended = time.perf_counter()
    return ended - started, ended - locked_at


async def measure(
    sessions: async_sessionmaker[AsyncSession], append: Append, chain: str, writers: int, appends: int
) -> tuple[float, list[float], list[float]]:
    """(wall seconds, latencies, lock holds) of `appends` appends by `writers` writers at once."""
    each = [appends // writers + (1 if w < appends % writers else 0) for w in range(writers)]
    latencies: list[float] = []
    holds: list[float] = []

    async def writer(w: int) -> None:
        for n in range(each[w]):
            latency, held = await one_append(sessions, append, entry_for(chain, w, n))
            latencies.append(latency)
            holds.append(held)

    started = time.perf_counter()
    await asyncio.gather(*(writer(w) for w in range(writers)))
    return time.perf_counter() - started, latencies, holds


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def admin(sql: str) -> None:
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


async def run(appends: int, rounds: int, levels: list[int]) -> None:
    name = f"custody_bench_audit_{secrets.token_hex(4)}"
    await admin(f'CREATE DATABASE "{name}"')
    try:
        url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        await asyncio.to_thread(migrate, url)
        engine = make_engine(url, pool_size=max(levels), max_overflow=0)
        try:
            await bench(engine, appends, rounds, levels)
        finally:
            await engine.dispose()
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def bench(engine: AsyncEngine, appends: int, rounds: int, levels: list[int]) -> None:
    stamp_locks(engine)
    sessions = make_sessions(engine)
    chains: list[str] = []
    # Warm-up: every pooled connection opened, and every statement of both appends prepared on it.
    for label, append in APPENDS.items():
        chain = f"warm_{label}"
        chains.append(chain)
        await measure(sessions, append, chain, max(levels), max(levels) * 4)
    results: dict[tuple[str, int], tuple[float, list[float], list[float]]] = {}
    for round_number in range(rounds):
        order = list(APPENDS) if round_number % 2 == 0 else list(reversed(APPENDS))
        for writers in levels:
            for label in order:
                chain = f"{label}_{writers}_{round_number}"
                chains.append(chain)
                # The chain's head row exists before the clock starts, as for any tenant's chain.
                await measure(sessions, APPENDS[label], chain, 1, 1)
                wall, latencies, holds = await measure(sessions, APPENDS[label], chain, writers, appends)
                total_wall, all_latencies, all_holds = results.get((label, writers), (0.0, [], []))
                results[label, writers] = (total_wall + wall, all_latencies + latencies, all_holds + holds)
    async with sessions() as session:
        verdicts = [await verify_chain(session, chain, TrustedKeys()) for chain in chains]
    bad = [v for v in verdicts if not v.ok]

    print(f"audit appends on one chain: {appends} appends per measurement, {rounds} round(s); ms per append")
    print()
    print(
        "| writers | appends/s before | appends/s after | p50 before | p50 after | p99 before | p99 after | lock held p50 before | lock held p50 after |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for writers in levels:
        cells = [str(writers)]
        before, after = results["before", writers], results["after", writers]
        cells += [f"{len(before[1]) / before[0]:.0f}", f"{len(after[1]) / after[0]:.0f}"]
        for q in (0.5, 0.99):
            cells += [f"{percentile(before[1], q) * 1000:.2f}", f"{percentile(after[1], q) * 1000:.2f}"]
        cells += [f"{percentile(before[2], 0.5) * 1000:.2f}", f"{percentile(after[2], 0.5) * 1000:.2f}"]
        print("| " + " | ".join(cells) + " |")
    print()
    checked = sum(v.checked for v in verdicts)
    print(f"chains verified: {len(verdicts) - len(bad)} of {len(verdicts)} ({checked} records)")
    if bad:
        raise SystemExit(f"chains that did not verify: {bad}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--appends", type=int, default=1200, help="appends per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", default="1,8,32", help="comma-separated writer counts")
    args = parser.parse_args()
    levels = [int(w) for w in args.writers.split(",")]
    asyncio.run(run(args.appends, args.rounds, levels))


if __name__ == "__main__":
    main()
