"""What the throughput, concurrency and replay benchmarks share: `--baseline REV` (the same
measurement against a service started from another revision, in a temporary git worktree) and
readings of processes from /proc (CPU time, resident memory, database backends, open connections).

Not a benchmark itself; the scripts import it as `side_by_side` (ops/bench is their sys.path[0]).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from turn_latency import REPO

_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Tree:
    """A checkout a service is started from: its label in the tables, where it is, what it holds."""

    label: str
    path: Path
    revision: str


def _git(*args: str, cwd: Path = REPO) -> str:
    git = shutil.which("git")
    if git is None:
        raise SystemExit("--baseline needs git on PATH")
    return subprocess.run([git, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def _confirm_service(path: Path) -> None:
    """Fail unless `python -m service` run from `path` imports `path`'s own service package (and
    not the editable install's, or another worktree's)."""
    found = subprocess.run(
        [sys.executable, "-c", "import service; print(service.__file__)"],
        cwd=path,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    if Path(found).resolve() != (path / "service" / "__init__.py").resolve():
        raise SystemExit(f"started from {path}, python imports service from {found}: the comparison would be void")


@contextmanager
def trees(baseline: str | None) -> Iterator[list[Tree]]:
    """This checkout, and with `baseline` also that revision checked out into a temporary git
    worktree under /tmp (removed afterwards); prints which `service` package each one runs."""
    head = _git("rev-parse", "--short", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    found = [Tree("current", REPO, head + (" + uncommitted changes" if dirty else ""))]
    scratch: Path | None = None
    try:
        if baseline is not None:
            commit = _git("rev-parse", "--verify", f"{baseline}^{{commit}}")
            scratch = Path(tempfile.mkdtemp(prefix=f"custody-baseline-{commit[:9]}-", dir="/tmp"))
            _git("worktree", "add", "--detach", str(scratch / "checkout"), commit)
            found.append(Tree("baseline", scratch / "checkout", commit[:9]))
        for tree in found:
            _confirm_service(tree.path)
            print(f"{tree.label:>8}: {tree.revision}, service package from {tree.path / 'service'}")
        yield found
    finally:
        if scratch is not None:
            if (scratch / "checkout").exists():
                _git("worktree", "remove", "--force", str(scratch / "checkout"))
            shutil.rmtree(scratch, ignore_errors=True)


def ratio(current: float, baseline: float) -> str:
    return f"{current / baseline:.2f}" if baseline else "-"


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """Columns right-aligned to their widest cell, the first (the row's name) left-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(
            "  ".join([row[0].ljust(widths[0]), *(cell.rjust(w) for cell, w in zip(row[1:], widths[1:], strict=True))])
        )


# --- /proc ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of a process (all its threads), in seconds; 0 once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0.0
    # The command name (field 2) may hold spaces; utime and stime are fields 14 and 15.
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def machine_busy_seconds() -> float:
    """CPU time the whole machine spent outside idle and I/O wait, summed over its cores."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / _TICKS


def memory_kib(pid: int, field: str = "VmRSS") -> int:
    """A line of /proc/<pid>/status in KiB: VmRSS (resident now) or VmHWM (the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise SystemExit(f"/proc/{pid}/status has no {field}")


class PostgresBackends:
    """The pids of the local Postgres server's backends connected to some databases, found by
    their process titles (`postgres: <cluster>: <user> <database> <host> <state>`)."""

    def __init__(self, databases: Iterable[str]) -> None:
        self._databases = set(databases)
        self._known: dict[int, bool] = {}  # a pid seen before, and whether it is one of ours

    def pids(self) -> list[int]:
        found = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            ours = self._known.get(pid)
            if ours is None:
                try:
                    title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except (FileNotFoundError, ProcessLookupError, PermissionError):
                    continue
                ours = title.startswith("postgres: ") and not self._databases.isdisjoint(title.split())
                self._known[pid] = ours
            if ours:
                found.append(pid)
        return found


def connections(pid: int, remote_port: int) -> int:
    """TCP connections a process holds established to `remote_port` (the simulator's, or
    Postgres's 5432): its sockets' inodes (/proc/<pid>/fd) looked up in /proc/net/tcp."""
    inodes = set()
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):
                target = os.readlink(entry.path)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except FileNotFoundError:
        return 0
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # fields: slot, local address:port, remote address:port, state (01: established), ..., inode
                if fields[3] == "01" and int(fields[2].rsplit(":", 1)[1], 16) == remote_port and fields[9] in inodes:
                    count += 1
    return count


def open_files_limit(pid: int) -> str:
    """The soft limit on open files of a process (each connection takes one)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


class Sampler:
    """Samples a set of readings every `interval` seconds in a thread while a window is open.

    CPU: each group (a name and a function listing its pids) gets the CPU time its processes used
    within the window; a process that appears in it counts from zero and one that ends in it up to
    its last sample (a database backend of a pooled connection may come and go). Gauges: the
    highest value each function returned in the window.
    """

    def __init__(
        self,
        groups: dict[str, Callable[[], Iterable[int]]] | None = None,
        gauges: dict[str, Callable[[], float]] | None = None,
        interval: float = 0.2,
    ) -> None:
        self._groups = groups or {}
        self._gauges = gauges or {}
        self._interval = interval
        self._first: dict[str, dict[int, float]] = {}
        self._last: dict[str, dict[int, float]] = {}
        self.peaks: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started = 0.0
        self._machine = 0.0
        # Filled in when the window closes: its length, the machine's busy CPU time, each group's.
        self.wall = 0.0
        self.machine = 0.0
        self.cpu: dict[str, float] = {}

    def __enter__(self) -> Sampler:
        self._first = {name: {pid: cpu_seconds(pid) for pid in pids()} for name, pids in self._groups.items()}
        self._last = {name: dict(first) for name, first in self._first.items()}
        self.peaks = {name: gauge() for name, gauge in self._gauges.items()}
        self._started, self._machine = time.perf_counter(), machine_busy_seconds()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        for name, pids in self._groups.items():
            for pid in pids():
                self._first[name].setdefault(pid, 0.0)
                self._last[name][pid] = max(self._last[name].get(pid, 0.0), cpu_seconds(pid))
        for name, gauge in self._gauges.items():
            self.peaks[name] = max(self.peaks[name], gauge())

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.wall = time.perf_counter() - self._started
        self.machine = machine_busy_seconds() - self._machine
        self.cpu = {
            name: sum(self._last[name][pid] - first for pid, first in self._first[name].items())
            for name in self._groups
        }
