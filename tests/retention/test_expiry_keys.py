"""Expiry keys: each data key with a deadline is sealed under its deadline's day, follows the deadline when it moves, and the runner destroys a passed day's key only once no data key needs it."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import shutil
import time
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import select, text, update

from service.clock import Clock
from service.config import Settings
from service.context import ServiceContext
from service.conversations import align_data_keys, load_cipher, read_steps, recompute_deadlines, utc_today
from service.crypto import SEALED_DATA_KEY_SIZE, FileKeyring, rewrap_data_keys
from service.errors import ConfigurationError
from service.key_store import days_in_use
from service.models import Conversation, DataKey
from service.policy import parse_policy
from service.retention import run_retention
from service.runtime import build_runtime

from ..conftest import CANARY, OwnService, deployment_env, key_store_of, migrated_database
from .conftest import DAY, RetentionService, retention_policy_document


async def sealed_day(retention: RetentionService, conversation: str) -> date | None:
    """The day the conversation's data key is sealed under (None: no expiry layer)."""
    async with retention.engine.connect() as connection:
        day: date | None = (
            await connection.execute(
                text("SELECT expiry_day FROM data_keys WHERE conversation_id = :c"), {"c": conversation}
            )
        ).scalar_one()
    return day


async def deadline_day(retention: RetentionService, conversation: str) -> date:
    async with retention.engine.connect() as connection:
        day: date = (
            await connection.execute(
                text("SELECT (purge_at AT TIME ZONE 'UTC')::date FROM conversations WHERE id = :c"), {"c": conversation}
            )
        ).scalar_one()
    return day


async def clock_today(retention: RetentionService) -> date:
    """Today (UTC), by the test's clock (the one the runner and the service go by)."""
    async with retention.ctx.sessions() as session:
        today = await session.scalar(select(utc_today(retention.ctx.clock)))
    assert isinstance(today, date)
    return today


async def history(retention: RetentionService, conversation: str) -> str:
    """The conversation's decrypted history, as the API answers it."""
    response = await retention.api.get(f"/v1/conversations/{conversation}/steps", headers=retention.tenant.headers())
    assert response.status_code == 200, response.text
    return response.text


async def records(retention: RetentionService, action: str) -> list[dict[str, Any]]:
    async with retention.engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT record FROM audit_events WHERE record @> CAST(:p AS jsonb) ORDER BY chain, seq"),
            {"p": json.dumps({"action": action})},
        )
        return [dict(row.record) for row in rows]


async def key_exists(ctx: ServiceContext, day: date) -> bool:
    """Whether the key store holds the day's key (asked of the store, not of this process's memory)."""
    ctx.expiry_keys.forget()
    return await ctx.expiry_keys.existing(day, ctx.keyring) is not None


async def hold(retention: RetentionService, **body: str) -> None:
    response = await retention.api.post(
        "/v1/ops/holds", json={"reason": "case 12", **body}, headers=retention.tenant.headers("ops")
    )
    assert response.status_code == 201, response.text


async def test_a_deadline_seals_the_data_key_under_its_day_and_no_deadline_leaves_it_under_the_kek(
    retention: RetentionService, own_service: OwnService
) -> None:
    """A conversation with a deadline has its data key sealed (68 bytes) under the UTC day of its purge_at; one whose rules state no delete_after (the example policy) keeps the plain 40-byte key wrap."""
    conversation = await retention.open("patient-intake", ["phi"])
    assert await sealed_day(retention, conversation) == await deadline_day(retention, conversation)
    async with retention.engine.connect() as connection:
        sealed = (await connection.execute(text("SELECT wrapped FROM data_keys"))).scalar_one()
    assert len(sealed) == SEALED_DATA_KEY_SIZE

    created = await own_service.api.post(
        "/v1/conversations",
        json={"route": "patient-intake", "data_classes": ["phi"]},
        headers=own_service.tenant.headers(),
    )
    assert created.status_code == 201, created.text
    async with own_service.engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT d.expiry_day, length(d.wrapped) AS size, c.purge_at FROM data_keys d "
                    "JOIN conversations c ON c.id = d.conversation_id WHERE c.id = :c"
                ),
                {"c": created.json()["id"]},
            )
        ).one()
    assert (row.expiry_day, row.size, row.purge_at) == (None, 40, None)


