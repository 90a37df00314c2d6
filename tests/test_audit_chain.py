"""Tampering with stored audit rows is detected, and the first bad record is named."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from service.audit import (
    AuditEntry,
    Auditor,
    AuditSigner,
    ChainVerdict,
    TrustedKeys,
    record_hash,
    sign_checkpoint,
    verify_chain,
)
from service.auth import Principal
from service.database import make_engine, make_sessions

from .conftest import migrated_database

CHAIN = "ten_" + "a" * 30
RECORDS = 30
CHECKPOINT_AT = 20

# The one writer, with a tracer of its own (not the global one).
AUDITOR = Auditor(TracerProvider().get_tracer("test"))


@pytest.fixture(scope="module")
async def lab(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[AsyncEngine, AuditSigner]]:
    """A database of its own holding one 30-record chain with a signed checkpoint at seq 20."""
    async with migrated_database("custody_audit_lab") as url:
        engine = make_engine(url)
        signer, _ = AuditSigner.load_or_generate(tmp_path_factory.mktemp("lab") / "key.pem")
        actor = Principal(tenant_id=CHAIN, key_id="key_" + "b" * 16, role="backend")
        sessions = make_sessions(engine)
        for index in range(RECORDS):
            async with sessions.begin() as session:
                await AUDITOR.append(
                    session,
                    AuditEntry(
                        "conversation.read",
                        actor,
                        resource_type="conversation",
                        resource_id=f"conv_{index:030x}",
                        data_classes=["phi"],
                        details={"n": index},
                    ),
                )
                if index + 1 == CHECKPOINT_AT:
                    await sign_checkpoint(session, signer, CHAIN)
        try:
            yield engine, signer
        finally:
            await engine.dispose()


async def tampered(
    lab: tuple[AsyncEngine, AuditSigner], change: Callable[[AsyncConnection], Awaitable[None]]
) -> ChainVerdict:
    """Apply `change` with the append-only triggers off, verify, then roll everything back."""
    engine, signer = lab
    async with engine.connect() as connection:
        transaction = await connection.begin()
        try:
            for table in ("audit_events", "audit_checkpoints"):
                await connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            await change(connection)
            return await verify_chain(AsyncSession(bind=connection), CHAIN, TrustedKeys.of(signer.public_key))
        finally:
            await transaction.rollback()


async def records(connection: AsyncConnection) -> dict[int, dict[str, Any]]:
    rows = (await connection.execute(text("SELECT seq, record FROM audit_events WHERE chain = :c"), {"c": CHAIN})).all()
    return {int(seq): dict(record) for seq, record in rows}


async def put(connection: AsyncConnection, seq: int, record: dict[str, Any]) -> None:
    await connection.execute(
        text("UPDATE audit_events SET record = CAST(:r AS jsonb) WHERE chain = :c AND seq = :s"),
        {"r": json.dumps(record), "c": CHAIN, "s": seq},
    )


async def test_untouched_chain_verifies(lab: tuple[AsyncEngine, AuditSigner]) -> None:
    """The control: the intact chain and its checkpoint verify."""

    async def nothing(connection: AsyncConnection) -> None:
        return None

    verdict = await tampered(lab, nothing)
    assert verdict.ok
    assert verdict.checked == RECORDS
    assert verdict.checkpoint_seq == CHECKPOINT_AT


def _leaves(value: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    if isinstance(value, dict) and value:
        return [leaf for key, item in value.items() for leaf in _leaves(item, (*path, key))]
    return [path]


def _edited(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return ("1" if value[0] != "1" else "2") + value[1:]
    if value is None:
        return "x"
    return value + "x" if isinstance(value, str) else [*value, "x"]


@pytest.mark.parametrize("trial", range(24))
async def test_random_single_field_edits_are_detected(lab: tuple[AsyncEngine, AuditSigner], trial: int) -> None:
    """Changing any one field of any one record makes verification fail at exactly that record."""
    rng = random.Random(trial)
    seq = rng.randint(1, RECORDS)

    async def edit(connection: AsyncConnection) -> None:
        record = (await records(connection))[seq]
        path = rng.choice(_leaves(record))
        target = record
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = _edited(target[path[-1]])
        await put(connection, seq, record)

    verdict = await tampered(lab, edit)
    assert not verdict.ok, verdict
    assert verdict.first_bad == seq, verdict


@pytest.mark.parametrize("seq", [1, 7, RECORDS])
async def test_deletions_are_detected(lab: tuple[AsyncEngine, AuditSigner], seq: int) -> None:
    """Deleting a record, first, middle or last, is detected at that record."""

    async def drop(connection: AsyncConnection) -> None:
        await connection.execute(text("DELETE FROM audit_events WHERE chain = :c AND seq = :s"), {"c": CHAIN, "s": seq})

    verdict = await tampered(lab, drop)
    assert not verdict.ok, verdict
    assert verdict.first_bad == seq, verdict


async def test_insertion_in_the_middle_is_detected(lab: tuple[AsyncEngine, AuditSigner]) -> None:
    """A well-formed forged record slipped in at seq 10 (later records shifted) is detected right after it."""

    async def insert(connection: AsyncConnection) -> None:
        existing = await records(connection)
        await connection.execute(
            text("UPDATE audit_events SET seq = seq + 1000 WHERE chain = :c AND seq >= 10"), {"c": CHAIN}
        )
        await connection.execute(
            text("UPDATE audit_events SET seq = seq - 999 WHERE chain = :c AND seq >= 1000"), {"c": CHAIN}
        )
        forged = dict(existing[10]) | {"details": {"n": "forged"}, "prev_hash": existing[9]["hash"]}
        forged["hash"] = record_hash(forged["prev_hash"], forged)
        await connection.execute(
            text("INSERT INTO audit_events (chain, seq, record) VALUES (:c, 10, CAST(:r AS jsonb))"),
            {"c": CHAIN, "r": json.dumps(forged)},
        )

    verdict = await tampered(lab, insert)
    assert not verdict.ok, verdict
    assert verdict.first_bad == 11, verdict


async def test_appended_record_beyond_the_head_is_detected(lab: tuple[AsyncEngine, AuditSigner]) -> None:
    """A well-formed record appended without moving the chain head is named as the first bad record."""

    async def add(connection: AsyncConnection) -> None:
        last = (await records(connection))[RECORDS]
        forged = dict(last) | {"seq": RECORDS + 1, "prev_hash": last["hash"]}
        forged["hash"] = record_hash(forged["prev_hash"], forged)
        await connection.execute(
            text("INSERT INTO audit_events (chain, seq, record) VALUES (:c, :s, CAST(:r AS jsonb))"),
            {"c": CHAIN, "s": RECORDS + 1, "r": json.dumps(forged)},
        )

    verdict = await tampered(lab, add)
    assert not verdict.ok, verdict
    assert verdict.first_bad == RECORDS + 1, verdict


@pytest.mark.parametrize(("first", "second"), [(3, 4), (5, 25), (1, RECORDS)])
async def test_swaps_are_detected(lab: tuple[AsyncEngine, AuditSigner], first: int, second: int) -> None:
    """Swapping two records' places is detected at the earlier one."""

    async def swap(connection: AsyncConnection) -> None:
        existing = await records(connection)
        await put(connection, first, existing[second])
        await put(connection, second, existing[first])

    verdict = await tampered(lab, swap)
    assert not verdict.ok, verdict
    assert verdict.first_bad == first, verdict


