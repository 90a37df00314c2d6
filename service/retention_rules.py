"""Retention rules: ISO 8601 durations, and how the rules of a conversation's route and classes
combine into the one rule that governs it.

Two durations make a rule: `delete_after`, counted from the conversation's last activity (the
longest a conversation may be kept once nobody uses it: data minimisation), and `keep_at_least`,
counted from its creation (the shortest it must be kept: a legal minimum, such as HIPAA's six
years). A route and each data class may state either.

When they disagree, the strictest wins: the longest `keep_at_least`, then the shortest
`delete_after` that still respects it (is at least that long). When every `delete_after` is
shorter than the governing `keep_at_least`, the conversation is purged once `keep_at_least` has
passed since its last activity. A conversation whose rules state no `delete_after` is never
purged by the runner (its deletion is left to the backend).

Durations compare by their approximate length (a year is 365.2425 days, a month 30.436875 days);
deadlines themselves are computed by Postgres, whose interval arithmetic is calendar-correct
(2024-01-31 + P1M is 2024-02-29).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Duration", "RetentionRule", "combine_rules"]

_ISO_DURATION = re.compile(
    r"P(?!$)(?:(?P<years>\d{1,4})Y)?(?:(?P<months>\d{1,5})M)?(?:(?P<weeks>\d{1,5})W)?(?:(?P<days>\d{1,6})D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d{1,7})H)?(?:(?P<minutes>\d{1,9})M)?(?:(?P<seconds>\d{1,10})S)?)?"
)
_SECONDS = {
    "years": 365.2425 * 86400,
    "months": 30.436875 * 86400,
    "weeks": 7 * 86400,
    "days": 86400,
    "hours": 3600,
    "minutes": 60,
    "seconds": 1,
}


@dataclass(frozen=True, order=False)
class Duration:
    """An ISO 8601 duration of whole units (`P6Y`, `P30D`, `PT12H`), kept as written."""

    iso: str
    approx_seconds: float

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Raises ValueError for anything but an ISO 8601 duration of whole units."""
        match = _ISO_DURATION.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"{text!r} is not an ISO 8601 duration of whole units (e.g. P30D, P6Y, PT12H)")
        seconds = sum(int(value) * _SECONDS[unit] for unit, value in match.groupdict().items() if value)
        return cls(text, seconds)

    def __str__(self) -> str:
        return self.iso


@dataclass(frozen=True)
class RetentionRule:
    """What one source (a route, a data class, or their combination) says about retention."""

    delete_after: Duration | None = None
    keep_at_least: Duration | None = None

    def check(self, where: str) -> None:
        """A rule that would delete before it must keep is a contradiction in the policy."""
        if (
            self.delete_after is not None
            and self.keep_at_least is not None
            and self.delete_after.approx_seconds < self.keep_at_least.approx_seconds
        ):
            raise ValueError(
                f"{where}: delete_after {self.delete_after} is shorter than keep_at_least {self.keep_at_least}"
            )


def combine_rules(rules: Iterable[RetentionRule]) -> RetentionRule:
    """The one rule that governs a conversation whose route and classes state `rules`."""
    rules = list(rules)
    keeps = [r.keep_at_least for r in rules if r.keep_at_least is not None]
    deletes = [r.delete_after for r in rules if r.delete_after is not None]
    keep = max(keeps, key=lambda d: d.approx_seconds) if keeps else None
    if not deletes:
        return RetentionRule(None, keep)
    respecting = [d for d in deletes if keep is None or d.approx_seconds >= keep.approx_seconds]
    delete = min(respecting, key=lambda d: d.approx_seconds) if respecting else keep
    return RetentionRule(delete, keep)
