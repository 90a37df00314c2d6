"""`custody retention run`: progress per batch on stderr, a summary (or, dry, what would go and why) on stdout, one line per mistake."""

from __future__ import annotations

import asyncio
import os
import pty
import re
import subprocess

import pytest

from ..conftest import make_tenant
from .deployed import Deployed


def summary_of(stdout: str) -> dict[str, str]:
    """The summary table's rows, `name  value`."""
    rows = {}
    for line in stdout.splitlines():
        if match := re.fullmatch(
            r"(run|purged|skipped|failed|provider copies \w+|oldest pending copy|deadlines recomputed|receipts recovered|seconds)\s{2,}(.+)",
            line,
        ):
            rows[match[1]] = match[2]
    return rows


async def test_a_dry_run_lists_each_conversation_with_its_rule_and_changes_nothing(deployment: Deployed) -> None:
    """The dry run lists every due conversation with its tenant, route, classes, rule and deadline, purges none, and is audited under the operator."""
    due = [await deployment.open() for _ in range(2)]
    kept = await deployment.open("patient-intake", ("phi",))
    await deployment.wait_due(2)
    result = deployment.run("--as", "ops-dana", "retention", "run", "--dry-run")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result.stdout)
    assert summary["purged"] == "0"
    assert "dry run" in summary["run"]
    assert "would purge 2 conversation(s)" in result.stdout
    listed = {line.split()[0]: line.split() for line in result.stdout.splitlines() if line.startswith("conv_")}
    assert set(listed) == set(due)
    for conversation in due:
        _, tenant, route, classes, *rule, deadline = listed[conversation]
        assert (tenant, route, classes, " ".join(rule)) == (
            deployment.tenant.name,
            "public-faq",
            "public",
            "delete_after PT2S",
        )
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", deadline)
    assert kept not in result.stdout
    assert await deployment.scalar("SELECT count(*) FROM conversations") == 3
    [record] = await deployment.records("retention.run")
    assert (record["details"]["dry_run"], record["details"]["started_by"]) == (True, "ops-dana")
    assert record["details"]["would_purge"] == 2


async def test_a_run_purges_shows_a_line_per_batch_and_a_summary(deployment: Deployed) -> None:
    """A run purges what is due, writes one progress line per batch to a stderr that is not a terminal, and ends with the summary table and exit 0."""
    due = [await deployment.open() for _ in range(3)]
    await deployment.turn(due[0], "opening hours?")
    kept = await deployment.open("patient-intake", ("phi",))
    await deployment.wait_due(3)
    result = deployment.run("--as", "ops-dana", "retention", "run")
    assert result.returncode == 0, result.stderr
    summary = summary_of(result.stdout)
    assert (summary["purged"], summary["skipped"], summary["failed"]) == ("3", "0", "0")
    assert (summary["provider copies deleted"], summary["provider copies pending"]) == ("1", "0")
    assert summary["oldest pending copy"] == "-"
    assert float(summary["seconds"]) >= 0
    run_id = summary["run"].split()[0]
    assert re.fullmatch(
        rf"custody: retention run {run_id}: batch 1, 3 of ~3: purged 3, skipped 0, failed 0", result.stderr.strip()
    )
    assert await deployment.column("SELECT id FROM conversations") == [kept]
    [record] = await deployment.records("retention.run")
    assert (record["resource"]["id"], record["details"]["started_by"], record["details"]["purged"]) == (
        run_id,
        "ops-dana",
        3,
    )


def run_on_a_terminal(command: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    """Run `command` with its stderr on a pseudo-terminal: (exit code, stdout, what the terminal showed)."""
    controller, terminal = pty.openpty()
    try:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=terminal, text=True)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's other end closed, the process is done with it
                break
            if not chunk:
                break
            shown += chunk
        stdout, _ = process.communicate(timeout=120)
    finally:
        os.close(controller)
    return process.returncode, stdout, shown.decode()


