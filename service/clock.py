"""The clock deadlines are compared with: the database's, moved forward in tests.

Retention deadlines live in the database (`keep_until`, `purge_at`, a provider copy's age) and
are compared with the database's own clock, so that every replica agrees. Tests and the
simulator must move conversations past their deadlines without sleeping: `advance` adds an
offset to that clock for every deadline comparison Custody makes. Production never advances it.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func
from sqlalchemy.sql.elements import ColumnElement

__all__ = ["Clock"]


class Clock:
    def __init__(self) -> None:
        self._offset = timedelta(0)

    def now(self) -> ColumnElement:  # type: ignore[type-arg]
        """`now()` on the database, plus whatever the tests advanced the clock by."""
        return func.now() + self._offset if self._offset else func.now()

    def current(self) -> ColumnElement:  # type: ignore[type-arg]
        """`clock_timestamp()` plus the offset: the time as the statement runs, not as its
        transaction began (`now()`), for decisions that must follow a lock just taken."""
        return func.clock_timestamp() + self._offset if self._offset else func.clock_timestamp()

    def advance(self, seconds: float) -> None:
        self._offset += timedelta(seconds=seconds)

    @property
    def offset(self) -> timedelta:
        return self._offset
