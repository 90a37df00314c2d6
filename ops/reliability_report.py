"""Runs the reliability suite at full size and writes its figures to docs/reliability.md."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "reliability.md"
PYTEST = ["-m", "pytest", "tests/reliability", "--reliability=full", "-p", "no:cacheprovider"]

# What each scenario proves, keyed by the number its figures line starts with.
PROOFS = {
    "1": (
        "Three `custody serve` processes share one Postgres and race fifty turns on a single conversation. The "
        "conversation row lock plus the lease serialise them across processes: every acknowledged (200) input is "
        "stored exactly once, in the order of the turn numbers the service handed out (1..n, no gaps), every refused "
        "(409 turn-in-progress) input is stored nowhere and consumes no number, step positions run from 0 without a "
        "gap or a fork, no turn row is left `in_progress`, each turn has its `turn.create` record and each refusal "
        "its `turn.start` denial, the tenant's audit chain still verifies, and the strict simulator accepts the whole "
        "replayed history afterwards."
    ),
    "2": (
        "The database is SIGKILLed (postmaster and backends, as in a machine crash) while model calls are in flight "
        "and concurrent clients keep sending turns, each retrying its own turn with its Idempotency-Key on 409, 5xx "
        "or a dropped connection. Replies the model gave while the database was down are kept in memory and stored "
        "once it is back; claims whose commit was lost are closed as abandoned when their lease runs out. No "
        "acknowledged turn is lost, none is stored twice, each history is exactly the acknowledged inputs in order, "
        "replaying every key afterwards returns the stored turn without running it again, database errors reach "
        "clients as 503 (never 500), and the longest time a conversation stays blocked after the database is back "
        "is reported (it is bounded by the lease: a claim whose acknowledgement died with the database holds the "
        "conversation until its lease expires)."
    ),
    "3": (
        "A replica dies after the model answered and before its finishing transaction committed (the test holds the "
        "conversation row so that transaction provably waits in `pg_stat_activity`, then SIGKILLs the process). "
        "Nothing of the dead replica's turn is stored; the client's retry with the same Idempotency-Key on another "
        "replica is refused (409 in flight) until the lease expires, then takes over: the abandoned turn is closed "
        "as failed/`abandoned` with its `turn.create` record (outcome error, reason `abandoned`) against the key "
        "that started it, the turn runs once more, exactly one answer is stored, and a replay of the key returns it. "
        "The blocked time is the remaining lease plus the takeover."
    ),
    "3b": (
        "A replica that loses the database (a cut network link, not a crash) for longer than its lease, while the "
        "client's retry takes its turn over on another replica, must not disturb the retried turn when it comes "
        "back: its late finish is refused (the lease is no longer its own) and its release of its own lost turn "
        "touches nothing of the retried turn, so the retried turn's response is stored under the Idempotency-Key "
        "and a replay of the key returns it instead of running the turn a second time."
    ),
    "4": (
        "Stored ciphertexts are bound to where they belong: AES-GCM with the tenant, conversation, position (or turn "
        "number) and key version as associated data, and data keys under AES key wrap. Every bit flip and every swap "
        "of a step, a profile, a wrapped data key or a stored idempotent response, between positions, conversations "
        "and tenants, is refused on the read that meets it (history listing, conversation read, a new turn, an "
        "idempotent replay) with `500 urn:custody:problem:stored-data-unreadable` as problem+json, never with "
        "someone else's or altered content, and each failed read has its audit record (outcome error, reason "
        "`decryption` or `key_unwrap`); the restored row reads again and the audit chains still verify."
    ),
    "5": (
        "Every turn of the scenarios above carried the canary in its content (and subjects and metadata carried it "
        "too). Afterwards it appears nowhere outside the ciphertext: not in the replicas' logs, the in-process spans, "
        "any non-2xx body a client received, any audit record, any table row read as text, or a pg_dump of the "
        "session database and of the killed cluster, searched both as text and as bytea hex."
    ),
}
# Said under the figures while the scenario fails: what is wrong in the service, for its owner.
DIAGNOSES: dict[str, str] = {}
COLUMNS = [
    ("Turns", ("turns",)),
    ("Kills", ("kills",)),
    ("Lost", ("lost",)),
    ("Duplicated", ("duplicated",)),
    ("Longest blocked (s)", ("longest_blocked_seconds", "blocked_seconds")),
    ("Refusal rate", ("refusal_rate",)),
    ("Canary hits", ("canary_hits",)),
]


def _outcomes(junit: Path) -> dict[str, tuple[str, str]]:
    """Test node id -> (passed | failed | skipped, first line of the failure message)."""
    outcomes: dict[str, tuple[str, str]] = {}
    if not junit.exists():
        return outcomes
    # The JUnit XML of the pytest run this script just made, not outside input.
    for case in ElementTree.parse(junit).getroot().iter("testcase"):  # noqa: S314
        path = case.get("classname", "").replace(".", "/") + ".py"
        node = f"{path}::{case.get('name')}"
        failure = case.find("failure")
        if failure is None:
            failure = case.find("error")
        if failure is not None:
            outcomes[node] = ("failed", (failure.get("message") or "").splitlines()[0][:300])
        elif case.find("skipped") is not None:
            outcomes[node] = ("skipped", "")
        else:
            outcomes[node] = ("passed", "")
    return outcomes


def _cell(value: Any) -> str:
    if value is None:
        return "\N{EN DASH}"
    if isinstance(value, (dict, list)):
        value = json.dumps(value, sort_keys=True)
    return str(value).replace("|", "\\|").replace("\n", " ")


def _postgres_version() -> str:
    """The version of the server binaries the throwaway clusters run (as tests/reliability/cluster.py finds them)."""
    for binary in sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"), reverse=True):
        return subprocess.run([str(binary), "--version"], capture_output=True, text=True).stdout.strip()
    return "Postgres version unknown"


def _order(line: dict[str, Any]) -> tuple[int, str]:
    """Scenarios in their numbers' order: 1, 2, 3, 3b, 4, 5."""
    key = _scenario_key(line)
    digits = "".join(ch for ch in key if ch.isdigit())
    return int(digits or 0), key