async def test_a_held_conversation_past_its_deadline_outlives_its_days_key(
    retention: RetentionService, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    """A held conversation past its deadline is moved to the day after today before its day's key is destroyed, stays readable, and is moved again each day; each destruction is one retention.expire_key record (the day, no content) and a child span of the run, with no canary in records, spans or logs."""
    caplog.set_level(logging.DEBUG)
    conversation = await retention.open("patient-intake", ["phi"], subject=CANARY)
    await retention.turn(conversation, f"{CANARY} has a cough")
    first_day = await sealed_day(retention, conversation)
    assert first_day is not None
    await hold(retention, scope="conversation", conversation_id=conversation)
    retention.advance_days(182)  # past the deadline, and past its day
    spans.clear()
    summary = await run_retention(retention.ctx, started_by="test")
    assert (summary.purged, summary.expiry_keys_destroyed, summary.data_keys_moved) == (0, 1, 1)
    today = await clock_today(retention)
    assert await sealed_day(retention, conversation) == today + timedelta(days=1)
    assert not await key_exists(retention.ctx, first_day)
    assert CANARY in await history(retention, conversation)

    [record] = await records(retention, "retention.expire_key")
    assert record["chain"] == "system"
    assert record["resource"] == {"type": "expiry_key", "id": first_day.isoformat()}
    assert record["details"] == {"run_id": summary.run_id, "day": first_day.isoformat(), "data_keys_moved": 1}
    finished = spans.get_finished_spans()
    [root] = [s for s in finished if s.name == "custody.retention.run"]
    [expired] = [s for s in finished if s.name == "custody.retention.expire_key"]
    assert expired.context.trace_id == root.context.trace_id
    assert expired.parent is not None
    assert expired.parent.span_id == root.context.span_id

    retention.advance_days(2)  # the day it was moved to has passed too
    again = await run_retention(retention.ctx, started_by="test")
    assert (again.purged, again.expiry_keys_destroyed, again.data_keys_moved) == (0, 1, 1)
    assert await sealed_day(retention, conversation) == today + timedelta(days=3)
    assert CANARY in await history(retention, conversation)

    everything = json.dumps(await records(retention, "retention.expire_key")) + json.dumps(
        [dict(s.attributes or {}) | {"name": s.name} for s in spans.get_finished_spans()]
    )
    assert CANARY not in everything
    assert CANARY not in caplog.text


async def test_a_turn_that_moves_the_deadline_to_another_day_reseals_and_frees_the_old_day(
    retention: RetentionService,
) -> None:
    """A turn on a conversation last active three days ago moves its deadline three days on; its data key is resealed to the new day in the turn's transaction, so once the old day has passed the runner destroys that day's key without moving anything, and the conversation still reads."""
    conversation = await retention.open("billing-support", ["pan"])  # P90D
    await retention.turn(conversation, f"{CANARY} disputes a charge")
    # As if its last activity had been three days ago: the deadline (and the data key) of then.
    async with retention.ctx.sessions.begin() as session:
        await session.execute(
            update(Conversation)
            .where(Conversation.id == conversation)
            .values(
                updated_at=Conversation.updated_at - timedelta(days=3),
                purge_at=Conversation.purge_at - timedelta(days=3),
            )
        )
        assert await align_data_keys(session, retention.ctx, [conversation]) == 1
    old_day = await sealed_day(retention, conversation)
    assert old_day == await deadline_day(retention, conversation)
    await retention.turn(conversation, "any news?")
    new_day = await deadline_day(retention, conversation)
    assert old_day is not None
    assert new_day == old_day + timedelta(days=3)
    assert await sealed_day(retention, conversation) == new_day
    assert await key_exists(retention.ctx, old_day)  # nothing destroys a day before it has passed

    today = await clock_today(retention)
    retention.advance_days((old_day - today).days + 1)  # the old day has passed; the new one has not
    summary = await run_retention(retention.ctx, started_by="test")
    assert (summary.purged, summary.expiry_keys_destroyed, summary.data_keys_moved) == (0, 1, 0)
    assert not await key_exists(retention.ctx, old_day)
    assert await key_exists(retention.ctx, new_day)
    assert CANARY in await history(retention, conversation)


async def test_a_class_the_detectors_add_moves_the_deadline_and_the_data_key_with_it(
    retention: RetentionService,
) -> None:
    """An e-mail address in a turn adds pii (P30D) to a pan conversation (P90D): the deadline moves two months earlier, and the data key is resealed to that day, even by the claim alone."""
    conversation = await retention.open("billing-support", ["pan"])
    before = await sealed_day(retention, conversation)
    await retention.turn(conversation, "write to me at jane.doe@example.com")
    after = await deadline_day(retention, conversation)
    assert before is not None
    assert (before - after).days in (59, 60, 61)
    assert await sealed_day(retention, conversation) == after
    assert "jane.doe@example.com" in await history(retention, conversation)


async def test_a_policy_change_reseals_moved_deadlines_and_strips_a_dropped_one(retention: RetentionService) -> None:
    """Recomputing for a new policy reseals a data key whose deadline moved to another day, takes the expiry layer off one whose conversation no longer has a deadline, and seals one that had none (as after the upgrade, which clears every policy version)."""
    moved = await retention.open("patient-intake", ["phi"])  # P180D
    dropped = await retention.open("public-faq", ["public"])  # P7D
    document = copy.deepcopy(retention_policy_document())
    document["routes"]["patient-intake"]["retention"] = {"delete_after": "P200D"}
    document["data_classes"]["phi"]["retention"] = {"keep_at_least": "P60D"}
    del document["routes"]["public-faq"]["retention"]["delete_after"]
    del document["data_classes"]["public"]["retention"]
    changed = dataclasses.replace(retention.ctx, policy=parse_policy(document, source="changed policy"))
    assert await recompute_deadlines(changed) == 2
    moved_day = await sealed_day(retention, moved)
    assert moved_day == await deadline_day(retention, moved)
    assert await sealed_day(retention, dropped) is None
    async with retention.engine.connect() as connection:
        assert (
            await connection.execute(
                text("SELECT length(wrapped) FROM data_keys WHERE conversation_id = :c"), {"c": dropped}
            )
        ).scalar_one() == 40

    # A data key from before the expiry layer existed: sealed by the next recompute.
    async with retention.ctx.sessions.begin() as session:
        await session.execute(update(Conversation).values(retention_policy_version=""))
    assert await recompute_deadlines(retention.ctx) == 2
    assert await sealed_day(retention, dropped) == await deadline_day(retention, dropped)
    for conversation in (moved, dropped):
        await retention.turn(conversation, "still there?")


async def _wait_for_a_lock_wait(retention: RetentionService, runner: asyncio.Task[Any], bound: float = 30.0) -> None:
    """Until some session of the test's database waits on a lock, or the runner has finished
    without waiting (a bound, not a measurement)."""
    deadline = time.monotonic() + bound
    while not runner.done():
        async with retention.engine.connect() as connection:
            waiting = await connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'"
                )
            )
        if waiting:
            return
        assert time.monotonic() < deadline, "the runner neither waited nor finished"
        await asyncio.sleep(0.05)


