"""The composition root of the HTTP layer: `create_app(ctx)`."""

from __future__ import annotations

from litestar import Litestar
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig

from ..context import ServiceContext
from .audit import AuditController
from .conversations import ConversationController
from .health import healthz, readyz
from .problems import exception_handlers

__all__ = ["create_app", "openapi_document"]


def create_app(ctx: ServiceContext, *, max_body_bytes: int = 1_000_000) -> Litestar:
    return Litestar(
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
