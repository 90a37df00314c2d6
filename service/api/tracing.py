"""One server span per HTTP request, continuing the caller's W3C trace, with nothing a client typed.

Every audit record a request writes carries the trace id of the span it was written under; with a
server span around the whole request, all records of one request share one trace, and a caller
that sends `traceparent` finds Custody's work inside its own trace.

Not the generic ASGI instrumentation: it records the raw path, the query string, the user agent
and the peer address as span attributes, all of which carry whatever the client typed (a card
number in a path segment, say). This span holds only the method, the route template, the
operation, the status and the request id (already in Custody's safe shape).
"""

from __future__ import annotations

from typing import Any

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .security import assign_request_id

__all__ = ["server_spans"]

# W3C Trace Context only, explicitly: the process-wide propagator is global state Custody does
# not own (and does not configure).
_W3C = TraceContextTextMapPropagator()


def server_spans(tracer: Tracer) -> Any:
    """Litestar middleware (applied after routing, so the route template is known)."""

    def middleware(app: ASGIApp) -> ASGIApp:
        async def traced(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != ScopeType.HTTP:
                await app(scope, receive, send)
                return
            carrier = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
            method = scope["method"]
            route = scope.get("path_template") or "unrouted"
            handler = scope.get("route_handler")
            operation = getattr(handler, "operation_id", None)
            attributes = {
                "http.request.method": method,
                "http.route": route,
                "custody.request_id": assign_request_id(scope),
            }
            if isinstance(operation, str):
                attributes["custody.operation"] = operation
            with tracer.start_as_current_span(
                f"{method} {route}",
                context=_W3C.extract(carrier),
                kind=SpanKind.SERVER,
                attributes=attributes,
                record_exception=False,
            ) as span:

                async def send_with_status(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        status = int(message["status"])
                        span.set_attribute("http.response.status_code", status)
                        if status >= 500:
                            span.set_status(Status(StatusCode.ERROR))
                    await send(message)

                await app(scope, receive, send_with_status)

        return traced

    return middleware
