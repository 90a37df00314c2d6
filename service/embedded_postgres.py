"""The zero-config database: an embedded Postgres (pgserver) under Custody's data dir."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING
from urllib.parse import quote

from .errors import ConfigurationError

if TYPE_CHECKING:
    from pgserver.postgres_server import PostgresServer

__all__ = ["EmbeddedPostgres", "check_installed", "start_embedded_postgres"]

# The superuser pgserver's initdb creates; every local connection is trusted, so no password.
_USER = "postgres"
# pg_ctl passes the socket directory to postgres through /bin/sh without quoting, so a path with
# whitespace or shell syntax fails deep in the server log ("invalid argument"); refuse it upfront.
_SAFE_PATH = re.compile(r"[\w./+@:,=%~-]+")
# Postgres has no CREATE DATABASE IF NOT EXISTS; %I and :'db' quote the name, so any name is safe.
_CREATE_DATABASE = r"""
SELECT format('CREATE DATABASE %I', :'db')
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'db') \gexec
"""
# pgserver hides the output of initdb and pg_ctl (and the server log) in its ERROR log records;
# these lines are the reason a newcomer needs, e.g. "initdb: error: directory … is not empty".
_REASON_LINE = re.compile(r"^.*\b(?:error|fatal|panic):[ \t]+\S.*$", re.IGNORECASE | re.MULTILINE)
_REASONS_SHOWN = 3
_NOT_INSTALLED = (
    "DATABASE_URL is not set and the zero-config run's embedded Postgres is not installed: set DATABASE_URL "
    "to a Postgres server, or install the extra with pip install 'custody[embedded]'"
)


@dataclass(frozen=True)
class EmbeddedPostgres:
    """A running embedded server: `url` reaches its database over a unix socket."""

    url: str
    data_path: Path
    _server: PostgresServer = field(repr=False, compare=False)
    _admin_url: str = field(default="", repr=False, compare=False)
    _socket_query: str = field(default="", repr=False, compare=False)

    def database_url(self, database: str) -> str:
        """The URL of another database on this server, created when missing (the key store's)."""
        _ensure_database(self._admin_url, database, self.data_path)
        return f"postgresql://{_USER}@/{quote(database, safe='')}?{self._socket_query}"

    def stop(self) -> None:
        """Stop the server, unless another live process still uses it.

        pgserver counts users per process, not per handle: every start in one process shares one
        server, and this stops it for all of them. Without a call the server stops when the
        process exits normally (pgserver's atexit hook).
        """
        self._server.cleanup()

    def __enter__(self) -> EmbeddedPostgres:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def check_installed() -> None:
    """Refuse, saying what to do, when the embedded Postgres (an optional extra) is not installed:
    a deployment, and the container image, have no use for a whole Postgres server in the package."""
    if importlib.util.find_spec("pgserver") is None:
        raise ConfigurationError(_NOT_INSTALLED)


def start_embedded_postgres(data_dir: Path, database: str = "custody") -> EmbeddedPostgres:
    """Start (or join, if already running) the server under `data_dir / "postgres"`.

    Creates `database` when it is missing. Blocking: about a second on a new data dir (initdb),
    a tenth of one to restart an existing one, nothing much to join a running one.
    """
    data_path = (data_dir / "postgres").expanduser().resolve()
    if not _SAFE_PATH.fullmatch(str(data_path)):
        raise ConfigurationError(
            f"the embedded Postgres cannot run in {data_path}: its path may not contain spaces or "
            "shell characters; set CUSTODY_DATA_DIR to another directory or DATABASE_URL to a "
            "Postgres server"
        )
    try:
        data_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigurationError(
            f"cannot create the data dir {data_path.parent} for the embedded Postgres: {err}"
        ) from err

    # Imported on first use: importing pgserver lists its binaries and, without XDG_RUNTIME_DIR
    # (containers, CI), warns that its lock lives under /tmp/runtime-<uid>, which is fine here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
        try:
            from pgserver.postgres_server import get_server
        except ImportError:
            raise ConfigurationError(_NOT_INSTALLED) from None
    reasons = _ReasonCapture()
    pgserver_logger = logging.getLogger("pgserver")
    pgserver_logger.addHandler(reasons)
    try:
        _forget_dead_handles(data_path)
        # As root, pgserver runs Postgres (which refuses root) as a system user `pgserver` that it
        # creates with useradd, chowns data_path to it and opens data_path's ancestors to o+rx.
        server = get_server(data_path, cleanup_mode="stop")
        # Inside the try: after a failed start pgserver caches a broken server, which asserts.
        info = server.get_postmaster_info()
    except (OSError, subprocess.SubprocessError, RuntimeError, AssertionError) as err:
        raise ConfigurationError(
            f"the embedded Postgres in {data_path} did not start ({_describe(err)})"
            f"{reasons.summary()}; set DATABASE_URL to use another Postgres server"
        ) from err
    finally:
        pgserver_logger.removeHandler(reasons)

    if info.socket_dir is None or info.port is None:
        raise ConfigurationError(f"the embedded Postgres in {data_path} has no unix socket")
    # The socket directory goes in the query, the one place asyncpg, SQLAlchemy and libpq all
    # accept it; `port` names the socket file (.s.PGSQL.<port>), so PGPORT cannot mislead clients.
    socket_query = f"host={quote(str(info.socket_dir), safe='/')}&port={info.port}"
    admin_url = f"postgresql://{_USER}@/postgres?{socket_query}"
    _ensure_database(admin_url, database, data_path)
    url = f"postgresql://{_USER}@/{quote(database, safe='')}?{socket_query}"
    return EmbeddedPostgres(
        url=url, data_path=data_path, _server=server, _admin_url=admin_url, _socket_query=socket_query
    )


def _forget_dead_handles(data_path: Path) -> None:
    """Drop pgserver's records of processes that died without running their exit hooks.

    pgserver stops the server when the last process in `.handle_pids.json` exits, but a process
    killed by SIGKILL or an unhandled SIGTERM never removes itself, so without this the server
    would never be stopped again. It assumes one pid namespace, as pgserver itself does.
    """
    import fasteners  # type: ignore[import-untyped]  # no type information shipped
    from pgserver.postgres_server import PostgresServer
    from pgserver.utils import DiskList

    handles = DiskList(data_path / ".handle_pids.json")
    # The lock pgserver takes (on the same file) around every change to that list.
    with fasteners.InterProcessLock(PostgresServer.lock_path):
        pids = handles.get()
        alive = [pid for pid in pids if _process_exists(pid)]
        if alive != pids:
            handles.put(alive)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it just belongs to someone else
        return True
    return True


def _ensure_database(admin_url: str, database: str, data_path: Path) -> None:
    from pgserver._commands import POSTGRES_BIN_PATH  # the binaries pgserver runs

    command = [
        str(POSTGRES_BIN_PATH / "psql"),
        "--no-psqlrc",
        "--quiet",
        "--set=ON_ERROR_STOP=1",
        f"--set=db={database}",
        f"--dbname={admin_url}",
    ]
    # Two processes starting at once can both find the database missing; the loser's CREATE
    # fails with "already exists", and its second attempt then finds the database there.
    for _attempt in range(2):
        # pgserver's own psql, an argument list and no shell; the name goes in as a psql variable.
        result = subprocess.run(  # noqa: S603
            command,
            input=_CREATE_DATABASE,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if result.returncode == 0:
            return
    raise ConfigurationError(
        f"could not create the database {database!r} in the embedded Postgres in {data_path}: {result.stderr.strip()}"
    )


def _describe(err: Exception) -> str:
    if isinstance(err, subprocess.CalledProcessError):
        # pgserver's own logger has the command's output; its argument list is only noise here.
        return f"{Path(err.cmd[0]).name} exited with status {err.returncode}"
    return f"{type(err).__name__}: {err}"


class _ReasonCapture(logging.Handler):
    """Collects the error lines from pgserver's log records while it starts a server."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        for line in _REASON_LINE.findall(record.getMessage()):
            if line.strip() not in self.lines:
                self.lines.append(line.strip())

    def summary(self) -> str:
        return ": " + " | ".join(self.lines[-_REASONS_SHOWN:]) if self.lines else ""
