"""The periodic runner inside the service: it purges by itself, picks a policy change up at startup, retries a failed round and stops cleanly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from service.audit import RequestMeta
from service.auth import Principal, authenticate
from service.config import Settings
from service.conversations import open_conversation
from service.errors import ConfigurationError
from service.policy import load_policy
from service.runtime import Runtime, build_runtime

from .deployed import Deployed, short_policy_document


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def runtime_on(deployment: Deployed, **env: str) -> Runtime:
    """The service's own composition root on the deployment's database, as `custody serve` builds it."""
    settings = Settings.from_env(deployment.env | env)
    return await build_runtime(settings, demo_keys=False, verify_upstream=False)


async def test_a_running_service_purges_by_itself(deployment: Deployed, tmp_path: Path) -> None:
    """`custody serve` with a one-second interval purges a conversation once it is due, as `scheduler`, with no command run, and stops cleanly on SIGTERM."""
    port = free_port()
    log = tmp_path / "serve.log"
    env = deployment.env | {"CUSTODY_PORT": str(port), "CUSTODY_RETENTION_INTERVAL_SECONDS": "1"}
    with log.open("w") as out:
        # Popen only forks and returns; the test polls the service without blocking the loop.
        process = subprocess.Popen(deployment.command("serve"), env=env, stdout=out, stderr=subprocess.STDOUT)  # noqa: ASYNC220
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, headers=deployment.tenant.headers()) as http:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, log.read_text()
                try:
                    if (await http.get("/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.1)
            opened = await http.post("/v1/conversations", json={"route": "public-faq", "data_classes": ["public"]})
            assert opened.status_code == 201, opened.text
            conversation = opened.json()["id"]
            assert (
                await http.post(f"/v1/conversations/{conversation}/turns", json={"input": "hours?"})
            ).status_code == 200
            kept = await http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": ["phi"]})
            assert kept.status_code == 201, kept.text
            await deployment.wait_until("SELECT count(*) FROM conversations WHERE id = :c", 0, c=conversation)
            assert (await http.get(f"/v1/conversations/{conversation}")).status_code == 404
            assert (await http.get(f"/v1/conversations/{kept.json()['id']}")).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 60)
    output = log.read_text()
    assert code == 0, output
    assert "Traceback" not in output
    [purge] = await deployment.records("retention.purge", resource={"id": conversation})
    [run] = await deployment.records("retention.run", resource={"id": purge["details"]["run_id"]})
    assert run["details"]["started_by"] == "scheduler"
    assert (
        await deployment.scalar("SELECT count(*) FROM upstream_interactions WHERE stored AND deleted_at IS NULL") == 0
    )
    # Stopped cleanly: no run is left marked as running.
    assert await deployment.column("SELECT status FROM retention_runs WHERE status = 'running'") == []


async def test_a_policy_change_is_picked_up_at_startup(deployment: Deployed, tmp_path: Path) -> None:
    """A service started under a new policy recomputes the stored deadlines at once, audited, even with the periodic runner off."""
    opened = [await deployment.open() for _ in range(3)]
    longer = tmp_path / "longer.yaml"
    longer.write_text(yaml.safe_dump(short_policy_document("P30D"), sort_keys=False), encoding="utf-8")
    new_version = load_policy(longer).version
    runtime = await runtime_on(deployment, CUSTODY_POLICY=str(longer), CUSTODY_RETENTION_INTERVAL_SECONDS="0")
    try:
        runtime.start_retention(runtime.settings.retention_interval_seconds)
        await deployment.wait_until(
            "SELECT count(*) FROM conversations WHERE retention_policy_version = :v AND delete_after = 'P7D'",
            len(opened),
            v=new_version,
        )
    finally:
        await runtime.aclose()
    [recompute] = await deployment.records("retention.recompute")
    assert (recompute["policy_version"], recompute["details"]["conversations"]) == (new_version, 3)
    assert await deployment.records("retention.run") == []  # the periodic runner is off
    # Their deadlines moved from two seconds after their last activity to seven (public-faq's own
    # rule, the strictest now that public says thirty days).
    assert await deployment.scalar(
        "SELECT count(*) FROM conversations WHERE purge_at = updated_at + interval '7 days'"
    ) == len(opened)


async def test_a_failed_round_is_logged_by_type_and_retried(
    deployment: Deployed, caplog: pytest.LogCaptureFixture
) -> None:
    """While the runner's bookkeeping table is missing each round fails and is logged by error type alone; once it is back the next round purges."""
    caplog.set_level(logging.INFO, logger="custody.runtime")
    conversation = await deployment.open()
    await deployment.wait_due(1)
    async with deployment.engine.begin() as connection:
        await connection.exec_driver_sql("ALTER TABLE retention_runs RENAME TO retention_runs_away")
    runtime = await runtime_on(deployment, CUSTODY_RETENTION_INTERVAL_SECONDS="1")
    try:
        runtime.start_retention(runtime.settings.retention_interval_seconds)
        deadline = time.monotonic() + 60
        while len(failures := [r for r in caplog.records if r.getMessage().startswith("retention run failed")]) < 2:
            assert time.monotonic() < deadline, caplog.text
            await asyncio.sleep(0.1)
        assert await deployment.scalar("SELECT count(*) FROM conversations") == 1
        async with deployment.engine.begin() as connection:
            await connection.exec_driver_sql("ALTER TABLE retention_runs_away RENAME TO retention_runs")
        await deployment.wait_until("SELECT count(*) FROM conversations WHERE id = :c", 0, c=conversation)
    finally:
        await runtime.aclose()
    assert {f.getMessage() for f in failures} == {"retention run failed (ProgrammingError); will retry"}
    assert all(f.levelno == logging.ERROR and f.exc_info is None for f in failures)
    assert len(await deployment.records("retention.run", outcome="error")) >= 2


