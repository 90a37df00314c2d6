"""Fixtures for the reliability suite: throwaway Postgres clusters to kill, and how hard to push.

The suite runs in CI in a short form; `--reliability=full` runs the figures `docs/reliability.md`
reports (see `ops/reliability_report.py`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.database import migrate
from service.key_store import migrate_key_store
from service.simulator import FaultSpec, RunningSimulator

from .cluster import ThrowawayCluster, postgres_bin
from .evidence import Evidence
from .figures import Figures, recorded
from .replicas import ReplicaSet


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture(scope="session")
def full(request: pytest.FixtureRequest) -> bool:
    """Whether to run the full-size version of each scenario (`--reliability=full`)."""
    return bool(request.config.getoption("--reliability") == "full")


@pytest.fixture
def cluster() -> Iterator[ThrowawayCluster]:
    """A running Postgres cluster of this test's own, on a free port, destroyed afterwards."""
    if postgres_bin() is None:
        pytest.fail("the reliability suite needs the Postgres server binaries (initdb, pg_ctl)")
    # Not under pytest's temporary directory, which is private to us: as root, the server runs as
    # the postgres user and must be able to reach its data directory.
    root = Path(tempfile.mkdtemp(prefix="custody-pg-"))
    os.chmod(root, 0o755)  # noqa: S103 - the postgres user must traverse it (above); it holds no secret
    server = ThrowawayCluster(root / "pg")
    server.start()
    try:
        yield server
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def cluster_database(cluster: ThrowawayCluster) -> str:
    """A migrated Custody database on the throwaway cluster."""
    import asyncpg

    admin = await asyncpg.connect(cluster.url())
    try:
        await admin.execute('CREATE DATABASE "custody"')
        await admin.execute('CREATE DATABASE "custody_keys"')  # its key store, `key_store_of(url)`
    finally:
        await admin.close()
    url = cluster.url("custody")
    await asyncio.to_thread(migrate, url)
    await asyncio.to_thread(migrate_key_store, cluster.url("custody_keys"))
    return url


# --- added for the scenarios: evidence for the canary sweep, figures, replicas, model latency ----


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Every scenario's figures at the end of the run, whether or not its assertions held."""
    if not recorded:
        return
    terminalreporter.section("reliability figures")
    for line in recorded:
        figures = ", ".join(f"{name}={value}" for name, value in line["figures"].items())
        terminalreporter.write_line(f"{line['scenario']} [{line['size']}]: {figures}")


@pytest.fixture(scope="session")
def evidence(tmp_path_factory: pytest.TempPathFactory) -> Evidence:
    """What every scenario leaves for the canary sweep (test_s5_canary_sweep.py) to search."""
    return Evidence(tmp_path_factory.mktemp("reliability-evidence"))


@pytest.fixture
def figures(request: pytest.FixtureRequest, full: bool) -> Figures:
    """Records this test's figures (printed, summarised, and appended to CUSTODY_RELIABILITY_REPORT)."""
    return Figures(request.node.nodeid, "full" if full else "short")


@pytest.fixture
def replica_set(
    gemini: RunningSimulator,
    keyring_path: Path,
    signing_key_path: Path,
    pepper_path: Path,
    evidence: Evidence,
    tmp_path: Path,
) -> Iterator[ReplicaSet]:
    """Starts `custody serve` processes with the session's keyring, pepper and audit key, calling
    the test simulator; their logs go to the evidence directory; all are stopped at teardown."""
    replicas = ReplicaSet(
        base_env={
            "GEMINI_API_KEY": "test-key",
            "GOOGLE_GEMINI_BASE_URL": gemini.base_url,
            "CUSTODY_KEYRING": str(keyring_path),
            "CUSTODY_PEPPER_FILE": str(pepper_path),
            "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key_path),
        },
        log_dir=evidence.logs,
        data_root=tmp_path,
    )
    try:
        yield replicas
    finally:
        replicas.stop_all()


@pytest.fixture
def model_latency(gemini: RunningSimulator) -> Iterator[Callable[[float], None]]:
    """`model_latency(ms)` slows every later model call of the shared simulator; cleared at teardown."""

    def slow(milliseconds: float) -> None:
        gemini.app.faults.clear()
        gemini.app.inject(FaultSpec(latency_ms=milliseconds, count=10**9))

    gemini.app.reset()
    try:
        yield slow
    finally:
        gemini.app.reset()