async def test_the_runner_waits_for_a_turn_that_is_resealing_a_data_key_off_its_day(
    retention: RetentionService,
) -> None:
    """While a turn's transaction holds a data key row it is resealing off a passed day, the runner waits before destroying that day's key; once the turn commits, the runner finds the row gone to its new day, destroys the old day's key, and the conversation still reads."""
    conversation = await retention.open("patient-intake", ["phi"])
    await retention.turn(conversation, f"{CANARY} has a fever")
    old_day = await sealed_day(retention, conversation)
    assert old_day is not None
    await hold(retention, scope="conversation", conversation_id=conversation)
    retention.advance_days(182)
    async with retention.ctx.sessions() as session, session.begin():
        # What a turn's settle does: lock the conversation, move its deadline, reseal its data key.
        await session.execute(select(Conversation).where(Conversation.id == conversation).with_for_update())
        await session.execute(
            update(Conversation)
            .where(Conversation.id == conversation)
            .values(purge_at=retention.ctx.clock.now() + timedelta(days=30))
        )
        assert await align_data_keys(session, retention.ctx, [conversation]) == 1
        runner = asyncio.create_task(run_retention(retention.ctx, started_by="test"))
        await _wait_for_a_lock_wait(retention, runner)
        assert not runner.done(), "the runner went ahead instead of waiting"
        assert await key_exists(retention.ctx, old_day)
    summary = await runner
    assert (summary.expiry_keys_destroyed, summary.expiry_keys_failed, summary.data_keys_moved) == (1, 0, 0)
    assert not await key_exists(retention.ctx, old_day)
    assert CANARY in await history(retention, conversation)


