"""Every error Custody raises on purpose, in one tree.

    CustodyError                           outcome in audit records: denied, unless marked error
    ├── ConfigurationError                 the service cannot start as configured (error)
    │   ├── SchemaBehindError              the database needs `custody migrate`
    │   └── PolicyError                    the policy file is unreadable or invalid
    ├── AuthenticationFailed               no key, an unknown key, or a revoked key        (401)
    ├── TooManyAuthenticationFailures      a source or key id over its failure limit       (429)
    ├── PermissionDenied                   the key's role may not do this                  (403)
    ├── ConversationNotFound               no such conversation for this tenant            (404)
    ├── MalformedRequest                   a body or parameter no valid request has        (400)
    ├── InvalidInput                       malformed or disallowed input                   (422)
    │   └── FunctionResultMismatch         a function_result that answers no pending call
    ├── PolicyViolation                    the request does not fit the route policy       (422)
    │   ├── UnknownRouteError
    │   ├── UnknownDataClassError
    │   ├── DataClassNotAllowedError
    │   ├── DataClassBlocked               the route refuses turns carrying a detected class
    │   │   ├── CardSecurityCodeRefused    a card security code next to a card number (always)
    │   │   └── ModelOutputRefused         the model's answer carries what the route refuses
    │   ├── BackgroundNotPermitted         a background turn where the route or a class forbids it
    │   ├── MediaTypeNotAllowed            a media block of a type the route does not take  (415)
    │   ├── MediaTooLarge                  a media block, or a turn's media, over the route's limit (413)
    │   └── MediaUriNotAllowed             a media block by `uri` the route does not take
    ├── TurnNotFound                       no such turn in this tenant's conversation      (404)
    ├── TurnNotRunning                     the turn to cancel is not a running background turn (409)
    ├── TurnInProgress                     another turn holds the conversation             (409)
    │   └── LeaseLost                      a turn's lease ran out and another took over
    ├── LegalHoldActive                    a legal hold forbids deleting it                (409)
    ├── HoldNotFound                       no such legal hold for this tenant              (404)
    ├── HoldReleased                       the legal hold was released already             (409)
    ├── RetentionRunNotFound               no such retention run for this tenant           (404)
    ├── MinimumRetention                   its keep_at_least has not passed yet            (409)
    ├── IdempotencyKeyReused               same Idempotency-Key, different request         (422)
    ├── IdempotencyKeyInFlight             same Idempotency-Key, first request running     (409)
    ├── UpstreamFailed                     the model call failed after Custody's retries (error, 502/504)
    ├── DatabaseUnavailable                the database cannot be reached right now      (error, 503)
    ├── ShuttingDown                       this replica is draining: retry on another     (error, 503)
    ├── KeyringError                       the keyring is unusable or a key operation failed (error)
    │   └── KeyUnwrapError                 a wrapped data key failed its check            (error, 500)
    │       └── ExpiryKeyDestroyed         its day's expiry key is gone (crypto-shredded)  (error, 500)
    └── DecryptionError                    a sealed record failed its check               (error, 500)

An over-long body is refused by Litestar itself (`request_max_body_size`). The HTTP layer maps
all of these to problem+json in one place (`service.api.problems`), and the CLI to one line and
an exit code (`service.cli`). Messages never contain content: they name fields, files, versions
and codes, never what a client sent or what a key holds.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import ClassVar

__all__ = [
    "AuthenticationFailed",
    "BackgroundNotPermitted",
    "CardSecurityCodeRefused",
    "ConfigurationError",
    "ConversationNotFound",
    "CustodyError",
    "DataClassBlocked",
    "DataClassNotAllowedError",
    "DatabaseUnavailable",
    "DecryptionError",
    "ExpiryKeyDestroyed",
    "FunctionResultMismatch",
    "HoldNotFound",
    "HoldReleased",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyReused",
    "InvalidInput",
    "KeyUnwrapError",
    "KeyringError",
    "LeaseLost",
    "LegalHoldActive",
    "MalformedRequest",
    "MediaRefused",
    "MediaTooLarge",
    "MediaTypeNotAllowed",
    "MediaUriNotAllowed",
    "MinimumRetention",
    "ModelOutputRefused",
    "PermissionDenied",
    "PolicyError",
    "PolicyViolation",
    "RetentionRunNotFound",
    "SchemaBehindError",
    "ShuttingDown",
    "TooManyAuthenticationFailures",
    "TurnInProgress",
    "TurnNotFound",
    "TurnNotRunning",
    "UnknownDataClassError",
    "UnknownRouteError",
    "UpstreamFailed",
    "snake_name",
]


def snake_name(name: str) -> str:
    """`KeyUnwrapError` -> `key_unwrap`: the reason code audit records give an error."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower().removesuffix("_error")


class CustodyError(Exception):
    """Base of Custody's own errors.

    `outcome` says how an audit record reports it: `denied` for a refusal (the caller asked for
    something it may not have), `error` for a failure (something on our side broke).
    """

    outcome: ClassVar[str] = "denied"

    @property
    def reason_code(self) -> str:
        """The short machine reason audit records and spans carry; never content."""
        return snake_name(type(self).__name__)


