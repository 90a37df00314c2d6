"""`custody serve` as a process of its own, for tests that need a real server (signals, replicas)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class ServiceProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, bound: float = 60.0) -> None:
        """Until /readyz answers 200; fails with the process's output if it dies or `bound` passes."""
        deadline = time.monotonic() + bound
        while True:
            assert self.process.poll() is None, f"custody serve exited:\n{self.output()}"
            try:
                if httpx.get(f"{self.url}/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"custody serve at {self.url} did not become ready:\n{self.output()}"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_service(env: dict[str, str], log: Path) -> ServiceProcess:
    """`python -m service serve` with `env` (CUSTODY_PORT is chosen here), not yet ready."""
    port = free_port()
    with log.open("w") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "serve"],
            env=env | {"CUSTODY_PORT": str(port)},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    return ServiceProcess(process, f"http://127.0.0.1:{port}", log)
