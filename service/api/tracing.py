"""Around every HTTP request: its server span, its request id in the logs' context, its access line.

Every audit record a request writes carries the trace id of the span it was written under; with a
server span around the whole request, all records of one request share one trace, and a caller
that sends `traceparent` finds Custody's work inside its own trace.

Not the generic ASGI instrumentation: it records the raw path, the query string, the user agent
and the peer address as span attributes, all of which carry whatever the client typed (a card
number in a path segment, say). This span holds only the method, the route template, the
operation, the status and the request id (already in Custody's safe shape); the access line and
the HTTP metric hold the same, never the path or its query string.

It wraps the whole application, not just the routed requests (Litestar's middleware never sees a
request no route matched), so a 404 has its span and its access line too; the route template is
known once the router has run, so the span is named when the response starts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..logs import ACCESS_LOGGER, FIELDS, REQUEST_ID
from ..metrics import Metrics, http_method
from .security import assign_request_id

__all__ = ["UNROUTED", "observe_requests"]

# The route of a request no route matched.
UNROUTED = "unrouted"
# W3C Trace Context only, explicitly: the process-wide propagator is global state Custody does
# not own (and does not configure).
_W3C = TraceContextTextMapPropagator()
_access = logging.getLogger(ACCESS_LOGGER)


def observe_requests(tracer: Tracer, metrics: Metrics) -> Callable[[ASGIApp], ASGIApp]:
    """Wraps an ASGI app (the whole Litestar app) so that every HTTP request gets its server span,
    its request id in the logging context, one access line and its HTTP metric."""

    def wrap(app: ASGIApp) -> ASGIApp:
        async def observed(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            started = time.perf_counter()
            method = http_method(scope["method"])
            request_id = assign_request_id(scope)
            carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
            status = 500  # what the server answers if the app ends without starting a response
            token = REQUEST_ID.set(request_id)
            try:
                with tracer.start_as_current_span(
                    method,
                    context=_W3C.extract(carrier),
                    kind=SpanKind.SERVER,
                    attributes={"http.request.method": method, "custody.request_id": request_id},
                    record_exception=False,
                ) as span:

                    async def send_with_status(message: Message) -> None:
                        nonlocal status
                        if message["type"] == "http.response.start":
                            status = int(message["status"])
                            _name(span, scope, method)
                        await send(message)

                    try:
                        await app(scope, receive, send_with_status)
                    finally:
                        route = _name(span, scope, method)
                        span.set_attribute("http.response.status_code", status)
                        if status >= 500:
                            span.set_status(Status(StatusCode.ERROR))
                        seconds = time.perf_counter() - started
                        metrics.http_request(method, route, status, seconds)
                        if _access.isEnabledFor(logging.INFO):
                            # Inside the span, so the line carries its trace and span ids.
                            _access.info(
                                "%s %s %d %.1fms",
                                method,
                                route,
                                status,
                                seconds * 1000,
                                extra={
                                    FIELDS: {
                                        "method": method,
                                        "route": route,
                                        "status": status,
                                        "duration_ms": round(seconds * 1000, 3),
                                    }
                                },
                            )
            finally:
                REQUEST_ID.reset(token)

        return observed

    return wrap


def _name(span: Span, scope: Scope, method: str) -> str:
    """Name the span after the route the router chose (and the operation it runs); the route."""
    route = scope.get("path_template") or UNROUTED
    span.update_name(f"{method} {route}")
    span.set_attribute("http.route", route)
    operation = getattr(scope.get("route_handler"), "operation_id", None)
    if isinstance(operation, str):
        span.set_attribute("custody.operation", operation)
    return str(route)
