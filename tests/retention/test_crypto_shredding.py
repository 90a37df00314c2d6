"""After a purge, copies of a conversation's rows taken before it are ciphertext nobody can open; what a full pre-purge dump still holds."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import select, text

from service.conversations import load_cipher, read_steps
from service.crypto import WrappedKey, open_sealed, step_aad
from service.database import make_engine, make_sessions
from service.errors import DecryptionError
from service.models import Conversation
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
    dump = tmp_path / "before-the-purge.dump"
    await asyncio.to_thread(
        subprocess.run,
        ["pg_dump", "--format=custom", "--file", str(dump), fresh_database],
        check=True,
        capture_output=True,
        timeout=120,
    )
    retention.advance_days(181)  # 181 days of silence: past phi's 180
    summary = await run_retention(retention.ctx, started_by="test")
    assert summary.purged == 1
    return Purged(conversation, survivor, dump, steps, tenant_id)


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
    """The step rows copied before the purge were real content (the data key opened them then); after it no data key for them is left, and none of the others, each unwrapped with the keyring, opens a single one."""
    async with retention.ctx.sessions() as session:
        assert (
            await session.scalar(
                text("SELECT count(*) FROM data_keys WHERE conversation_id = :c"), {"c": purged.conversation}
            )
            == 0
        )
        remaining = (await session.execute(text("SELECT conversation_id, kek_version, wrapped FROM data_keys"))).all()
    assert [row.conversation_id for row in remaining] == [purged.survivor]
    keys = [
        retention.ctx.keyring.unwrap(WrappedKey(kek_version=r.kek_version, wrapped=bytes(r.wrapped))) for r in remaining
    ]
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


@pytest.fixture
async def restored(purged: Purged) -> AsyncIterator[str]:
    """The pre-purge dump restored into a scratch database, as whoever holds the backup could."""
    name = f"custody_test_restored_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        await asyncio.to_thread(
            subprocess.run,
            ["pg_restore", "--no-owner", "--no-privileges", "--dbname", url, str(purged.dump)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield url
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


class StillReadable(AssertionError):
    """The purged conversation's content came back out of the pre-purge dump."""


@pytest.mark.xfail(
    strict=True,
    raises=StillReadable,
    reason="known limit of the design: the dump holds the conversation's data key row, wrapped under a KEK the "
    "keyring must keep (startup refuses a keyring missing any version that has been current), so a backup taken "
    "before a purge stays readable with the keyring; crypto-shredding reaches only copies without data_keys",
)
async def test_a_dump_taken_before_the_purge_opens_nothing_after_it(
    retention: RetentionService, purged: Purged, restored: str
) -> None:
    """Restoring the pre-purge dump and reading it with the service's keyring recovers none of the purged conversation's content."""
    engine = make_engine(restored)
    try:
        async with make_sessions(engine)() as session:
            conversation = await session.scalar(select(Conversation).where(Conversation.id == purged.conversation))
            assert conversation is not None  # the dump predates the purge
            recovered: list[Any] = []
            try:
                cipher = await load_cipher(session, retention.ctx.keyring, conversation)
                recovered = [step for _, _, step in await read_steps(session, cipher)]
            except (LookupError, DecryptionError):
                pass
    finally:
        await engine.dispose()
    if any(CANARY in str(step) for step in recovered):
        raise StillReadable(f"{len(recovered)} steps of the purged conversation decrypt from the pre-purge dump")
