"""Concurrent appends keep every chain gapless, ordered and verifiable, from its first record on;
and an append holds its chain's head lock for two statements only."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from service.audit import (
    AuditEntry,
    Auditor,
    AuditSigner,
    ExportRange,
    TrustedKeys,
    export_header,
    record_hash,
    sign_checkpoint,
    verify_chain,
)
from service.audit._writer import ChainHeadMoved, advance_head, lock_head
from service.database import make_engine, make_sessions
from service.models import AuditChainHead, Tenant

from .turns.support import wait_until

AUDITOR = Auditor(TracerProvider().get_tracer("test"))
WRITERS = 8
RECORDS_EACH = 25


def chain_name(unique: str, label: str) -> str:
    return f"ten_{label}_{unique}"


async def write_many(sessions: async_sessionmaker[AsyncSession], writer: int, chain: str, count: int) -> None:
    """`count` records, one transaction (and pooled connection) each, as `Auditor.record` writes them."""
    for n in range(count):
        await AUDITOR.record(sessions, AuditEntry("history.read", None, chain=chain, details={"w": writer, "n": n}))


async def assert_whole(engine: AsyncEngine, chain: str, expected: set[tuple[int, int]]) -> None:
    """The chain verifies, holds seq 1..N with no gap, each expected record exactly once, and its
    times never go back."""
    sessions = make_sessions(engine)
    async with sessions() as session:
        verdict = await verify_chain(session, chain, TrustedKeys())
        rows = (
            await session.execute(
                text("SELECT seq, record FROM audit_events WHERE chain = :c ORDER BY seq"), {"c": chain}
            )
        ).all()
    assert verdict.ok, verdict
    assert verdict.checked == len(expected)
    assert [seq for seq, _ in rows] == list(range(1, len(expected) + 1))
    assert [record["seq"] for _, record in rows] == list(range(1, len(expected) + 1))
    assert {(record["details"]["w"], record["details"]["n"]) for _, record in rows} == expected
    times = [record["recorded_at"] for _, record in rows]
    assert times == sorted(times)


@pytest.mark.parametrize("chains", [1, 2])
async def test_concurrent_writers_keep_their_chains_gapless(engine: AsyncEngine, unique: str, chains: int) -> None:
    """Eight writers of 25 records each, on their own connections and all at once, on one chain or
    spread over two (each chain new, so its first record is contended too), leave every chain
    gapless, in time order and verifiable."""
    sessions = make_sessions(engine)
    names = [chain_name(unique, f"c{chains}{k}") for k in range(chains)]
    await asyncio.gather(*(write_many(sessions, w, names[w % chains], RECORDS_EACH) for w in range(WRITERS)))
    for k, chain in enumerate(names):
        expected = {(w, n) for w in range(WRITERS) if w % chains == k for n in range(RECORDS_EACH)}
        await assert_whole(engine, chain, expected)


async def waiting_on_a_new_head(engine: AsyncEngine) -> int:
    """Sessions of this database waiting to create a chain head row that another transaction has
    created and not yet committed."""
    async with engine.connect() as connection:
        return int(
            await connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO audit_chain_heads%'"
                )
            )
            or 0
        )


@pytest.mark.parametrize("first_commits", [True, False])
async def test_a_chains_first_record_written_concurrently_is_gapless(
    engine: AsyncEngine, unique: str, first_commits: bool
) -> None:
    """While one transaction has created a new chain's head row and its first record but not yet
    committed, seven other writers of that chain all find no head row and wait on the new one;
    once the first commits (or rolls back, leaving the chain empty again) they all append, and the
    chain is gapless and verifies."""
    sessions = make_sessions(engine)
    chain = chain_name(unique, "first" if first_commits else "undone")
    others = WRITERS - 1
    async with sessions() as session:
        transaction = await session.begin()
        await AUDITOR.append(session, AuditEntry("history.read", None, chain=chain, details={"w": 0, "n": 0}))
        racing = [asyncio.create_task(write_many(sessions, w, chain, 1)) for w in range(1, WRITERS)]
        await wait_until(
            lambda: _all_waiting(engine, others), what=f"{others} writers wait on the chain's new head row"
        )
        if first_commits:
            await transaction.commit()
        else:
            await transaction.rollback()
    await asyncio.gather(*racing)
    expected = {(w, 0) for w in range(0 if first_commits else 1, WRITERS)}
    await assert_whole(engine, chain, expected)


async def _all_waiting(engine: AsyncEngine, count: int) -> bool:
    return await waiting_on_a_new_head(engine) >= count


@contextmanager
def statements_sent(engine: AsyncEngine) -> Iterator[list[str]]:
    """Every statement the engine sends to the database meanwhile."""
    sent: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        sent.append(" ".join(statement.split()))

    event.listen(engine.sync_engine, "before_cursor_execute", seen)
    try:
        yield sent
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", seen)


async def test_an_append_is_one_statement(engine: AsyncEngine, unique: str) -> None:
    """On a chain that has a head, an append sends one statement: it locks the head, reads the
    clock, hashes the record in the database and stores it while moving the head (the commit
    follows), and the hash is the one `record_hash` computes. A chain's first record falls back
    to making its head row first. An action's own pending writes go out before the lock is
    taken, not while it is held."""
    sessions = make_sessions(engine)
    chain = chain_name(unique, "stmts")
    with statements_sent(engine) as first:
        await AUDITOR.record(sessions, AuditEntry("history.read", None, chain=chain))
    with statements_sent(engine) as next_one:
        written = await AUDITOR.record(
            sessions,
            AuditEntry(
                "history.read",
                None,
                chain=chain,
                details={"note": 'é "prev_hash":"\\u0000P" \x00S', "prev_hash": "\x00P"},
            ),
        )
    with statements_sent(engine) as in_action:
        async with AUDITOR.action(sessions, AuditEntry("tenant.create", None, chain=chain)) as (session, _):
            session.add(Tenant(id=f"ten_stmts_{unique}", name=f"statements {unique}"))
    (append,) = next_one
    assert append.lstrip().startswith("WITH head AS")
    assert "FOR UPDATE" in append
    assert "INSERT INTO audit_events" in append
    assert written["seq"] == 2
    assert written["hash"] == record_hash(written["prev_hash"], written)
    assert len(first) == 4  # the one-statement append finds no head, then lock, create, advance
    assert first[0] == append
    assert first[2].startswith("INSERT INTO audit_chain_heads")
    assert "ON CONFLICT (chain) DO NOTHING" in first[2]
    assert len(in_action) == 2
    assert in_action[0].startswith("INSERT INTO tenants")
    assert in_action[1] == append
    async with engine.connect() as connection:
        stored = (
            (
                await connection.execute(
                    text("SELECT record FROM audit_events WHERE chain = :c ORDER BY seq"), {"c": chain}
                )
            )
            .scalars()
            .all()
        )
    assert [record["seq"] for record in stored] == [1, 2, 3]
    assert all(record["hash"] == record_hash(record["prev_hash"], record) for record in stored)


async def test_a_head_that_moved_under_the_lock_stores_nothing(engine: AsyncEngine, unique: str) -> None:
    """If the head is not where the locked read left it (which the lock rules out), the insert
    that moves it stores nothing and the append fails loudly instead of forking the chain."""
    sessions = make_sessions(engine)
    chain = chain_name(unique, "moved")
    await AUDITOR.record(sessions, AuditEntry("history.read", None, chain=chain))
    async with sessions() as session, session.begin():
        head = await lock_head(session, chain)
        assert head.seq == 1
        # Only this transaction can move the locked row: it does, behind the writer's back.
        await session.execute(text("UPDATE audit_chain_heads SET seq = 2 WHERE chain = :c"), {"c": chain})
        record = {"seq": 2, "chain": chain, "prev_hash": head.head_hash, "hash": "f" * 64}
        with pytest.raises(ChainHeadMoved):
            await advance_head(session, head, record)
        stored = await session.scalar(text("SELECT count(*) FROM audit_events WHERE chain = :c"), {"c": chain})
        assert stored == 1
        await session.rollback()


async def test_no_chain_head_object_stays_in_the_session(
    engine: AsyncEngine, unique: str, signing_key_path: Path
) -> None:
    """Verifying, exporting, signing and appending in one session leave no mapped chain head in
    its identity map, so no later flush can write an old head back."""
    sessions = make_sessions(engine)
    chain = chain_name(unique, "stale")
    # The session's signing key: other tests verify every chain of the shared database with it.
    signer, _ = AuditSigner.load_or_generate(signing_key_path)
    await AUDITOR.record(sessions, AuditEntry("history.read", None, chain=chain))
    async with sessions.begin() as session:
        await verify_chain(session, chain, TrustedKeys.of(signer.public_key))
        await export_header(session, ExportRange(chain, None, None, 1, 1), signer)
        await sign_checkpoint(session, signer, chain)
        await AUDITOR.append(session, AuditEntry("audit.verify", None, chain=chain))
        held = [o for o in session.identity_map.values() if isinstance(o, AuditChainHead)]
        assert held == []
    async with sessions() as session:
        verdict = await verify_chain(session, chain, TrustedKeys.of(signer.public_key))
    assert verdict.ok, verdict
    assert verdict.checked == 2


async def test_the_service_role_can_append(database_url: str, engine: AsyncEngine, unique: str) -> None:
    """A login role in custody_app (the role the service runs as, which may only read and insert
    audit records and read and update chain heads) appends a chain's first and later records."""
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute("""DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'custody_test_service') THEN
                CREATE ROLE custody_test_service LOGIN IN ROLE custody_app;
            END IF; END $$""")
    finally:
        await admin.close()
    service = make_engine(database_url.replace("postgres@", "custody_test_service@"))
    try:
        sessions = make_sessions(service)
        chain = chain_name(unique, "role")
        for n in range(3):
            await write_many(sessions, n, chain, 1)
        async with sessions() as session:
            user = await session.scalar(text("SELECT current_user"))
    finally:
        await service.dispose()
    assert user == "custody_test_service"
    await assert_whole(engine, chain, {(n, 0) for n in range(3)})
