"""Checks every request passes before any handler or dependency sees it.

Hostile input must be refused with a clear 4xx and in bounded time, before it can reach a query
or a recursive function: an encoded slash that would change the route after decoding, a JSON body
nested deep enough to exhaust the interpreter's stack, and integer or date-time parameters spelled
the way only a lenient parser accepts (`1e3` for 1000, `0.5` for a Unix time).
"""

from __future__ import annotations

import re
from datetime import datetime
from functools import cache
from typing import Any, get_args

from litestar import Request
from litestar.enums import ScopeType
from litestar.exceptions import NotFoundException, SerializationException
from litestar.handlers import HTTPRouteHandler
from litestar.params import ParameterKwarg
from litestar.types import ASGIApp, Receive, Scope, Send

from ..errors import MalformedRequest

__all__ = ["MAX_JSON_DEPTH", "check_request", "json_depth_exceeds", "refuse_encoded_slashes"]

# Deep enough for any real turn (steps hold content blocks, function results hold the tool's
# JSON), far below where the JSON decoder and every recursive walk over the body (encoding,
# canonical JSON, the audit record) would overflow.
MAX_JSON_DEPTH = 64
# A plain decimal integer: `1e3`, `1.0`, `+1` and `0x10` are refused rather than guessed at.
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,15}")
# An RFC 3339 date-time (the zone may be missing here; the handler then says it needs one): a
# bare number would otherwise be taken for a Unix time.
_DATE_TIME = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?([Zz]|[+-][0-9]{2}:?[0-9]{2})?"
)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def refuse_encoded_slashes(app: ASGIApp) -> ASGIApp:
    """Middleware: a `%2F` in the path is refused (404) instead of being routed as a `/`.

    The server decodes the path before routing, so `/v1/conversations/{id}%2Fsteps` would reach
    the steps listing; no Custody identifier contains a slash, so such a path names nothing.
    """

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        # Some servers leave the query string on raw_path; only the path is routed.
        raw_path = bytes(scope.get("raw_path") or b"").partition(b"?")[0]
        if scope["type"] == ScopeType.HTTP and b"%2f" in raw_path.lower():
            raise NotFoundException()
        await app(scope, receive, send)

    return middleware


async def check_request(request: Request[Any, Any, Any]) -> None:
    """`before_request` hook: strict integer and date-time query parameters, then a bounded JSON
    body."""
    _check_typed_parameters(request)
    if request.method in _BODY_METHODS and await request.body():
        try:
            # Decoded once here; Litestar keeps the value and parses the handler's body from it.
            body = await request.json()
        except RecursionError:
            raise MalformedRequest(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels") from None
        except SerializationException:
            raise MalformedRequest("the request body is not valid JSON") from None
        if json_depth_exceeds(body, MAX_JSON_DEPTH):
            raise MalformedRequest(f"the JSON body nests deeper than {MAX_JSON_DEPTH} levels")


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether objects and arrays in `value` nest deeper than `limit`; iterative, so any depth
    is safe to ask about, and it stops at the first container past the limit."""
    stack: list[tuple[Any, int]] = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        for child in node.values() if isinstance(node, dict) else node:
            if isinstance(child, (dict, list)):
                stack.append((child, depth + 1))
    return False


def _check_typed_parameters(request: Request[Any, Any, Any]) -> None:
    integers, times = _typed_query_parameters(request.route_handler)
    for name, value in request.query_params.items():
        if name in integers and not _DECIMAL.fullmatch(value):
            raise MalformedRequest(f"query parameter `{name}` must be a plain decimal integer")
        if name in times and not _DATE_TIME.fullmatch(value):
            raise MalformedRequest(f"query parameter `{name}` must be an RFC 3339 date-time")


@cache
def _typed_query_parameters(handler: HTTPRouteHandler) -> tuple[frozenset[str], frozenset[str]]:
    """The handler's integer and date-time query parameters, by their names in the query string."""
    integers, times = set(), set()
    for name, field in handler.parsed_fn_signature.parameters.items():
        kwarg = field.kwarg_definition
        if kwarg is not None and (not isinstance(kwarg, ParameterKwarg) or kwarg.header or kwarg.cookie):
            continue
        query_name = kwarg.query if kwarg is not None and kwarg.query else name
        types = {field.annotation, *get_args(field.annotation)}
        if int in types:
            integers.add(query_name)
        elif datetime in types:
            times.add(query_name)
    return frozenset(integers), frozenset(times)
