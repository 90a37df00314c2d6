"""Measures the test coverage of the turn engine and the conversations package, and prints it per module.

Runs `python -m coverage run -m pytest` over the in-process API, turns and conversations tests (the
suites that drive service/turns and service/conversations inside the test process; the reliability
suite runs the service in subprocesses, where this run does not see it) and prints statement and
branch coverage for each module of service/turns and service/conversations.

The settings come from `[tool.coverage.run]` in pyproject.toml: `concurrency = ["greenlet", "thread"]`
matters here, since SQLAlchemy's async layer runs our database code inside greenlets, and without
greenlet tracing coverage misses every line executed there.

    .venv/bin/python ops/coverage_report.py                  # the default test directories
    .venv/bin/python ops/coverage_report.py tests/turns      # other pytest arguments instead
    .venv/bin/python ops/coverage_report.py --missing        # also list the missed lines
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service/turns", "service/conversations")
# The suites that run the turn engine and the conversations code in the test process.
DEFAULT_TESTS = ("tests/api", "tests/turns", "tests/conversations")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pytest_args", nargs="*", help="what to pass to pytest (default: %(default)s)")
    parser.add_argument("--missing", action="store_true", help="list the missed lines and branches of each module")
    parser.add_argument("--data-file", help="where coverage keeps its data (default: a temporary directory)")
    args = parser.parse_args()
    pytest_args = args.pytest_args or [path for path in DEFAULT_TESTS if (ROOT / path).is_dir()]

    with tempfile.TemporaryDirectory(prefix="custody-coverage-") as scratch:
        data_file = args.data_file or str(Path(scratch) / ".coverage")
        run = [
            sys.executable,
            "-m",
            "coverage",
            "run",
            f"--data-file={data_file}",
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            *pytest_args,
        ]
        print("$", shlex.join(run), flush=True)
        tests = subprocess.run(run, cwd=ROOT, env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"})
        report_file = Path(scratch) / "coverage.json"
        include = ",".join(f"{package}/*" for package in PACKAGES)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "coverage",
                "json",
                f"--data-file={data_file}",
                f"--include={include}",
                "-o",
                str(report_file),
                "-q",
            ],
            cwd=ROOT,
            check=True,
        )
        report = json.loads(report_file.read_text(encoding="utf-8"))

    _print_report(report, missing=args.missing)
    if tests.returncode != 0:
        print(f"\npytest exited with {tests.returncode}: the figures cover the tests that ran.", file=sys.stderr)
    return tests.returncode


def _print_report(report: dict[str, Any], *, missing: bool) -> None:
    files: dict[str, Any] = report["files"]
    header = (
        f"{'module':<40} {'stmts':>6} {'miss':>5} {'branch':>6} {'part':>5} {'lines':>7} {'branches':>9} {'total':>7}"
    )
    for package in PACKAGES:
        print(f"\n{package}")
        print(header)
        print("-" * len(header))
        totals = dict.fromkeys(("num_statements", "missing_lines", "num_branches", "covered_branches"), 0)
        partial = 0
        for name in sorted(f for f in files if f.startswith(package + "/")):
            summary = files[name]["summary"]
            for key in totals:
                totals[key] += summary[key]
            partial += summary["num_partial_branches"]
            print(_row(name, summary, summary["num_partial_branches"]))
            if missing and (files[name]["missing_lines"] or files[name].get("missing_branches")):
                print(f"{'':<4}missed lines: {_ranges(files[name]['missing_lines'])}")
                arcs = [f"{a}->{b if b > 0 else 'exit'}" for a, b in files[name].get("missing_branches", [])]
                if arcs:
                    print(f"{'':<4}missed branches: {', '.join(arcs)}")
        print("-" * len(header))
        print(_row(f"{package} (all)", totals, partial))


def _row(name: str, summary: dict[str, Any], partial: int) -> str:
    statements, missed = summary["num_statements"], summary["missing_lines"]
    branches, covered = summary["num_branches"], summary["covered_branches"]
    lines_pct = 100.0 * (statements - missed) / statements if statements else 100.0
    branch_pct = 100.0 * covered / branches if branches else 100.0
    total = statements + branches
    total_pct = 100.0 * (statements - missed + covered) / total if total else 100.0
    return (
        f"{name:<40} {statements:>6} {missed:>5} {branches:>6} {partial:>5} "
        f"{lines_pct:>6.1f}% {branch_pct:>8.1f}% {total_pct:>6.1f}%"
    )


def _ranges(lines: list[int]) -> str:
    """[1, 2, 3, 7] -> '1-3, 7'."""
    spans: list[str] = []
    start = previous = None
    for line in lines:
        if start is None:
            start = previous = line
        elif previous is not None and line == previous + 1:
            previous = line
        else:
            spans.append(f"{start}-{previous}" if start != previous else f"{start}")
            start = previous = line
    if start is not None:
        spans.append(f"{start}-{previous}" if start != previous else f"{start}")
    return ", ".join(spans)


if __name__ == "__main__":
    sys.exit(main())