async def test_a_data_key_sealed_under_today_just_before_midnight_is_moved_not_lost(
    retention: RetentionService,
) -> None:
    """A data key being sealed under today (its transaction open) when a runner that already sees tomorrow starts: the runner waits on the day's lock, then finds the new row, moves it to a later day and only then destroys the day's key, so the data key stays readable."""
    conversation = await retention.open("patient-intake", ["phi"])
    await retention.turn(conversation, f"{CANARY} is dizzy")
    await hold(retention, scope="conversation", conversation_id=conversation)
    today = await clock_today(retention)
    runner_clock = Clock()
    runner_clock.advance(DAY)  # the runner's clock is already at tomorrow
    runner_ctx = dataclasses.replace(retention.ctx, clock=runner_clock)
    async with retention.ctx.sessions() as session, session.begin():
        # A deadline later today: the writer seals under today, holding the day's lock shared.
        await session.execute(select(Conversation).where(Conversation.id == conversation).with_for_update())
        await session.execute(
            update(Conversation)
            .where(Conversation.id == conversation)
            .values(
                purge_at=text(
                    "date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' + interval '23 hours 59 minutes'"
                )
            )
        )
        assert await align_data_keys(session, retention.ctx, [conversation]) == 1
        runner = asyncio.create_task(run_retention(runner_ctx, started_by="test"))
        await _wait_for_a_lock_wait(retention, runner)
        assert not runner.done(), "the runner went ahead instead of waiting"
    assert await sealed_day(retention, conversation) == today
    summary = await runner
    assert (summary.expiry_keys_destroyed, summary.data_keys_moved) == (1, 1)
    assert not await key_exists(retention.ctx, today)
    assert await sealed_day(retention, conversation) == today + timedelta(days=2)
    assert CANARY in await history(retention, conversation)


async def test_turns_racing_the_runner_leave_no_data_key_under_a_destroyed_day(retention: RetentionService) -> None:
    """Twenty held conversations past their deadline, each taking a turn while a run moves them off their passed day: every turn succeeds, the run fails nothing, every day a data key is sealed under still has its key, and every conversation reads."""
    opened = [await retention.open("patient-intake", ["phi"]) for _ in range(20)]
    for conversation in opened:
        await retention.turn(conversation, f"{CANARY} first")
    await hold(retention, scope="tenant")
    retention.advance_days(182)
    turns = [retention.turn(conversation, "second") for conversation in opened]
    summary, *_ = await asyncio.gather(run_retention(retention.ctx, started_by="test"), *turns)
    assert (summary.purged, summary.expiry_keys_destroyed, summary.expiry_keys_failed) == (0, 1, 0)
    async with retention.ctx.sessions() as session:
        used = await days_in_use(session)
    assert used
    for day in used:
        assert await key_exists(retention.ctx, day)
    for conversation in opened:
        assert CANARY in await history(retention, conversation)


