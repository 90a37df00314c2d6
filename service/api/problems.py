"""The one mapping from errors to RFC 9457 problem+json responses.

Bodies carry a stable `type`, a `title`, the `status`, a `detail` written by us (never a copy of
the request or of an upstream body), and where useful a JSON `pointer` into the request.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from .. import errors
from ..crypto import DecryptionError, KeyringError
from ..database_errors import database_unreachable
from ..policy import DataClassNotAllowedError, PolicyViolation, UnknownDataClassError, UnknownRouteError
from .security import operation_name

__all__ = ["PROBLEM_JSON", "exception_handlers", "problem"]

PROBLEM_JSON = "application/problem+json"
logger = logging.getLogger("custody.api")

# error class -> (status, type slug, title); the most specific class wins (checked in order).
_MAPPING: list[tuple[type[Exception], int, str, str]] = [
    (errors.AuthenticationFailed, 401, "unauthenticated", "Authentication failed"),
    (errors.PermissionDenied, 403, "forbidden", "Not allowed for this role"),
    (errors.ConversationNotFound, 404, "conversation-not-found", "Conversation not found"),
    (errors.HoldNotFound, 404, "hold-not-found", "Legal hold not found"),
    (errors.RetentionRunNotFound, 404, "retention-run-not-found", "Retention run not found"),
    (errors.MalformedRequest, 400, "malformed-request", "Malformed request"),
    (errors.FunctionResultMismatch, 422, "function-result-mismatch", "Function result answers no pending call"),
    (errors.InvalidInput, 422, "invalid-input", "Invalid input"),
    (errors.TurnNotFound, 404, "turn-not-found", "Turn not found"),
    (errors.TurnNotRunning, 409, "turn-not-running", "The turn is not running"),
    (errors.TurnInProgress, 409, "turn-in-progress", "Another turn is in progress"),
    (errors.LegalHoldActive, 409, "legal-hold", "A legal hold forbids this deletion"),
    (errors.HoldReleased, 409, "hold-released", "Legal hold released already"),
    (errors.MinimumRetention, 409, "minimum-retention", "Minimum retention not reached"),
    (errors.IdempotencyKeyReused, 422, "idempotency-key-reused", "Idempotency-Key reused with a different request"),
    (errors.IdempotencyKeyInFlight, 409, "idempotency-key-in-flight", "Idempotency-Key in use"),
    (UnknownRouteError, 422, "unknown-route", "Unknown route"),
    (UnknownDataClassError, 422, "unknown-data-class", "Unknown data class"),
    (
        errors.CardSecurityCodeRefused,
        422,
        "card-security-code",
        "Card security code may not be stored",
    ),
    (errors.DataClassBlocked, 422, "data-class-blocked", "Data class blocked on this route"),
    (errors.BackgroundNotPermitted, 422, "background-not-permitted", "Background turn not permitted"),
    (errors.MediaTypeNotAllowed, 415, "media-type-not-allowed", "Media type not allowed on this route"),
    (errors.MediaTooLarge, 413, "media-too-large", "Media too large for this route"),
    (errors.MediaUriNotAllowed, 422, "media-uri-not-allowed", "Media URI not allowed on this route"),
    (DataClassNotAllowedError, 422, "data-class-not-allowed", "Data class not allowed on this route"),
    (PolicyViolation, 422, "policy-violation", "Request violates the route policy"),
]


def problem(
    status: int, slug: str, title: str, detail: str, *, retry_after: int | None = None, **extra: Any
) -> Response[dict[str, Any]]:
    body = {"type": f"urn:custody:problem:{slug}", "title": title, "status": status, "detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    headers = {"WWW-Authenticate": 'Bearer realm="custody"'} if status == 401 else {}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return Response(body, status_code=status, media_type=PROBLEM_JSON, headers=headers or None)


def _detail(request: Request[Any, Any, Any], exc: Exception) -> str:
    # Unknown names came from the client and may be anything (even content): list the known ones
    # instead of echoing them.
    policy = request.app.state.ctx.policy
    if isinstance(exc, UnknownRouteError):
        return f"no such route in the policy; routes: {', '.join(sorted(policy.routes))}"
    if isinstance(exc, UnknownDataClassError):
        return f"undeclared data class; declared: {', '.join(sorted(policy.data_classes))}"
    return str(exc)


def _custody_error(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    for cls, status, slug, title in _MAPPING:
        if isinstance(exc, cls):
            return problem(
                status,
                slug,
                title,
                _detail(request, exc),
                pointer=getattr(exc, "pointer", None),
                hold_id=getattr(exc, "hold_id", None),
                deletable_from=getattr(exc, "deletable_from", None),
                # Class names from the policy, never from the request (unlike an unknown class's).
                data_classes=list(exc.classes) if isinstance(exc, errors.DataClassBlocked) else None,
            )
    if isinstance(exc, errors.UpstreamFailed):
        # 504: it did not answer in time (or the turn's deadline passed); 503: it is overloaded
        # or failing for now (its own 429 or 503, or the breaker is open), so the caller should
        # come back later, after Retry-After when that is known; 502: any other failure.
        status = 504 if exc.timeout else 503 if exc.unavailable else 502
        retry_after = math.ceil(exc.retry_after) if exc.retry_after is not None else None
        return problem(
            status,
            "upstream-failed",
            "The model call failed",
            str(exc),
            retry_after=retry_after,
            code=exc.code,
            upstream_status=exc.upstream_status,
        )
    if isinstance(exc, errors.DatabaseUnavailable):
        return _database_unavailable(str(exc), exc.retry_after)
    if isinstance(exc, errors.ShuttingDown):
        response = problem(503, "shutting-down", "Shutting down", str(exc), retry_after=exc.retry_after)
        # The client's next request should open a connection the load balancer sends elsewhere.
        response.headers["Connection"] = "close"
        return response
    if isinstance(exc, errors.TooManyAuthenticationFailures):
        return problem(
            429,
            "too-many-authentication-failures",
            "Too many failed authentications",
            str(exc),
            retry_after=exc.retry_after,
        )
    return _internal(request, exc)


def _database_unavailable(detail: str, retry_after: int) -> Response[dict[str, Any]]:
    return problem(503, "database-unavailable", "Database unavailable", detail, retry_after=retry_after)


def _validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[dict[str, Any]]:
    # Litestar's details can quote the offending value, which may be content: keep only where.
    pointers = []
    for item in exc.extra if isinstance(exc.extra, list) else []:
        if isinstance(item, dict) and item.get("key"):
            pointers.append(str(item["key"]))
    return problem(
        400,
        "malformed-request",
        "Malformed request",
        "the request body or parameters do not match the API schema",
        fields=pointers or None,
    )


def _http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[dict[str, Any]]:
    if exc.status_code == 400:
        return problem(
            400,
            "malformed-request",
            "Malformed request",
            "the request body is not valid JSON or does not match the API schema",
        )
    if exc.status_code == 413:
        return problem(
            413, "payload-too-large", "Request body too large", "the request body exceeds the configured limit"
        )
    if exc.status_code == 404:
        return problem(404, "not-found", "Not found", "no such endpoint")
    if exc.status_code == 405:
        response = problem(405, "method-not-allowed", "Method not allowed", "this endpoint does not support the method")
        # RFC 9110 requires the methods the path does support; the router names them on the exception.
        allow = next((value for name, value in (exc.headers or {}).items() if name.lower() == "allow"), None)
        if allow:
            response.headers["Allow"] = allow
        return response
    return problem(exc.status_code, "http-error", "Request failed", "the request could not be processed")


def _unreadable(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    # A stored ciphertext or wrapped key failed its integrity check: altered, moved to another
    # row, or under a key this keyring lacks. Nothing of it is returned; the audited action that
    # met it recorded the failure.
    logger.error("stored data unreadable (%s) in %s", type(exc).__name__, operation_name(request))
    return problem(
        500,
        "stored-data-unreadable",
        "Stored data failed its integrity check",
        "a stored record of this conversation could not be decrypted (altered, moved, or under an unknown key); "
        "nothing was returned and the failure is audited",
    )


def _internal(request: Request[Any, Any, Any], exc: Exception) -> Response[dict[str, Any]]:
    if database_unreachable(exc):
        logger.warning("database unreachable (%s) in %s", type(exc).__name__, operation_name(request))
        return _database_unavailable("the database cannot be reached right now; retry shortly", 2)
    # The exception type only: messages of unexpected errors may carry anything.
    # The operation, not the path: a path holds whatever the caller typed.
    logger.error("unhandled %s in %s", type(exc).__name__, operation_name(request))
    return problem(500, "internal-error", "Internal error", "the service failed; the request may be retried")


exception_handlers: ExceptionHandlersMap = {
    errors.CustodyError: _custody_error,
    PolicyViolation: _custody_error,
    ValidationException: _validation,
    HTTPException: _http,
    DecryptionError: _unreadable,
    KeyringError: _unreadable,
    Exception: _internal,
}
