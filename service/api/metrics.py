"""`GET /metrics`: every instrument in the Prometheus text format, for a scraper holding the token.

The numbers carry no content, but they are operational intelligence (traffic by route, failure
rates, which data classes the detectors find, and with tenant labels, who the customers are),
and the service port is reachable by every backend that calls the API. So the endpoint is
served only when the operator configured a scrape token (`CUSTODY_METRICS_TOKEN_FILE`), and
answers only a request that sends it as `Authorization: Bearer <token>`, which Prometheus does
with `authorization: {credentials_file: ...}` in its scrape config. It is not an API key: a
scrape is not a tenant's, reads no database, and is not audited; a refused one is counted
(`custody.auth.failures{reason="metrics_token"}`) and logged by its access line.

It is left out of the OpenAPI document on purpose: that document is for the API's clients and
their generators, and this endpoint is for the operator's scraper.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from litestar import Request, Response, get

from ..context import ServiceContext
from ..metrics_export import PROMETHEUS_TEXT
from .problems import problem

__all__ = ["METRICS_PATH", "MetricsEndpoint", "metrics"]

METRICS_PATH = "/metrics"
_BEARER = "bearer "


@dataclass(frozen=True)
class MetricsEndpoint:
    """What `GET /metrics` needs: the token a scraper must send, and the renderer of the text."""

    token: bytes = field(repr=False)
    render: Callable[[], bytes]


@get(METRICS_PATH, include_in_schema=False)
async def metrics(request: Request[Any, Any, Any]) -> Response[Any]:
    """Every instrument, collected now, in the Prometheus text exposition format."""
    endpoint: MetricsEndpoint = request.app.state.metrics_endpoint
    header = request.headers.get("authorization", "")
    given = header[len(_BEARER) :].strip().encode() if header[: len(_BEARER)].lower() == _BEARER else b""
    if not hmac.compare_digest(given, endpoint.token):
        ctx: ServiceContext = request.app.state.ctx
        ctx.metrics.auth_failure("metrics_token")
        return problem(401, "unauthenticated", "Authentication failed", "GET /metrics needs the scrape token")
    return Response(endpoint.render(), media_type=PROMETHEUS_TEXT)
