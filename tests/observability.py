"""Helpers for the metrics and log tests: reading Prometheus text, capturing the real log output."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from service.logs import ACCESS_LOGGER, QUIET_LOGGERS, configure_logging


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


class Scrape:
    """One Prometheus text exposition, parsed by prometheus-client's own (strict) parser."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.samples: list[Sample] = []
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            self.samples.extend(Sample(s.name, dict(s.labels), float(s.value)) for s in family.samples)

    def find(self, name: str, **labels: str) -> list[Sample]:
        """The samples of `name` whose labels include `labels`."""
        return [s for s in self.samples if s.name == name and labels.items() <= s.labels.items()]

    def value(self, name: str, **labels: str) -> float:
        """The one sample of `name` with exactly these labels (0 when there is none: a counter
        never incremented is not exported)."""
        found = [s for s in self.samples if s.name == name and s.labels == labels]
        assert len(found) <= 1, found
        return found[0].value if found else 0.0

    def label_values(self) -> set[str]:
        return {value for sample in self.samples for value in sample.labels.values()}


@dataclass
class CapturedLog:
    """What the real logging configuration wrote, one entry per line."""

    stream: io.StringIO

    def lines(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def records(self) -> list[dict[str, Any]]:
        """Every line as JSON; a line that is not a JSON object fails the test."""
        parsed = []
        for line in self.lines():
            value = json.loads(line)
            assert isinstance(value, dict), line
            parsed.append(value)
        return parsed

    def access(self) -> list[dict[str, Any]]:
        return [record for record in self.records() if record["logger"] == ACCESS_LOGGER]


@contextmanager
def captured_logging(log_format: str = "json", *, access_log: bool = True) -> Iterator[CapturedLog]:
    """`custody serve`'s logging configuration, writing to a buffer; the process's logging is put
    back as it was afterwards."""
    root = logging.getLogger()
    touched = [logging.getLogger(name) for name in (ACCESS_LOGGER, *QUIET_LOGGERS)]
    uvicorn_access = logging.getLogger("uvicorn.access")
    saved = (root.level, [logger.level for logger in touched], uvicorn_access.disabled, uvicorn_access.propagate)
    stream = io.StringIO()
    handler = configure_logging(log_format, access_log=access_log, stream=stream)
    try:
        yield CapturedLog(stream)
    finally:
        root.removeHandler(handler)
        root.setLevel(saved[0])
        for logger, level in zip(touched, saved[1], strict=True):
            logger.setLevel(level)
        uvicorn_access.disabled, uvicorn_access.propagate = saved[2], saved[3]
