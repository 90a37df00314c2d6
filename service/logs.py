"""Custody's log lines: JSON objects, one per line, on stdout in a deployment; readable text otherwise.

`custody serve` configures this once (`configure_logging`); the standard library's logging does
the rest, so every module keeps its `logging.getLogger("custody....")`. Each line carries the
time, level, logger and message, and the request id, trace id and span id of the request it was
written in (the request id from `REQUEST_ID`, set by the request observer in
service/api/tracing.py; the trace and span ids from the current OpenTelemetry span), so a line
leads to the request's audit records and its trace.

What Custody logs never holds content: messages name error types, counts and ids, and the access
line names the route template, never the path or its query string. A JSON line keeps an
exception's type and the places it passed through (file, line, function), not its message, which
may quote whatever input caused it; the text format, for the zero-config run on a developer's
machine, prints the whole traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any

from opentelemetry.trace import get_current_span

__all__ = [
    "ACCESS_LOGGER",
    "FIELDS",
    "QUIET_LOGGERS",
    "REQUEST_ID",
    "JsonLineFormatter",
    "TextFormatter",
    "configure_logging",
]

# The id of the request being served (see service.api.security.assign_request_id); None outside one.
REQUEST_ID: ContextVar[str | None] = ContextVar("custody_request_id", default=None)
# The logger of the one line per HTTP request.
ACCESS_LOGGER = "custody.access"
# The attribute of a log record (`logger.info(..., extra={FIELDS: {...}})`) whose members a JSON
# line carries as fields of its own, such as the access line's method, route and status.
FIELDS = "custody_fields"
# Libraries that log each request they make at INFO (the model service's URL among them): their
# warnings are worth a line, their chatter is not.
QUIET_LOGGERS = ("httpx", "httpx2", "httpcore", "google_genai", "asyncio", "urllib3")
# Marks the handler configure_logging installed, so that configuring again replaces it.
_OURS = "_custody_handler"


class _RequestContext(logging.Filter):
    """Adds the request id and the current trace and span ids to every record, at the call: the
    handler runs in the caller's context (its task, its span)."""

    def filter(self, record: logging.LogRecord) -> bool:
        context = get_current_span().get_span_context()
        record.request_id = REQUEST_ID.get()
        record.trace_id = format(context.trace_id, "032x") if context.is_valid else None
        record.span_id = format(context.span_id, "016x") if context.is_valid else None
        return True


class JsonLineFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, request_id, trace_id, span_id,
    the record's own fields, and an exception's type and frames."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.fromtimestamp(record.created, UTC)
        line: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "trace_id": getattr(record, "trace_id", None),
            "span_id": getattr(record, "span_id", None),
        }
        fields = getattr(record, FIELDS, None)
        if isinstance(fields, dict):
            for name, value in fields.items():
                line.setdefault(name, value)
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            line["exception"] = type(error).__name__
            frames = traceback.extract_tb(error.__traceback__)
            line["stack"] = [f"{frame.filename}:{frame.lineno} in {frame.name}" for frame in frames]
        # Not ensure_ascii: the line stays readable; json escapes every control character, so one
        # record is always one line.
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """`time level logger: message [request_id=… trace_id=…]`, for a person at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ids = [
            f"{name}={value}"
            for name in ("request_id", "trace_id")
            if (value := getattr(record, name, None)) is not None
        ]
        if not ids:
            return text
        head, newline, rest = text.partition("\n")
        return f"{head} [{' '.join(ids)}]{newline}{rest}"


def configure_logging(
    log_format: str, *, level: str = "info", access_log: bool = True, stream: IO[str] | None = None
) -> logging.Handler:
    """Send every log record of the process to `stream` (stdout) in `log_format` (json or text).

    Replaces the handler an earlier call installed, so it may be called again; returns the handler.
    uvicorn must be started with `log_config=None`, so that its loggers reach this handler too,
    and `access_log=False`: Custody writes the one access line per request itself.
    """
    handler = logging.StreamHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(JsonLineFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_RequestContext())
    setattr(handler, _OURS, True)
    root = logging.getLogger()
    for existing in [h for h in root.handlers if getattr(h, _OURS, False)]:
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    # Custody's own access line; uvicorn's is switched off (it would print the raw path and query).
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if access_log else logging.WARNING)
    uvicorn_access = logging.getLogger("uvicorn.access")
    uvicorn_access.disabled = True
    uvicorn_access.propagate = False
    return handler
