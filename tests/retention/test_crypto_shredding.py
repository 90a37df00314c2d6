"""After a purge, copies of a conversation's rows taken before it are ciphertext nobody can open, a full pre-purge dump included once the day of its deadline has passed; and while that day's expiry key exists, the dump still opens (the window, shown)."""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, text

from service.context import ServiceContext
from service.conversations import load_cipher, read_steps, unsealed
from service.crypto import open_sealed, step_aad
from service.database import make_engine, make_sessions
from service.errors import DecryptionError, ExpiryKeyDestroyed
from service.models import Conversation, DataKey
from service.retention import run_retention

from ..conftest import ADMIN_URL, CANARY
from .conftest import RetentionService


@dataclass
class Purged:
    """A phi conversation full of the canary, purged after a dump and a copy of its rows were taken."""

    conversation: str
    survivor: str  # a conversation of the same tenant that is not due
    dump: Path  # pg_dump --format=custom of the whole database, taken before the purge
    steps: list[tuple[int, int, bytes]]  # (position, key_version, sealed): its step rows, copied before
    tenant_id: str


@pytest.fixture
async def purged(retention: RetentionService, fresh_database: str, tmp_path: Path) -> Purged:
    """A conversation whose subject, metadata and turns carry the canary, dumped and copied, then purged by the runner."""
    conversation = await retention.open("patient-intake", ["phi"], subject=CANARY, metadata={"note": CANARY})
    for words in (f"{CANARY} has a cough", f"{CANARY} again"):
        await retention.turn(conversation, words)
    survivor = await retention.open("billing-support", ["financial"])  # kept at least five years
    await retention.turn(survivor, "a statement")
    async with retention.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT position, key_version, sealed FROM steps WHERE conversation_id = :c ORDER BY position"),
            {"c": conversation},
        )
        steps = [(r.position, r.key_version, bytes(r.sealed)) for r in rows]
        tenant_id = (
            await connection.execute(text("SELECT tenant_id FROM conversations WHERE id = :c"), {"c": conversation})
        ).scalar_one()
    assert len(steps) == 8
    dump = await pg_dump(fresh_database, tmp_path / "before-the-purge.dump")
    retention.advance_days(181)  # 181 days of silence: past phi's 180, and past the day of its deadline
    summary = await run_retention(retention.ctx, started_by="test")
    assert summary.purged == 1
    assert summary.expiry_keys_destroyed == 1  # the day of the purged conversation's deadline
    return Purged(conversation, survivor, dump, steps, tenant_id)


async def pg_dump(database_url: str, path: Path) -> Path:
    """`pg_dump --format=custom` of the whole database, as a nightly backup would take it."""
    await asyncio.to_thread(
        subprocess.run,
        ["pg_dump", "--format=custom", "--file", str(path), database_url],
        check=True,
        capture_output=True,
        timeout=120,
    )
    return path