class ConfigurationError(CustodyError):
    """The service cannot start as configured; the message says what to fix."""

    outcome = "error"


class SchemaBehindError(ConfigurationError):
    def __init__(self, current: str | None, head: str | None, *, variable: str = "DATABASE_URL") -> None:
        what = "the key store's schema" if variable == "CUSTODY_KEY_STORE_URL" else "the database schema"
        super().__init__(
            f"{what} is at revision {current or 'none'} but this code needs {head}: "
            f"run `custody migrate` (with the same {variable}) and start again"
        )
        self.current, self.head = current, head


class PolicyError(ConfigurationError):
    """The policy file is unreadable or invalid; `path` locates the bad field ("" for the file)."""

    def __init__(self, source: str, path: str, problem: str) -> None:
        super().__init__(f"{source}: {path}: {problem}" if path else f"{source}: {problem}")
        self.source = source
        self.path = path
        self.problem = problem


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


class PolicyViolation(CustodyError):
    """A request does not fit the route policy: the caller's mistake, not the file's."""


class UnknownRouteError(PolicyViolation):
    """The requested route is not declared in the policy."""

    def __init__(self, route: str) -> None:
        super().__init__(f"unknown route {route!r}")
        self.route = route


class UnknownDataClassError(PolicyViolation):
    """The request names data classes that the catalogue does not declare."""

    def __init__(self, classes: Iterable[str]) -> None:
        self.classes = tuple(sorted(set(classes)))
        super().__init__("undeclared data classes: " + ", ".join(self.classes))


class DataClassNotAllowedError(PolicyViolation):
    """The request carries data classes that the route does not allow."""

    def __init__(self, route: str, classes: Iterable[str]) -> None:
        self.route = route
        self.classes = tuple(sorted(set(classes)))
        super().__init__(f"route {route} does not allow data classes: " + ", ".join(self.classes))


class DataClassBlocked(PolicyViolation):
    """The detectors found a class in the turn's input that the route blocks (`on_detect: block`):
    the turn is refused, nothing of it stored or sent. Names classes, never what matched."""

    def __init__(self, route: str, classes: Iterable[str]) -> None:
        self.route = route
        self.classes = tuple(sorted(set(classes)))
        super().__init__(
            f"route {route} refuses input carrying data classes: " + ", ".join(self.classes) + "; remove it and retry"
        )


class CardSecurityCodeRefused(DataClassBlocked):
    """A card security code written next to a card number: PCI DSS forbids storing it after
    authorization, so such a turn is refused on every route, whatever its policy says."""

    def __init__(self, route: str, classes: Iterable[str]) -> None:
        PolicyViolation.__init__(
            self,
            "the input carries a card security code next to a card number, which may not be stored; "
            "remove the code and retry",
        )
        self.route = route
        self.classes = tuple(sorted(set(classes)))


class ModelOutputRefused(DataClassBlocked):
    """The model's answer carries what the route refuses to store (a class it blocks or does not
    allow, or a card security code): the turn fails and nothing of it is stored."""

    def __init__(self, route: str, classes: Iterable[str]) -> None:
        classes = tuple(sorted(set(classes)))
        PolicyViolation.__init__(
            self,
            f"the model's answer carries data classes route {route} does not take ("
            + ", ".join(classes)
            + "); nothing of this turn was stored",
        )
        self.route = route
        self.classes = classes


class BackgroundNotPermitted(PolicyViolation):
    """A background turn was asked for where it may not run: the route does not permit background
    turns, or the storage decision does not permit provider storage (a background interaction is
    always one the provider keeps). Nothing of the turn is stored or sent."""

    def __init__(self, route: str, reason: str) -> None:
        # `reason` is the storage decision's code or `route_denies_background`: never content.
        super().__init__(
            f"route {route} does not run background turns for this conversation ({reason}); "
            "send the turn without `background`"
        )
        self.route = route
        self.reason = reason


class MediaRefused(PolicyViolation):
    """A media block of the turn's input does not fit the route's `media` rule: nothing of the turn
    is stored or sent. `pointer` says which block; the message names the route's limits, never
    what the block holds or which type it declared."""

    def __init__(self, message: str, *, pointer: str) -> None:
        super().__init__(message)
        self.pointer = pointer


class MediaTypeNotAllowed(MediaRefused):
    """A media block of a type the route does not take; a route without `media` takes none."""


class MediaTooLarge(MediaRefused):
    """A media block larger than the route's `max_bytes`, or the turn's media larger than its
    `max_total_bytes` (decoded sizes)."""


class MediaUriNotAllowed(MediaRefused):
    """A media block naming its content by `uri` where the route accepts no such URI: the provider
    would fetch content Custody never sees, stores or audits."""


class TurnNotFound(CustodyError):
    """No such turn in this tenant's conversation (another tenant's looks the same)."""

    def __init__(self, turn_id: str) -> None:
        # The id came from the request path: it is not repeated back.
        super().__init__("no such turn in this conversation for this tenant")
        self.requested = turn_id


