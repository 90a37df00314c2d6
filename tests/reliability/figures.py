"""Each scenario's figures: printed, kept for the session summary, and appended to CUSTODY_RELIABILITY_REPORT."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Any

__all__ = ["REPORT_VARIABLE", "Figures", "recorded"]

# ops/reliability_report.py sets this and builds docs/reliability.md from the lines.
REPORT_VARIABLE = "CUSTODY_RELIABILITY_REPORT"

# Every line recorded in this session, for the terminal summary (conftest.py).
recorded: list[dict[str, Any]] = []


@dataclass
class Figures:
    """The figures of one test: `record` once the scenario has run, before its assertions, so
    that a failing scenario still reports what it saw."""

    test: str
    size: str
    lines: list[dict[str, Any]] = field(default_factory=list)

    def record(self, scenario: str, done: str, **figures: Any) -> dict[str, Any]:
        line = {"scenario": scenario, "test": self.test, "size": self.size, "done": done, "figures": figures}
        self.lines.append(line)
        recorded.append(line)
        print(f"\n[reliability] {scenario}: {json.dumps(figures, sort_keys=True)}", file=sys.stderr)
        target = os.environ.get(REPORT_VARIABLE)
        if target:
            with open(target, "a", encoding="utf-8") as report:
                report.write(json.dumps(line, sort_keys=True) + "\n")
        return line