async def test_on_a_terminal_the_progress_is_a_bar_redrawn_in_place(deployment: Deployed) -> None:
    """With stderr on a terminal the progress is one bar redrawn with a carriage return, ended by a newline, and no per-batch lines."""
    for _ in range(2):
        await deployment.open()
    await deployment.wait_due(2)
    code, stdout, shown = await asyncio.to_thread(
        run_on_a_terminal, deployment.command("retention", "run"), deployment.env
    )
    assert code == 0
    assert summary_of(stdout)["purged"] == "2"
    assert "\rretention run [" + "#" * 30 + "] 2/2 purged 2, skipped 0, failed 0" in shown
    assert shown.endswith("\r\n") or shown.endswith("\n")
    assert "batch" not in shown


async def test_tenant_and_limit_narrow_the_run(deployment: Deployed) -> None:
    """`--tenant` (by name or by id) purges only that tenant's conversations and `--limit N` at most N of them."""
    other = await make_tenant(deployment.ctx)
    mine = [await deployment.open() for _ in range(2)]
    theirs = [await deployment.open(tenant=other) for _ in range(3)]
    await deployment.wait_due(5)
    limited = deployment.run("retention", "run", "--tenant", other.name, "--limit", "2")
    assert limited.returncode == 0, limited.stderr
    assert summary_of(limited.stdout)["purged"] == "2"
    left = set(await deployment.column("SELECT id FROM conversations"))
    assert left >= set(mine)
    assert len(left & set(theirs)) == 1
    mine_id = await deployment.scalar("SELECT id FROM tenants WHERE name = :n", n=deployment.tenant.name)
    by_id = deployment.run("retention", "run", "--tenant", mine_id)
    assert by_id.returncode == 0, by_id.stderr
    assert summary_of(by_id.stdout)["purged"] == "2"
    assert set(await deployment.column("SELECT id FROM conversations")) == left - set(mine)
    chains = sorted(r["chain"] for r in await deployment.records("retention.run"))
    other_id = await deployment.scalar("SELECT id FROM tenants WHERE name = :n", n=other.name)
    assert chains == sorted([other_id, mine_id])


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("retention", "run", "--tenant", "no-such-tenant"), 1, "custody: no such tenant"),
        (("retention", "run", "--limit", "0"), 2, "--limit: takes a whole number of at least 1"),
        (("retention", "run", "--limit", "ten"), 2, "--limit: takes a whole number of at least 1"),
        (("retention", "run", "--everything"), 2, "unrecognized arguments: --everything"),
        (("retention",), 2, "the following arguments are required: action"),
    ],
    ids=["unknown-tenant", "zero-limit", "word-limit", "unknown-option", "no-action"],
)
async def test_a_mistake_is_one_line(deployment: Deployed, args: tuple[str, ...], code: int, message: str) -> None:
    """A run that cannot go as asked exits non-zero with one line on stderr and no run."""
    result = deployment.run(*args)
    assert result.returncode == code
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert message in result.stderr
    assert await deployment.records("retention.run") == []


async def test_an_unreachable_database_is_one_line(deployment: Deployed) -> None:
    """With a DATABASE_URL nobody answers on, the run cannot start: exit 2, one line, without the URL's password."""
    result = deployment.run(
        "retention", "run", env={"DATABASE_URL": "postgresql://postgres:s3cret@127.0.0.1:1/custody"}
    )
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot connect to the database at DATABASE_URL" in result.stderr
    assert "s3cret" not in result.stderr


async def test_a_run_that_fails_is_one_line_and_on_record(deployment: Deployed) -> None:
    """A run that breaks part-way (here its own bookkeeping table is missing) exits 1 with one line naming the run and the error type, and its failure is audited."""
    await deployment.open()
    await deployment.wait_due(1)
    async with deployment.engine.begin() as connection:
        await connection.exec_driver_sql("ALTER TABLE retention_runs RENAME TO retention_runs_away")
    try:
        result = deployment.run("retention", "run")
    finally:
        async with deployment.engine.begin() as connection:
            await connection.exec_driver_sql("ALTER TABLE retention_runs_away RENAME TO retention_runs")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert re.search(r"custody: retention run run_\w+ failed \(ProgrammingError\)", result.stderr)
    [record] = await deployment.records("retention.run")
    assert (record["outcome"], record["reason"]) == ("error", "programming")
    assert await deployment.scalar("SELECT count(*) FROM conversations") == 1
