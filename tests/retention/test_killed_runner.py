"""A `custody retention run` killed mid-batch (SIGKILL while a provider copy is being deleted) and run again finishes the job."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service.context import ServiceContext
from service.simulator import FaultSpec, RunningSimulator, SimulatorConfig, start_simulator

from .deployed import Deployed, deployed
from .test_cli import summary_of

CONVERSATIONS = 30
# The first run's provider deletions, in order: four answered, two failing (left pending with their
# error), four answered, then one that hangs; the runner is killed while it waits for that one.
BEFORE_THE_KILL = [
    FaultSpec(latency_ms=20, count=4),
    FaultSpec(status=500, count=2),
    FaultSpec(latency_ms=20, count=4),
    FaultSpec(hang_seconds=60, count=1),
]
DELETES_BEFORE_THE_KILL = 11


@dataclass
class Scenario:
    deployment: Deployed
    simulator: RunningSimulator
    conversations: list[str]
    copies: list[str]
    killed_returncode: int
    purged_at_the_kill: int
    second: subprocess.CompletedProcess[str]


async def deletes(simulator: RunningSimulator) -> int:
    return sum(1 for r in simulator.app.requests if r.method == "DELETE")


@pytest.fixture(scope="module")
async def scenario(
    ctx: ServiceContext,
    tmp_path_factory: pytest.TempPathFactory,
    keyring_path: Path,
    signing_key_path: Path,
    pepper_path: Path,
) -> AsyncIterator[Scenario]:
    """Thirty due conversations with a provider copy each; a runner SIGKILLed while deleting the eleventh copy, then a second run to completion."""
    with start_simulator(SimulatorConfig(retention_seconds=3600)) as simulator:
        async with deployed(
            ctx,
            simulator,
            tmp_path_factory.mktemp("killed-runner"),
            keyring=keyring_path,
            signing_key=signing_key_path,
            pepper=pepper_path,
        ) as deployment:
            conversations = []
            for index in range(CONVERSATIONS):
                conversation = await deployment.open()
                await deployment.turn(conversation, f"opening hours, question {index}?")
                conversations.append(conversation)
            copies = await deployment.column("SELECT id FROM upstream_interactions WHERE stored ORDER BY created_at")
            assert len(copies) == CONVERSATIONS
            await deployment.wait_due(CONVERSATIONS)

            simulator.app.reset()
            for fault in BEFORE_THE_KILL:
                simulator.app.inject(fault)
            # Popen only forks and returns; the test then polls without blocking the loop.
            first = subprocess.Popen(  # noqa: ASYNC220
                deployment.command("retention", "run"),
                env=deployment.env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                deadline = time.monotonic() + 120
                while await deletes(simulator) < DELETES_BEFORE_THE_KILL:
                    assert first.poll() is None, "the runner ended before it was killed"
                    assert time.monotonic() < deadline, "the runner never reached the hanging deletion"
                    await asyncio.sleep(0.02)
                purged_at_the_kill = len(await deployment.records("retention.purge"))
                first.send_signal(signal.SIGKILL)
            finally:
                first.wait(timeout=30)
            # The purge cut by the kill left its receipt owed, held by the dead runner until its
            # hold lapses (a turn lease, renewed by no one now): only then may a run recover it.
            deadline = time.monotonic() + 60
            while await deployment.scalar(
                "SELECT count(*) FROM deletion_receipts WHERE receipt IS NULL AND held_until >= now()"
            ):
                assert time.monotonic() < deadline, "the dead runner's hold never lapsed"
                await asyncio.sleep(0.2)
            second = deployment.run("retention", "run")
            yield Scenario(deployment, simulator, conversations, copies, first.returncode, purged_at_the_kill, second)


async def test_every_due_conversation_is_purged_exactly_once_across_the_kill(scenario: Scenario) -> None:
    """The kill lands mid-batch with eleven purges committed; the second run purges the other nineteen, and each conversation has exactly one retention.purge record."""
    deployment = scenario.deployment
    assert scenario.killed_returncode == -signal.SIGKILL
    assert scenario.purged_at_the_kill == DELETES_BEFORE_THE_KILL
    assert scenario.second.returncode == 0, scenario.second.stderr
    summary = summary_of(scenario.second.stdout)
    assert (summary["purged"], summary["failed"]) == (str(CONVERSATIONS - DELETES_BEFORE_THE_KILL), "0")
    assert await deployment.scalar("SELECT count(*) FROM conversations") == 0
    assert await deployment.scalar("SELECT count(*) FROM data_keys") == 0
    purges = Counter(r["resource"]["id"] for r in await deployment.records("retention.purge", outcome="success"))
    assert set(purges) == set(scenario.conversations)
    assert set(purges.values()) == {1}


async def test_no_conversation_has_two_receipts(scenario: Scenario) -> None:
    """However the two runs split the work, no conversation appears in more than one deletion receipt."""
    receipts: list[dict[str, Any]] = await scenario.deployment.column("SELECT receipt FROM deletion_receipts")
    receipted = Counter(d["conversation_id"] for r in receipts for d in r["payload"]["destroyed"])
    assert set(receipted) <= set(scenario.conversations)
    assert set(receipted.values()) == {1}


async def test_pending_provider_copies_are_retried_and_deleted(scenario: Scenario) -> None:
    """The two copies whose deletion failed and the one whose deletion was cut by the kill are deleted by the second run: none is left at the provider."""
    deployment = scenario.deployment
    summary = summary_of(scenario.second.stdout)
    # Nineteen purged conversations' copies, then the sweep: two failed earlier, one cut by the kill.
    assert (summary["provider copies deleted"], summary["provider copies pending"]) == (str(CONVERSATIONS - 8), "0")
    assert await deployment.scalar("SELECT count(*) FROM upstream_interactions WHERE deleted_at IS NULL") == 0
    attempts = dict(await deployment.column("SELECT json_build_array(id, delete_attempts) FROM upstream_interactions"))
    failed_first = scenario.copies[4:6]
    cut_by_the_kill = scenario.copies[DELETES_BEFORE_THE_KILL - 1]
    assert [attempts[c] for c in failed_first] == [2, 2]
    assert attempts[cut_by_the_kill] == 1  # the killed runner never recorded its attempt
    assert not set(scenario.copies) & set(scenario.simulator.app.store.ids())
    deleted = Counter(r["resource"]["id"] for r in await deployment.records("upstream.delete", outcome="success"))
    assert deleted == Counter(scenario.copies)


async def test_every_purged_conversation_gets_exactly_one_signed_receipt(scenario: Scenario) -> None:
    """Each of the thirty purged conversations is named in exactly one signed receipt, the one purged just before the kill included, and no receipt is left owed."""
    deployment = scenario.deployment
    assert await deployment.scalar("SELECT count(*) FROM deletion_receipts WHERE receipt IS NULL") == 0
    receipts: list[dict[str, Any]] = await deployment.column("SELECT receipt FROM deletion_receipts")
    receipted = Counter(d["conversation_id"] for r in receipts for d in r["payload"]["destroyed"])
    assert set(receipted) == set(scenario.conversations)
    assert set(receipted.values()) == {1}


async def test_the_receipt_the_kill_cut_is_recovered_with_its_copy_deleted(scenario: Scenario) -> None:
    """The second run signs the receipt the killed runner owed, marked recovered, naming the copy whose deletion the kill cut as deleted and the audit records of both attempts' outcomes."""
    deployment = scenario.deployment
    assert summary_of(scenario.second.stdout)["receipts recovered"] == "1"
    receipts: list[dict[str, Any]] = await deployment.column("SELECT receipt FROM deletion_receipts")
    recovered = [r["payload"] for r in receipts if r["payload"].get("recovered")]
    assert len(recovered) == 1
    [destroyed] = recovered[0]["destroyed"]
    cut_by_the_kill = scenario.copies[DELETES_BEFORE_THE_KILL - 1]
    assert destroyed["provider_copies_deleted"] == [cut_by_the_kill]
    assert destroyed["provider_copies_pending"] == []
    purge = await deployment.records("retention.purge", outcome="success")
    deletion = await deployment.records("upstream.delete", outcome="success")
    expected = {r["seq"] for r in purge if r["resource"]["id"] == destroyed["conversation_id"]} | {
        r["seq"] for r in deletion if r["resource"]["id"] == cut_by_the_kill
    }
    assert set(destroyed["audit_seqs"]) == expected