class TurnNotRunning(CustodyError):
    """Only a background turn still waiting for the model can be cancelled."""

    def __init__(self, status: str) -> None:
        super().__init__(f"the turn is not a running background turn (status {status}); nothing was cancelled")


class LegalHoldActive(CustodyError):
    """A legal hold covers the conversation: nobody may delete it, and the runner does not purge it."""

    def __init__(self, hold_id: str) -> None:
        super().__init__(f"legal hold {hold_id} covers this conversation; it cannot be deleted while it is active")
        self.hold_id = hold_id


class HoldNotFound(CustodyError):
    """No legal hold with this id for this tenant (another tenant's looks the same)."""

    def __init__(self, hold_id: str) -> None:
        # The id came from the request path: it is not repeated back, nor kept as `hold_id`,
        # which the problem mapping copies into the body (the hold that blocks a deletion).
        super().__init__("no such legal hold for this tenant")
        self.requested = hold_id


class HoldReleased(CustodyError):
    """The legal hold was released already; a hold is released once."""

    def __init__(self, hold_id: str) -> None:
        super().__init__(f"legal hold {hold_id} was released already")
        # Not `hold_id`: the problem mapping would add it to the body as the hold that blocks.
        self.released_hold = hold_id


class RetentionRunNotFound(CustodyError):
    """No retention run with this id for this tenant (another tenant's looks the same)."""

    def __init__(self, run_id: str) -> None:
        super().__init__("no such retention run for this tenant")
        self.run_id = run_id


class MinimumRetention(CustodyError):
    """The conversation must be kept until `deletable_from` (its keep_at_least rule)."""

    def __init__(self, deletable_from: str) -> None:
        super().__init__(f"this conversation must be kept until {deletable_from} (its minimum retention)")
        self.deletable_from = deletable_from


class IdempotencyKeyReused(CustodyError):
    pass


class IdempotencyKeyInFlight(CustodyError):
    pass


class UpstreamFailed(CustodyError):
    """The model call failed. `code` is a short machine reason, never upstream content."""

    outcome = "error"

    def __init__(
        self,
        code: str,
        message: str,
        *,
        timeout: bool = False,
        attempts: int = 1,
        interaction_ids: list[str] | None = None,
        upstream_status: int | None = None,
        unavailable: bool = False,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.timeout = timeout
        # The model service's own HTTP status, when it answered with one.
        self.upstream_status = upstream_status
        # Overloaded or failing for now (its 429 or 503, or our breaker open): worth retrying
        # later, after `retry_after` seconds when that is known.
        self.unavailable = unavailable
        self.retry_after = retry_after
        # How many requests Custody sent before giving up; recorded on the failed turn.
        self.attempts = attempts
        # Interactions of the turn that did succeed before it failed (a continued turn): the
        # provider may keep copies of them, so they go into the ledger all the same.
        self.interaction_ids = interaction_ids or []
        # How the turn's history went to the model (service.upstream.HISTORY_SENT).
        self.history_sent = "replayed"
        # The code of the route's generateContent fallback, when it was tried and failed too.
        self.fallback_failed: str | None = None

    @property
    def reason_code(self) -> str:
        return self.code


class DatabaseUnavailable(CustodyError):
    """The database cannot be reached (down, restarting, failing over): retry after a moment.

    Raised for a turn whose model reply is still being stored in the background, and mapped
    from the driver's connection errors at the HTTP boundary.
    """

    outcome = "error"

    def __init__(self, message: str = "the database cannot be reached right now", *, retry_after: int = 2) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ShuttingDown(CustodyError):
    """This replica is stopping (see service/drain.py): it takes no new request, and a turn still
    at the model when the drain time ran out was given back. Retry, on another replica."""

    outcome = "error"
    retry_after = 1

    def __init__(self, message: str = "this replica is shutting down; retry the request") -> None:
        super().__init__(message)


class KeyringError(CustodyError):
    """The keyring is missing, unreadable, unsafe or malformed, or a key operation failed.

    Messages name files and versions, never key bytes.
    """

    outcome = "error"


class KeyUnwrapError(KeyringError):
    """A wrapped key failed its integrity check or names a KEK version the keyring lacks."""


class ExpiryKeyDestroyed(KeyUnwrapError):
    """A data key is sealed under the expiry key of a day that the key store no longer holds: the
    retention runner destroyed it (the day passed), so the data key cannot be opened, ever. On a
    live database this never happens (the runner moves every live data key first); on a restored
    backup it is crypto-shredding at work."""

    def __init__(self, day: str) -> None:
        super().__init__(f"the expiry key of {day} has been destroyed; the data key sealed under it is gone")
        self.day = day


class DecryptionError(CustodyError):
    """A sealed blob could not be opened: wrong key, wrong associated data, or corrupted bytes.

    Messages describe only sizes and causes, never key or plaintext bytes, because these
    errors can end up in logs and problem+json bodies.
    """

    outcome = "error"