@asynccontextmanager
async def restored_dump(dump: Path) -> AsyncIterator[str]:
    """A dump restored into a scratch database, as whoever holds the backup could."""
    name = f"custody_test_restored_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        await asyncio.to_thread(
            subprocess.run,
            ["pg_restore", "--no-owner", "--no-privileges", "--dbname", url, str(dump)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def read_from(database_url: str, ctx: ServiceContext, conversation_id: str) -> list[Any]:
    """The conversation's steps as a holder of the database (restored), the keyring and the live key store reads them."""
    engine = make_engine(database_url)
    try:
        async with make_sessions(engine)() as session:
            conversation = await session.scalar(select(Conversation).where(Conversation.id == conversation_id))
            assert conversation is not None  # the dump predates the purge
            cipher = await load_cipher(session, ctx, conversation)
            return [json.loads(step) for _, _, step in await read_steps(session, cipher)]
    finally:
        await engine.dispose()


async def everything_as_text(database_url: str) -> dict[str, list[str]]:
    """Every row of every table, as text (bytea as hex), by table."""
    connection = await asyncpg.connect(database_url)
    try:
        tables = [r[0] for r in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        return {t: [r[0] for r in await connection.fetch(f'SELECT x::text FROM "{t}" x')] for t in tables}
    finally:
        await connection.close()


async def test_copied_step_rows_open_with_no_key_left_in_the_database(
    retention: RetentionService, purged: Purged
) -> None:
    """The step rows copied before the purge were real content (the data key opened them then); after it no data key for them is left, and none of the others, each opened with the keyring and the key store, opens a single one."""
    async with retention.ctx.sessions() as session:
        assert (
            await session.scalar(
                text("SELECT count(*) FROM data_keys WHERE conversation_id = :c"), {"c": purged.conversation}
            )
            == 0
        )
        remaining = (await session.scalars(select(DataKey))).all()
    assert [row.conversation_id for row in remaining] == [purged.survivor]
    keys = [retention.ctx.keyring.unwrap(await unsealed(retention.ctx, row)) for row in remaining]
    for position, key_version, sealed in purged.steps:
        aad = step_aad(
            tenant_id=purged.tenant_id, conversation_id=purged.conversation, position=position, key_version=key_version
        )
        for key in keys:
            with pytest.raises(DecryptionError):
                open_sealed(key, sealed, aad)
        assert CANARY.encode() not in sealed
        assert CANARY.encode().hex() not in sealed.hex()


async def test_what_remains_of_a_purged_conversation_is_ids_counts_and_its_receipt(
    retention: RetentionService, purged: Purged, fresh_database: str
) -> None:
    """After the purge the conversation's id is left only in audit records, its deletion receipt and the ledger of model calls (ids and times), and the canary in no row of any table."""
    tables = await everything_as_text(fresh_database)
    mentions = {table for table, rows in tables.items() if any(purged.conversation in row for row in rows)}
    assert mentions == {"audit_events", "deletion_receipts", "upstream_interactions"}
    async with retention.engine.connect() as connection:
        ledger = (
            await connection.execute(
                text("SELECT stored, turn_id FROM upstream_interactions WHERE conversation_id = :c"),
                {"c": purged.conversation},
            )
        ).all()
    # One row per model call (two turns), never stored at the provider: nothing to delete there.
    assert [row.stored for row in ledger] == [False, False]
    needles = [CANARY, CANARY.encode().hex()]
    assert not [table for table, rows in tables.items() if any(n in row for row in rows for n in needles)]
    # Control: the survivor's content is still there, as ciphertext, so the sweep above saw real rows.
    assert any(purged.survivor in row for row in tables["steps"])


async def test_a_dump_taken_before_the_purge_opens_nothing_after_it(
    retention: RetentionService, purged: Purged
) -> None:
    """Restoring the pre-purge dump and reading it with the service's keyring and live key store recovers none of the purged conversation's content: its data key is sealed under the expiry key of its deadline's day, which the runner destroyed once the day had passed."""
    async with restored_dump(purged.dump) as restored:
        engine = make_engine(restored)
        try:
            async with engine.connect() as connection:
                sealed_under, purge_day = (
                    await connection.execute(
                        text(
                            "SELECT d.expiry_day, (c.purge_at AT TIME ZONE 'UTC')::date FROM data_keys d "
                            "JOIN conversations c ON c.id = d.conversation_id WHERE c.id = :c"
                        ),
                        {"c": purged.conversation},
                    )
                ).one()
        finally:
            await engine.dispose()
        assert sealed_under == purge_day
        with pytest.raises(ExpiryKeyDestroyed):
            await read_from(restored, retention.ctx, purged.conversation)
        # Control: the survivor's day is ahead, so the same dump still opens it.
        assert await read_from(restored, retention.ctx, purged.survivor)
    retention.ctx.expiry_keys.forget()  # what the key store holds, not this process's memory
    assert await retention.ctx.expiry_keys.existing(purge_day, retention.ctx.keyring) is None


async def test_a_dump_restored_while_its_days_key_exists_opens_until_the_day_has_passed(
    retention: RetentionService, fresh_database: str, tmp_path: Path
) -> None:
    """The window, shown honestly: a pre-purge dump restored after the purge but still on the day of the deadline decrypts (that day's expiry key exists); the first run after the day has passed destroys the key, and the same restored dump then opens nothing."""
    conversation = await retention.open("patient-intake", ["phi"])
    await retention.turn(conversation, f"{CANARY} has a cough")
    dump = await pg_dump(fresh_database, tmp_path / "nightly.dump")
    async with retention.engine.connect() as connection:
        purge_at, now = (
            await connection.execute(
                text("SELECT purge_at, now() FROM conversations WHERE id = :c"), {"c": conversation}
            )
        ).one()
    end_of_its_day = datetime.combine(purge_at.astimezone(UTC).date() + timedelta(days=1), time(), UTC)
    left = (end_of_its_day - purge_at).total_seconds()
    if left < 600:
        pytest.skip("the deadline falls in the last ten minutes of its UTC day; a minute past it is the next day")
    retention.ctx.clock.advance((purge_at - now).total_seconds() + 60)  # a minute past the deadline, same day
    summary = await run_retention(retention.ctx, started_by="test")
    assert (summary.purged, summary.expiry_keys_destroyed) == (1, 0)
    async with restored_dump(dump) as restored:
        steps = await read_from(restored, retention.ctx, conversation)
        assert any(CANARY in str(step) for step in steps)  # purged, and yet the backup still opens
        retention.ctx.clock.advance(left)  # the day of the deadline has passed
        summary = await run_retention(retention.ctx, started_by="test")
        assert (summary.expiry_keys_destroyed, summary.data_keys_moved) == (1, 0)
        with pytest.raises(ExpiryKeyDestroyed):
            await read_from(restored, retention.ctx, conversation)