async def test_aclose_ends_a_running_round_at_its_batch_end(deployment: Deployed) -> None:
    """Stopping the service during a run ends the run after the batch in hand (a run record saying so, nothing left running), and the next run purges the rest."""
    principal = await backend_principal(deployment)
    meta = RequestMeta(address=None, request_id=None)
    for _ in range(201):  # a batch is 200
        await open_conversation(
            deployment.ctx, principal, meta, route="public-faq", data_classes=["public"], subject=None, metadata=None
        )
    await deployment.wait_due(201)
    runtime = await runtime_on(deployment, CUSTODY_RETENTION_INTERVAL_SECONDS="3600")
    try:
        runtime.start_retention(runtime.settings.retention_interval_seconds)
        await deployment.wait_until("SELECT count(*) > 0 FROM deletion_receipts", True)
    finally:
        await runtime.aclose()
    [run] = await deployment.records("retention.run")
    assert (run["outcome"], run["reason"]) == ("error", "shutdown_requested")
    assert await deployment.column("SELECT status FROM retention_runs") == ["failed"]
    assert len(await deployment.records("retention.purge")) == 200  # the whole first batch, and no more
    assert await deployment.scalar("SELECT count(*) FROM deletion_receipts") == 200
    again = await runtime_on(deployment, CUSTODY_RETENTION_INTERVAL_SECONDS="3600")
    try:
        again.start_retention(again.settings.retention_interval_seconds)
        await deployment.wait_until("SELECT count(*) FROM conversations", 0)
    finally:
        await again.aclose()


async def backend_principal(deployment: Deployed) -> Principal:
    async with deployment.ctx.sessions() as session:
        return await authenticate(session, deployment.ctx.pepper, deployment.tenant.headers()["Authorization"])


@pytest.mark.parametrize(
    ("value", "parsed"),
    [(None, 3600.0), ("0", 0.0), ("1", 1.0), ("90.5", 90.5)],
    ids=["default-hourly", "zero-is-off", "one-second", "fraction"],
)
def test_the_interval_setting_parses_like_the_others(value: str | None, parsed: float) -> None:
    """CUSTODY_RETENTION_INTERVAL_SECONDS defaults to an hour and takes 0 (off) or any number of seconds from 1 up."""
    env = {} if value is None else {"CUSTODY_RETENTION_INTERVAL_SECONDS": value}
    settings = Settings.from_env(env)
    settings.check()
    assert settings.retention_interval_seconds == parsed


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("hourly", "must be a number of seconds"),
        ("-5", "non-negative"),
        ("inf", "finite"),
        ("0.5", "0 (off) or at least 1"),
    ],
    ids=["word", "negative", "infinite", "below-a-second"],
)
def test_a_bad_interval_stops_startup_naming_the_variable(value: str, problem: str) -> None:
    """A retention interval that does not parse, or would run back to back, is refused naming the variable."""
    with pytest.raises(ConfigurationError, match="CUSTODY_RETENTION_INTERVAL_SECONDS") as info:
        Settings.from_env({"CUSTODY_RETENTION_INTERVAL_SECONDS": value}).check()
    assert problem in str(info.value)


def test_serve_refuses_a_bad_interval_in_one_line(tmp_path: Path) -> None:
    """`custody serve` with an interval that does not parse exits 2 with one line naming the variable."""
    env = dict(os.environ) | {"CUSTODY_DATA_DIR": str(tmp_path), "CUSTODY_RETENTION_INTERVAL_SECONDS": "soon"}
    env.pop("DATABASE_URL", None)
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "custody: cannot start: CUSTODY_RETENTION_INTERVAL_SECONDS must be a number of seconds, not 'soon'"
    ]
