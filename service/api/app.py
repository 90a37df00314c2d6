"""The composition root of the HTTP layer: `create_app(ctx)`."""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.types import Message, Scope

from ..context import ServiceContext
from .audit import AuditController
from .conversations import ConversationController
from .health import healthz, readyz
from .problems import exception_handlers
from .request_guards import check_request, refuse_encoded_slashes
from .security import REQUEST_ID_REPLACED, assign_request_id, request_id_replaced

__all__ = ["create_app", "openapi_document"]


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


def create_app(ctx: ServiceContext, *, max_body_bytes: int = 1_000_000) -> Litestar:
    return Litestar(
        before_send=[_echo_request_id],
        before_request=check_request,
        middleware=[refuse_encoded_slashes],
        route_handlers=[ConversationController, AuditController, healthz, readyz],
        state=State({"ctx": ctx}),
        exception_handlers=exception_handlers,
        request_max_body_size=max_body_bytes,
        openapi_config=OpenAPIConfig(title="Custody", version="0.1.0", path="/schema"),
        debug=False,
    )


def openapi_document() -> str:
    """The OpenAPI document as checked into schemas/openapi.json (stable key order)."""
    import json

    schema = create_app(None).openapi_schema.to_schema()  # type: ignore[arg-type]
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
