"""`custody serve` replica processes on a database of the test's choosing, to race and to kill."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from ..conftest import key_store_of

__all__ = ["Replica", "ReplicaSet", "with_application_name"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def with_application_name(url: str, name: str) -> str:
    """The database URL with libpq's application_name, so pg_stat_activity tells replicas apart."""
    return f"{url}{'&' if '?' in url else '?'}application_name={name}"


@dataclass
class Replica:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL, as a machine or OOM kill would: no shutdown hook runs, nothing is drained."""
        if self.alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class ReplicaSet:
    """Starts replicas with the shared secrets; stops every one it started at teardown."""

    base_env: dict[str, str]
    log_dir: Path
    data_root: Path
    started: list[Replica] = field(default_factory=list)

    async def start(
        self, count: int, *, database_url: str, label: str, env: dict[str, str] | None = None
    ) -> list[Replica]:
        """`count` replicas on `database_url`, started together and waited for until ready."""
        replicas = []
        for index in range(count):
            name = f"{label}-{index}"
            port = _free_port()
            process_env = (
                os.environ
                | self.base_env
                | {
                    "DATABASE_URL": with_application_name(database_url, name),
                    "CUSTODY_KEY_STORE_URL": with_application_name(key_store_of(database_url), name),
                    "CUSTODY_DATA_DIR": str(self.data_root / name),
                    "CUSTODY_PORT": str(port),
                }
                | (env or {})
            )
            log = self.log_dir / f"{name}.log"
            with log.open("wb") as sink:
                # Popen only forks and returns; the replica stays a Popen, which teardown stops from sync code.
                process = subprocess.Popen(  # noqa: ASYNC220
                    [sys.executable, "-m", "service", "serve"], env=process_env, stdout=sink, stderr=subprocess.STDOUT
                )
            replica = Replica(name, f"http://127.0.0.1:{port}", process, log)
            self.started.append(replica)
            replicas.append(replica)
        await asyncio.gather(*(self._ready(replica) for replica in replicas))
        return replicas

    async def _ready(self, replica: Replica) -> None:
        # Generous: three interpreters importing the service at once on two cores take a while.
        deadline = time.monotonic() + 90
        async with httpx.AsyncClient(timeout=5) as http:
            while time.monotonic() < deadline:
                if not replica.alive():
                    raise AssertionError(f"replica {replica.name} exited:\n{replica.log.read_text()[-4000:]}")
                try:
                    if (await http.get(f"{replica.url}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"replica {replica.name} did not become ready:\n{replica.log.read_text()[-4000:]}")

    def stop_all(self) -> None:
        for replica in self.started:
            if replica.alive():
                replica.process.terminate()
        for replica in self.started:
            replica.stop()
