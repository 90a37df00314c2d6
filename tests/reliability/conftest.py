"""Fixtures for the reliability suite: throwaway Postgres clusters to kill, and how hard to push.

The suite runs in CI in a short form; `--reliability=full` runs the figures `docs/reliability.md`
reports (see `ops/reliability_report.py`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from service.database import migrate

from .cluster import ThrowawayCluster, postgres_bin


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
    os.chmod(root, 0o755)
    server = ThrowawayCluster(root / "pg")
    server.start()
    try:
        yield server
    finally:
        server.destroy()
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
async def cluster_database(cluster: ThrowawayCluster) -> AsyncIterator[str]:
    """A migrated Custody database on the throwaway cluster."""
    import asyncpg

    admin = await asyncpg.connect(cluster.url())
    try:
        await admin.execute('CREATE DATABASE "custody"')
    finally:
        await admin.close()
    url = cluster.url("custody")
    await asyncio.to_thread(migrate, url)
    yield url