async def test_rewritten_chain_is_caught_by_the_signed_checkpoint(lab: tuple[AsyncEngine, AuditSigner]) -> None:
    """Editing record 5 and recomputing every later hash and the head is caught by the checkpoint at seq 20."""

    async def rewrite(connection: AsyncConnection) -> None:
        existing = await records(connection)
        prev = existing[4]["hash"]
        for seq in range(5, RECORDS + 1):
            record = dict(existing[seq]) | {"prev_hash": prev}
            if seq == 5:
                record["details"] = {"n": "rewritten"}
            record["hash"] = prev = record_hash(prev, record)
            await put(connection, seq, record)
        await connection.execute(
            text("UPDATE audit_chain_heads SET head_hash = :h WHERE chain = :c"), {"h": prev, "c": CHAIN}
        )

    verdict = await tampered(lab, rewrite)
    assert not verdict.ok, verdict
    assert verdict.first_bad == CHECKPOINT_AT, verdict
    assert "checkpoint" in (verdict.reason or ""), verdict


async def test_records_cut_from_the_end_are_caught_by_a_later_checkpoint(lab: tuple[AsyncEngine, AuditSigner]) -> None:
    """Deleting the last records and moving the head back is caught: a signed checkpoint lies beyond the new head."""

    async def cut(connection: AsyncConnection) -> None:
        existing = await records(connection)
        await connection.execute(text("DELETE FROM audit_events WHERE chain = :c AND seq > 15"), {"c": CHAIN})
        await connection.execute(
            text("UPDATE audit_chain_heads SET seq = 15, head_hash = :h WHERE chain = :c"),
            {"h": existing[15]["hash"], "c": CHAIN},
        )

    verdict = await tampered(lab, cut)
    assert not verdict.ok, verdict
    assert verdict.first_bad == 16, verdict


