"""The embedded Postgres: a real pgserver instance in a temporary data dir."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from service.database import make_engine
from service.embedded_postgres import EmbeddedPostgres, start_embedded_postgres
from service.errors import ConfigurationError

REPO_ROOT = Path(__file__).resolve().parents[1]
# A second Custody process: starts on the given data dir, prints its URL, holds on until stdin
# closes (or until it is killed).
HOLDER = """
import sys
from pathlib import Path
from service.embedded_postgres import start_embedded_postgres
print(start_embedded_postgres(Path(sys.argv[1])).url, flush=True)
sys.stdin.read()
"""


def _postmaster_pid(data_path: Path) -> int | None:
    """The pid of the server running on data_path, or None when none is."""
    try:
        pid = int((data_path / "postmaster.pid").read_text().splitlines()[0])
        os.kill(pid, 0)
    except (FileNotFoundError, ProcessLookupError):
        return None
    return pid


def _kill_leftover(data_path: Path) -> None:
    # A safety net so a failing test does not leave a server behind; SIGINT is a fast shutdown.
    pid = _postmaster_pid(data_path)
    if pid is not None:
        os.kill(pid, signal.SIGINT)
        for _ in range(100):
            if _postmaster_pid(data_path) is None:
                return
            time.sleep(0.05)


@contextmanager
def _scratch_dir() -> Iterator[Path]:
    # Not tmp_path: as root, Postgres runs as the user `pgserver`, which must traverse every
    # ancestor of its data dir, and each pytest session (others may run concurrently) resets
    # /tmp/pytest-of-root to mode 0700.
    with tempfile.TemporaryDirectory(prefix="custody-pg-") as name:
        try:
            yield Path(name)
        finally:
            _kill_leftover(Path(name) / "postgres")


@pytest.fixture
def data_dir() -> Iterator[Path]:
    with _scratch_dir() as path:
        yield path


@pytest.fixture(scope="module")
def embedded() -> Iterator[EmbeddedPostgres]:
    """One server for the tests that only use it; a first start costs about a second."""
    with _scratch_dir() as path, start_embedded_postgres(path) as server:
        yield server


def _holder(data_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(data_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )


async def test_asyncpg_reaches_the_created_database(embedded: EmbeddedPostgres) -> None:
    """asyncpg connects with the returned URL, to the `custody` database it created."""
    connection = await asyncpg.connect(embedded.url)
    try:
        assert await connection.fetchval("SELECT current_database()") == "custody"
    finally:
        await connection.close()


async def test_sqlalchemy_async_engine_accepts_the_url(embedded: EmbeddedPostgres) -> None:
    """Custody's SQLAlchemy asyncpg engine runs a query through the unix-socket URL."""
    engine = make_engine(embedded.url)
    try:
        async with engine.connect() as connection:
            assert (await connection.execute(text("SELECT 1 + 1"))).scalar_one() == 2
    finally:
        await engine.dispose()


def test_starting_again_in_one_process_joins_the_running_server(
    embedded: EmbeddedPostgres,
) -> None:
    """A second start on the same data dir returns the same server, not a new one."""
    pid = _postmaster_pid(embedded.data_path)
    again = start_embedded_postgres(embedded.data_path.parent)
    assert again == embedded
    assert _postmaster_pid(embedded.data_path) == pid


async def test_a_restart_keeps_the_data(data_dir: Path) -> None:
    """After stop, a new start on the same data dir runs a new server over the same data."""
    with start_embedded_postgres(data_dir) as first:
        first_pid = _postmaster_pid(first.data_path)
        connection = await asyncpg.connect(first.url)
        await connection.execute("CREATE TABLE kept (n int); INSERT INTO kept VALUES (7)")
        await connection.close()
    with start_embedded_postgres(data_dir) as second:
        assert second.url == first.url
        assert _postmaster_pid(second.data_path) not in (None, first_pid)
        connection = await asyncpg.connect(second.url)
        assert await connection.fetchval("SELECT n FROM kept") == 7
        await connection.close()


async def test_stop_shuts_the_server_down(data_dir: Path) -> None:
    """stop() ends the server process, and the URL no longer connects."""
    server = start_embedded_postgres(data_dir)
    assert _postmaster_pid(server.data_path) is not None
    server.stop()
    assert _postmaster_pid(server.data_path) is None
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):  # the socket is gone, or dead
        await asyncpg.connect(server.url)


def test_another_process_keeps_a_shared_server_running(data_dir: Path) -> None:
    """A server another live process shares survives this process's stop, until that one exits."""
    holder = _holder(data_dir)
    try:
        assert holder.stdout is not None
        url = holder.stdout.readline().strip()
        server = start_embedded_postgres(data_dir)
        assert server.url == url
        server.stop()
        assert _postmaster_pid(server.data_path) is not None
    finally:
        holder.communicate(timeout=30)  # closes its stdin: a normal exit, running atexit hooks
    assert _postmaster_pid(data_dir / "postgres") is None


def test_a_killed_process_does_not_keep_the_server_alive_forever(data_dir: Path) -> None:
    """A process killed without exit hooks is forgotten, so the next user's stop still stops."""
    holder = _holder(data_dir)
    try:
        assert holder.stdout is not None
        holder.stdout.readline()
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    server = start_embedded_postgres(data_dir)  # joins the orphaned server
    server.stop()
    assert _postmaster_pid(server.data_path) is None


def test_an_unusable_data_dir_is_a_configuration_error(tmp_path: Path) -> None:
    """A data dir that is a file gives a ConfigurationError naming the path."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(ConfigurationError, match=re.escape(str(not_a_dir))):
        start_embedded_postgres(not_a_dir)


def test_a_failed_start_reports_the_reason_from_postgres(data_dir: Path) -> None:
    """When initdb refuses a non-empty directory, the ConfigurationError carries its reason."""
    (data_dir / "postgres").mkdir()
    (data_dir / "postgres" / "notes.txt").write_text("not a Postgres data dir")
    with pytest.raises(ConfigurationError, match="exists but is not empty"):
        start_embedded_postgres(data_dir)


def test_a_data_dir_with_spaces_is_refused_before_starting(tmp_path: Path) -> None:
    """A path with a space, which pg_ctl cannot pass to postgres, is refused up front."""
    with pytest.raises(ConfigurationError, match="spaces"):
        start_embedded_postgres(tmp_path / "my data")
    assert not (tmp_path / "my data").exists()