async def test_rotation_rewraps_sealed_data_keys_and_the_expiry_keys(
    retention: RetentionService, keyring_path: Path, tmp_path: Path
) -> None:
    """Rotating the keyring rewraps a sealed data key under the new KEK (sealed again under the same day, steps untouched) and the expiry keys in the key store, each step audited; the history reads with the new keyring."""
    path = tmp_path / "keyring.json"
    shutil.copy(keyring_path, path)
    path.chmod(0o600)
    ctx = dataclasses.replace(retention.ctx, keyring=FileKeyring(path))
    conversation = await retention.open("patient-intake", ["phi"])
    await retention.turn(conversation, f"{CANARY} rotates")
    day = await sealed_day(retention, conversation)
    assert day is not None
    async with ctx.sessions() as session:
        before = (await session.scalars(select(DataKey))).one()
        before_wrapped = bytes(before.wrapped)
    version = ctx.keyring.rotate()
    result = await rewrap_data_keys(ctx.auditor, ctx.sessions, ctx.keyring, ctx.expiry_keys)
    assert (result.version, result.rewrapped, result.expiry_keys) == (version, 1, 1)
    async with ctx.sessions() as session:
        after = (await session.scalars(select(DataKey))).one()
        assert (after.kek_version, after.expiry_day) == (version, day)
        assert bytes(after.wrapped) != before_wrapped
        conversation_row = await session.get(Conversation, conversation)
        assert conversation_row is not None
        steps = await read_steps(session, await load_cipher(session, ctx, conversation_row))
    assert CANARY in json.dumps([json.loads(step) for _, _, step in steps])
    async with ctx.expiry_keys.sessions() as session:
        versions = (await session.execute(text("SELECT DISTINCT kek_version FROM expiry_keys"))).scalars().all()
    assert versions == [version]
    rotations = await records(retention, "keyring.rotate")
    assert [r["details"] for r in rotations] == [
        {"kek_version": version, "rewrapped": 1, "unreadable": 0},
        {"kek_version": version, "expiry_keys_rewrapped": 1, "unreadable": 0},
    ]
    again = await rewrap_data_keys(ctx.auditor, ctx.sessions, ctx.keyring, ctx.expiry_keys)
    assert (again.rewrapped, again.expiry_keys) == (0, 0)


async def test_a_new_conversation_never_seals_under_a_day_that_has_passed(retention: RetentionService) -> None:
    """With the clock past a deadline's day (as for a purge_at a policy put in the past), the data key is sealed under the day after today, never under a passed day a runner may be destroying."""
    retention.advance_days(400)
    conversation = await retention.open(
        "patient-intake", ["phi"]
    )  # its deadline, by the database's own now(), is behind the clock
    today = await clock_today(retention)
    assert await deadline_day(retention, conversation) < today
    assert await sealed_day(retention, conversation) == today + timedelta(days=1)
    async with retention.ctx.sessions.begin() as session:
        row = await session.get(Conversation, conversation)
        assert row is not None
        cipher = await load_cipher(session, retention.ctx, row)
    assert cipher.conversation_id == conversation


async def test_startup_refuses_a_key_store_missing_a_day_its_data_keys_need(
    retention: RetentionService,
    fresh_database: str,
    tmp_path: Path,
    keyring_path: Path,
    signing_key_path: Path,
    pepper_path: Path,
) -> None:
    """A deployment pointed at another (empty) key store while its data keys are sealed under some day stops at startup naming that day, instead of answering 500 for those conversations; with its own key store it starts."""
    conversation = await retention.open("patient-intake", ["phi"])
    day = await sealed_day(retention, conversation)
    assert day is not None
    env = deployment_env(fresh_database, keyring_path, signing_key_path, pepper_path, CUSTODY_DATA_DIR=str(tmp_path))
    async with migrated_database("custody_test_other") as other:
        wrong = Settings.from_env(env | {"CUSTODY_KEY_STORE_URL": key_store_of(other)})
        with pytest.raises(
            ConfigurationError, match=rf"no expiry key for 1 day\(s\) .* \(the first: {day.isoformat()}\)"
        ):
            await build_runtime(wrong, demo_keys=False, verify_upstream=False)
    runtime = await build_runtime(Settings.from_env(env), demo_keys=False, verify_upstream=False)
    await runtime.aclose()
