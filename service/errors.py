"""Every error Custody raises on purpose.

    CustodyError
    ├── ConfigurationError           the service cannot start as configured
    │   └── SchemaBehindError        the database needs `custody migrate`
    ├── AuthenticationFailed         no key, an unknown key, or a revoked key       (401)
    ├── TooManyAuthenticationFailures  a source or key id over its failure limit   (429)
    ├── PermissionDenied             the key's role may not do this                 (403)
    ├── ConversationNotFound         no such conversation for this tenant           (404)
    ├── MalformedRequest             a body or parameter no valid request has       (400)
    ├── InvalidInput                 malformed or disallowed input                  (422)
    │   └── FunctionResultMismatch   a function_result that answers no pending call
    ├── TurnInProgress               another turn holds the conversation            (409)
    │   └── LeaseLost                a turn's lease ran out and another took over
    ├── IdempotencyKeyReused         same Idempotency-Key, different request        (422)
    ├── IdempotencyKeyInFlight       same Idempotency-Key, first request running    (409)
    ├── UpstreamFailed               the model call failed after Custody's retries  (502/504)
    └── DatabaseUnavailable          the database cannot be reached right now        (503)

Policy violations (unknown route or data class, a class the route does not allow) are raised
by `service.policy` as `PolicyViolation` subclasses, and an over-long body is refused by
Litestar itself (`request_max_body_size`). The HTTP layer maps all of these to problem+json in
one place (`service.api.problems`). Messages never contain content.
"""

from __future__ import annotations

__all__ = [
    "AuthenticationFailed",
    "ConfigurationError",
    "ConversationNotFound",
    "DatabaseUnavailable",
    "CustodyError",
    "FunctionResultMismatch",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyReused",
    "InvalidInput",
    "LeaseLost",
    "MalformedRequest",
    "PermissionDenied",
    "SchemaBehindError",
    "TooManyAuthenticationFailures",
    "TurnInProgress",
    "UpstreamFailed",
]


class CustodyError(Exception):
    """Base of Custody's own errors."""


class ConfigurationError(CustodyError):
    """The service cannot start as configured; the message says what to fix."""


class SchemaBehindError(ConfigurationError):
    def __init__(self, current: str | None, head: str | None) -> None:
        super().__init__(
            f"the database schema is at revision {current or 'none'} but this code needs {head}: "
            "run `custody migrate` (with the same DATABASE_URL) and start again"
        )
        self.current, self.head = current, head


class AuthenticationFailed(CustodyError):
    pass


class TooManyAuthenticationFailures(CustodyError):
    """Too many failed authentications from this source, or on this key id, in the current
    window (see `service.auth_failures`); `retry_after` is whole seconds until it ends."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"too many failed authentication attempts; retry after {retry_after} s")
        self.retry_after = retry_after


class PermissionDenied(CustodyError):
    pass


class ConversationNotFound(CustodyError):
    def __init__(self, conversation_id: str) -> None:
        # The id came from the request path; it is not repeated back.
        super().__init__("no such conversation for this tenant")
        self.conversation_id = conversation_id


class MalformedRequest(CustodyError):
    """The request is not one the API could accept whatever its content (too deep, not JSON, a
    parameter in the wrong syntax); the message says which, never what was sent."""


class InvalidInput(CustodyError):
    def __init__(self, message: str, *, pointer: str | None = None) -> None:
        super().__init__(message)
        self.pointer = pointer


class FunctionResultMismatch(InvalidInput):
    pass


class TurnInProgress(CustodyError):
    def __init__(self, conversation_id: str) -> None:
        super().__init__(f"another turn on conversation {conversation_id} is in progress; retry when it ends")


class LeaseLost(TurnInProgress):
    """A turn came back to store its reply after its lease ran out and another turn took the
    conversation over; appending now would fork the history, so the reply is dropped."""


class IdempotencyKeyReused(CustodyError):
    pass


class IdempotencyKeyInFlight(CustodyError):
    pass


class UpstreamFailed(CustodyError):
    """The model call failed. `code` is a short machine reason, never upstream content."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        timeout: bool = False,
        attempts: int = 1,
        interaction_ids: list[str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.timeout = timeout
        # How many requests Custody sent before giving up; recorded on the failed turn.
        self.attempts = attempts
        # Interactions of the turn that did succeed before it failed (a continued turn): the
        # provider may keep copies of them, so they go into the ledger all the same.
        self.interaction_ids = interaction_ids or []


class DatabaseUnavailable(CustodyError):
    """The database cannot be reached (down, restarting, failing over): retry after a moment.

    Raised for a turn whose model reply is still being stored in the background, and mapped
    from the driver's connection errors at the HTTP boundary.
    """

    def __init__(self, message: str = "the database cannot be reached right now", *, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after
