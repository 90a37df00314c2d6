"""A throwaway Postgres cluster of the test's own, to kill and restart without touching the machine's."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["ThrowawayCluster", "postgres_bin"]


def postgres_bin() -> Path | None:
    """The directory of the server binaries (initdb, pg_ctl, postgres), if this machine has them."""
    for candidate in sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True):
        if (candidate / "initdb").exists():
            return candidate
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ThrowawayCluster:
    """initdb + pg_ctl on a free port under `root`; Postgres refuses to run as root, so as root
    the server runs as the `postgres` system user."""

    def __init__(self, root: Path) -> None:
        binaries = postgres_bin()
        if binaries is None:
            raise RuntimeError("no Postgres server binaries (initdb) on this machine")
        self.bin = binaries
        self.root = root
        self.data = root / "data"
        self.port = _free_port()
        self._as_postgres = os.geteuid() == 0
        root.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(root, "postgres")
            root.chmod(0o755)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{root}'\n")
            # Crash tests kill the server over and over: durability settings stay on (fsync), so
            # that what a commit acknowledged survives each kill, as in production.
            conf.write("max_connections = 200\n")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *command: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        subprocess.run([*prefix, *command], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "start")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def kill(self) -> None:
        """SIGKILL the postmaster and every backend, as a machine crash would; wait until they are gone."""
        pid_file = self.data / "postmaster.pid"
        postmaster = int(pid_file.read_text().splitlines()[0])
        pgrep = shutil.which("pgrep")
        assert pgrep is not None, "killing the cluster needs pgrep (procps)"
        children = subprocess.run([pgrep, "-P", str(postmaster)], capture_output=True, text=True).stdout.split()
        for pid in [postmaster, *map(int, children)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        for pid in [postmaster, *map(int, children)]:
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.02)

    def destroy(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            self.kill()
        shutil.rmtree(self.root, ignore_errors=True)