async def test_external_checkpoint_copy_catches_a_deleted_checkpoint(lab: tuple[AsyncEngine, AuditSigner]) -> None:
    """With the checkpoint rows deleted too, a copy of the checkpoint kept outside the database still catches the cut."""
    engine, signer = lab
    async with engine.connect() as connection:
        from service.audit import read_checkpoints

        kept_outside = await read_checkpoints(AsyncSession(bind=connection), CHAIN)
    assert kept_outside

    async with engine.connect() as connection:
        transaction = await connection.begin()
        try:
            for table in ("audit_events", "audit_checkpoints"):
                await connection.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
            existing = await records(connection)
            await connection.execute(text("DELETE FROM audit_checkpoints WHERE chain = :c"), {"c": CHAIN})
            await connection.execute(text("DELETE FROM audit_events WHERE chain = :c AND seq > 15"), {"c": CHAIN})
            await connection.execute(
                text("UPDATE audit_chain_heads SET seq = 15, head_hash = :h WHERE chain = :c"),
                {"h": existing[15]["hash"], "c": CHAIN},
            )
            session = AsyncSession(bind=connection)
            inside_only = await verify_chain(session, CHAIN, TrustedKeys.of(signer.public_key))
            with_copy = await verify_chain(
                session, CHAIN, TrustedKeys.of(signer.public_key), extra_checkpoints=kept_outside
            )
        finally:
            await transaction.rollback()
    assert inside_only.ok  # nothing left in the database can tell
    assert not with_copy.ok
    assert with_copy.first_bad == 16


async def test_huge_numbers_and_nul_characters_cannot_break_the_chain(lab: tuple[AsyncEngine, AuditSigner]) -> None:
    """Details with integers past 2**53, large floats and NUL characters are stored so the chain still verifies."""
    engine, signer = lab
    chain = "ten_" + "d" * 30
    async with make_sessions(engine).begin() as session:
        await AUDITOR.append(
            session,
            AuditEntry(
                "history.read", None, chain=chain, details={"big": 2**63, "float": 1e16, "nul": "a\x00b", "ok": 0.5}
            ),
        )
    async with make_sessions(engine)() as session:
        verdict = await verify_chain(session, chain, TrustedKeys.of(signer.public_key))
    assert verdict.ok, verdict


async def test_forged_checkpoint_is_detected(lab: tuple[AsyncEngine, AuditSigner]) -> None:
    """A checkpoint whose signature was not made by the audit key is rejected."""

    async def forge(connection: AsyncConnection) -> None:
        await connection.execute(
            text("UPDATE audit_checkpoints SET signed_at = '2020-01-01T00:00:00.000000Z' WHERE chain = :c"),
            {"c": CHAIN},
        )

    verdict = await tampered(lab, forge)
    assert not verdict.ok
    assert verdict.first_bad == CHECKPOINT_AT
    assert "signature" in (verdict.reason or "")


async def test_concurrent_writers_keep_one_chain(lab: tuple[AsyncEngine, AuditSigner]) -> None:
    """Forty concurrent transactions appending to one chain leave it gapless and verifiable."""
    engine, signer = lab
    other = "ten_" + "c" * 30
    sessions = make_sessions(engine)

    async def write(index: int) -> None:
        async with sessions.begin() as session:
            await AUDITOR.append(session, AuditEntry("history.read", None, chain=other, details={"n": index}))

    await asyncio.gather(*(write(i) for i in range(40)))
    async with sessions() as session:
        verdict = await verify_chain(session, other, TrustedKeys.of(signer.public_key))
    assert verdict.ok
    assert verdict.checked == 40