def _scenario_key(line: dict[str, Any]) -> str:
    """The number a scenario's name starts with: 3b for "3b. holder that lost its lease comes back"."""
    return str(line["scenario"]).split(".", 1)[0]


def _render(
    lines: list[dict[str, Any]], outcomes: dict[str, tuple[str, str]], command: str, seconds: float, code: int
) -> str:
    head = ["Scenario", "What was done", "Result", *(name for name, _ in COLUMNS), "Other figures"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    failures = []
    for line in sorted(lines, key=_order):
        figures = dict(line["figures"])
        result, message = outcomes.get(line["test"], ("unknown", ""))
        if message:
            failures.append(f"- `{line['test']}`: {message}")
        shown = []
        for _, names in COLUMNS:
            value = next((figures.pop(name) for name in names if name in figures), None)
            shown.append(_cell(value))
        other = "; ".join(f"{name} {_cell(value)}" for name, value in figures.items())
        cells = [_cell(line["scenario"]), _cell(line["done"]), result, *shown, other or "\N{EN DASH}"]
        rows.append("| " + " | ".join(cells) + " |")
    others = sorted(node for node in outcomes if node not in {line["test"] for line in lines})
    paragraphs = []
    for line in sorted(lines, key=_order):
        key, result = _scenario_key(line), outcomes.get(line["test"], ("unknown", ""))[0]
        paragraphs.append(f"**{line['scenario']}** ({result}). {PROOFS.get(key, '')}".rstrip())
        if result == "failed" and key in DIAGNOSES:
            paragraphs.append(f"*Defect found by scenario {key}:* {DIAGNOSES[key]}")
    passed = sum(1 for result, _ in outcomes.values() if result == "passed")
    failed = sum(1 for result, _ in outcomes.values() if result == "failed")
    parts = [
        "# Reliability",
        "",
        "Figures from the reliability suite (`tests/reliability`) at full size, produced by "
        "`ops/reliability_report.py`; CI runs the same scenarios in their short form (`pytest tests/reliability`, "
        "or the whole suite). Nothing here is a speed claim: the times are what this machine took.",
        "",
        f"- Date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Machine: {os.cpu_count()} CPUs (nproc), {platform.platform()}, Python {platform.python_version()}, "
        f"{_postgres_version()}",
        f"- Command: `{command}` (run by `.venv/bin/python ops/reliability_report.py`)",
        f"- Outcome: {passed} passed, {failed} failed (pytest exit code {code}) in {seconds:.0f} s",
        "",
        "## Figures",
        "",
        *rows,
        "",
    ]
    if failures:
        parts += ["## Failures", "", *failures, ""]
    if others:
        parts += [
            "Other tests in the package (no figures of their own): "
            + ", ".join(f"`{node}` ({outcomes[node][0]})" for node in others),
            "",
        ]
    parts += ["## What each scenario proves", ""]
    for paragraph in paragraphs:
        parts += [paragraph, ""]
    return "\n".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=OUTPUT, help="where to write the report (docs/reliability.md)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="custody-reliability-") as scratch:
        figures_file = Path(scratch) / "figures.jsonl"
        junit = Path(scratch) / "junit.xml"
        argv = [sys.executable, *PYTEST, f"--junitxml={junit}"]
        env = os.environ | {"CUSTODY_RELIABILITY_REPORT": str(figures_file)}
        command = f"CUSTODY_RELIABILITY_REPORT={figures_file} " + shlex.join(
            [
                os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(str(ROOT)) else sys.executable,
                *argv[1:],
            ]
        )
        print(f"running: {command}", flush=True)
        started = time.monotonic()
        code = subprocess.run(argv, cwd=ROOT, env=env).returncode
        seconds = time.monotonic() - started
        lines = [json.loads(raw) for raw in figures_file.read_text().splitlines()] if figures_file.exists() else []
        report = _render(lines, _outcomes(junit), command, seconds, code)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(f"wrote {args.output} ({len(lines)} scenario figures, pytest exit code {code}, {seconds:.0f} s)", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
