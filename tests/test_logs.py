"""Tests for service.logs and the log settings: the JSON and text formats, and which one a run gets."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from service.config import Settings
from service.errors import ConfigurationError
from service.logs import FIELDS, REQUEST_ID, JsonLineFormatter

from .conftest import CANARY
from .observability import captured_logging


def _record(message: str, *args: object, exc: BaseException | None = None, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("custody.test", logging.WARNING, __file__, 1, message, args, None)
    if exc is not None:
        record.exc_info = (type(exc), exc, exc.__traceback__)
    record.__dict__.update(extra)
    return record


def test_a_json_line_has_the_fixed_fields_and_the_records_own() -> None:
    """A JSON line holds time (UTC, milliseconds), level, logger, the formatted message, the three ids and the record's own fields."""
    record = _record("%d purged", 3, request_id="req_1", trace_id="a" * 32, span_id="b" * 16)
    setattr(record, FIELDS, {"count": 3})
    line = json.loads(JsonLineFormatter().format(record))
    assert line["time"].endswith("Z")
    assert len(line["time"]) == len("2026-01-01T00:00:00.000Z")
    assert (line["level"], line["logger"], line["message"]) == ("WARNING", "custody.test", "3 purged")
    assert (line["request_id"], line["trace_id"], line["span_id"]) == ("req_1", "a" * 32, "b" * 16)
    assert line["count"] == 3


def test_a_json_line_keeps_an_exceptions_type_and_frames_but_not_its_message() -> None:
    """An exception is logged by its type and the places it passed through; its message, which may quote input, is left out."""
    try:
        raise ValueError(f"bad input {CANARY}")
    except ValueError as exc:
        formatted = JsonLineFormatter().format(_record("failed", exc=exc))
    line = json.loads(formatted)
    assert line["exception"] == "ValueError"
    assert any("test_logs.py" in frame and "in test_a_json_line" in frame for frame in line["stack"])
    assert CANARY not in formatted


def test_a_record_with_newlines_is_still_one_line() -> None:
    """A message holding newlines and control characters stays one JSON line."""
    formatted = JsonLineFormatter().format(_record("first\nsecond\r\x1b[31m"))
    assert "\n" not in formatted
    assert "\r" not in formatted
    assert json.loads(formatted)["message"] == "first\nsecond\r\x1b[31m"


def test_the_context_gives_every_line_the_request_and_span_it_was_written_in() -> None:
    """A line written inside a span and a request carries their ids; one written outside carries nulls."""
    provider = TracerProvider()
    logger = logging.getLogger("custody.test.context")
    with captured_logging("json") as log:
        logger.warning("outside")
        token = REQUEST_ID.set("req_abc")
        try:
            with provider.get_tracer("test").start_as_current_span("work") as span:
                logger.warning("inside")
        finally:
            REQUEST_ID.reset(token)
        outside, inside = log.records()
    provider.shutdown()
    assert (outside["request_id"], outside["trace_id"], outside["span_id"]) == (None, None, None)
    context = span.get_span_context()
    assert inside["request_id"] == "req_abc"
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")


def test_chatty_libraries_are_quieted() -> None:
    """The HTTP clients' per-request INFO lines (which name the model service's URLs) are not written; their warnings are."""
    with captured_logging("json") as log:
        logging.getLogger("httpx").info("HTTP Request: POST https://example.invalid/v1/interactions")
        logging.getLogger("httpx2").info("HTTP Request: DELETE https://example.invalid/v1/interactions/x")
        logging.getLogger("httpx").warning("something odd")
        assert [record["message"] for record in log.records()] == ["something odd"]


def _settings(**env: str) -> Settings:
    return Settings.from_env({"CUSTODY_DATA_DIR": str(Path("unused")), **env})


def test_a_deployment_logs_json_and_the_zero_config_run_text() -> None:
    """Without CUSTODY_LOG_FORMAT a deployment (DATABASE_URL set) gets JSON lines and the zero-config run text; the setting overrides either."""
    assert _settings().resolved_log_format == "text"
    assert _settings(DATABASE_URL="postgresql://db/custody").resolved_log_format == "json"
    assert _settings(DATABASE_URL="postgresql://db/custody", CUSTODY_LOG_FORMAT="TEXT").resolved_log_format == "text"
    assert _settings(CUSTODY_LOG_FORMAT="json").resolved_log_format == "json"
    assert _settings().access_log is True
    assert _settings(CUSTODY_ACCESS_LOG="false").access_log is False


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CUSTODY_LOG_FORMAT", "yaml"),
        ("CUSTODY_LOG_LEVEL", "verbose"),
        ("CUSTODY_ACCESS_LOG", "sometimes"),
        ("CUSTODY_METRICS_TENANT_LABELS", "maybe"),
    ],
)
def test_a_log_or_metrics_setting_that_does_not_parse_stops_startup(name: str, value: str) -> None:
    """A log format, level or switch that is not one of its values is refused naming the variable."""
    with pytest.raises(ConfigurationError, match=name):
        _settings(**{name: value})
