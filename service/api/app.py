"""The composition root of the HTTP layer: `create_app(ctx)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from ..context import ServiceContext
from .audit import AuditController
from .conversations import ConversationController
from .draining import drain_gate
from .health import healthz, readyz
from .metrics import MetricsEndpoint, metrics
from .ops import OpsController
from .problems import exception_handlers
from .request_guards import check_request, refuse_encoded_slashes
from .security import REQUEST_ID_REPLACED, assign_request_id, request_id_replaced
from .subjects import SubjectController
from .tracing import observe_requests
from .wire import StructSchemas

__all__ = ["CustodyApp", "create_app", "openapi_document"]


async def _echo_request_id(message: Message, scope: Scope) -> None:
    """Send back the request id the audit records carry, so a caller can quote it, and say when
    it is not the caller's own (theirs was not in a safe shape; see `assign_request_id`)."""
    if message["type"] != "http.response.start":
        return
    # Decided here for requests no dependency asked about (health checks, 404s), so every
    # response carries one.
    headers = [*message.get("headers", []), (b"x-request-id", assign_request_id(scope).encode())]
    if request_id_replaced(scope):
        headers.append((REQUEST_ID_REPLACED.encode(), b"malformed"))
    message["headers"] = headers


async def _allow_every_method(message: Message, scope: Scope) -> None:
    """List every method of the path in an OPTIONS answer's `Allow`.

    Litestar 2 builds a path's OPTIONS handler when the path's first handler is registered, and
    its `Allow` then leaves out the methods registered after it (`/v1/conversations/{id}` said
    `GET, OPTIONS`, without DELETE; litestar-org/litestar#4169, fixed only in Litestar 3).
    """
    if message["type"] != "http.response.start" or scope.get("method") != "OPTIONS":
        return
    headers = list(message.get("headers", []))
    if not any(name.lower() == b"allow" for name, _ in headers):
        return
    template = scope.get("path_template")
    route = next((route for route in scope["app"].routes if route.path_format == template), None)
    if isinstance(route, HTTPRoute):
        allow = ", ".join(sorted(route.methods)).encode()
        message["headers"] = [(name, value) for name, value in headers if name.lower() != b"allow"] + [
            (b"allow", allow)
        ]


class CustodyApp(Litestar):
    """Litestar, with every HTTP request passing through the request observer (its server span,
    access line and metric; see service/api/tracing.py), those no route matches included:
    Litestar's own middleware only ever sees routed requests."""

    def __init__(self, *, observe: Callable[[ASGIApp], ASGIApp] | None = None, **options: Any) -> None:
        super().__init__(**options)
        # Litestar's entry point, typed for lifespan scopes too; the observer sees HTTP ones only.
        entry = cast(ASGIApp, super().__call__)
        self._observed = observe(entry) if observe is not None else None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self._observed is not None and scope["type"] == "http":
            await self._observed(cast(Scope, scope), cast(Receive, receive), cast(Send, send))
        else:
            await super().__call__(scope, receive, send)


def create_app(
    ctx: ServiceContext, *, max_body_bytes: int = 1_000_000, metrics_endpoint: MetricsEndpoint | None = None
) -> CustodyApp:
    """The HTTP application on `ctx`; `GET /metrics` is served only with a `metrics_endpoint`."""
    # ctx is None only when the app is built to print its OpenAPI document.
    observe = observe_requests(ctx.auditor.tracer, ctx.metrics) if ctx is not None else None
    # Inside the request observer (which wraps the whole app), so a request refused or cancelled
    # by the drain is traced, logged and counted with its 503.
    gates = [drain_gate(ctx.drain)] if ctx is not None else []
    handlers: list[Any] = [ConversationController, SubjectController, AuditController, OpsController, healthz, readyz]
    if metrics_endpoint is not None:
        handlers.append(metrics)
    return CustodyApp(
        observe=observe,
        before_send=[_echo_request_id, _allow_every_method],
        before_request=check_request,
        middleware=[*gates, refuse_encoded_slashes],
        route_handlers=handlers,
        state=State({"ctx": ctx, "metrics_endpoint": metrics_endpoint}),
        exception_handlers=exception_handlers,
        request_max_body_size=max_body_bytes,
        openapi_config=_openapi_config(),
        plugins=[StructSchemas()],
        # Logging is the process's (service/logs.py, set up by `custody serve`); Litestar's default
        # would replace the root logger's handlers with its own format on stderr.
        logging_config=None,
        debug=False,
    )


_API_DESCRIPTION = """\
Custody keeps the history of Gemini conversations encrypted in its own database and replays it to
the model on every turn (store=false), under a route policy that says which data classes each route
may carry.

Every `/v1` operation needs an API key: `Authorization: Bearer cust_…`. Backends (role `backend`)
use `/v1/conversations` and `/v1/subjects`; auditors (role `auditor`) use `/v1/audit`; operations
(role `ops`) use `/v1/ops` (policy, retention, legal holds, pending provider-copy deletions), and
never see conversation content.

Every error is an RFC 9457 problem (`application/problem+json`, the `Problem` schema): branch on
its `type`, and honour `Retry-After` on 429 and 503. A method a path does not support is answered
405 with an `Allow` header. Every response carries the request's `X-Request-Id`.
"""


def _openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="Custody",
        version="0.1.0",
        path="/schema",
        description=_API_DESCRIPTION,
        # An operation's description is its handler's docstring: one text for readers of the code
        # and of the document.
        use_handler_docstrings=True,
        components=Components(
            security_schemes={
                "bearerAuth": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="cust_<key id>_<secret>",
                    description="An API key issued with `custody keys issue`; its role decides what it may call.",
                )
            }
        ),
        tags=[
            Tag(name="conversations", description="Conversations and their turns (role `backend`)."),
            Tag(name="audit", description="The tenant's audit chain: query, export, verify (role `auditor`)."),
            Tag(name="ops", description="Policy, retention runs, legal holds, provider copies (role `ops`)."),
            Tag(name="health", description="Probes for the orchestrator; no API key."),
        ],
    )


def openapi_document() -> str:
    """The OpenAPI document as checked into schemas/openapi.json (stable key order)."""
    import json

    schema = create_app(None).openapi_schema.to_schema()  # type: ignore[arg-type]
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
