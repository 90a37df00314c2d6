"""The request and response bodies of the REST API (msgspec structs), and how its errors are
documented: the problem+json body, which statuses mean what, and the headers that come with them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar.openapi.datastructures import ResponseSpec
from litestar.openapi.spec import OpenAPIHeader, OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.plugins import OpenAPISchemaPlugin
from litestar.typing import FieldDefinition

from ..conversations import ConversationSummary
from ..ids import id_pattern
from ..legal_holds import HoldView
from ..policy import Policy
from ..retention import Candidate
from ..retention_rules import RetentionRule
from ..retention_status import PendingCopies, RunView
from ..turns import TurnResult
from .problems import PROBLEM_JSON
from .streaming import EVENT_STREAM, EVENT_STREAM_DOC

if TYPE_CHECKING:
    from litestar._openapi.schema_generation import SchemaCreator

__all__ = [
    "AUTHENTICATED",
    "ApiOperation",
    "AuditEventsOut",
    "AuditVerifyOut",
    "ConversationCreate",
    "ConversationHoldCreate",
    "ConversationOut",
    "ConversationSummaryOut",
    "ConversationsOut",
    "DeletionReceiptOut",
    "HistoryOut",
    "HistoryStep",
    "HoldCreate",
    "HoldOut",
    "HoldsOut",
    "PolicyOut",
    "Problem",
    "ProviderCopiesOut",
    "RetentionPreviewOut",
    "RetentionRunCreate",
    "RetentionRunOut",
    "StorageOut",
    "StructSchemas",
    "SubjectHoldCreate",
    "TenantHoldCreate",
    "TurnCreate",
    "TurnOut",
    "TurnStatusOut",
    "problem_responses",
]


class ConversationCreate(msgspec.Struct, forbid_unknown_fields=True):
    """Open a conversation on a route, declaring the data classes it will carry."""

    # The names come from the deployment's policy, so the document gives examples (those of the
    # example policy), not an enum: a client generated from it works with any policy.
    route: Annotated[
        str,
        msgspec.Meta(description="A route of the deployment's policy.", examples=["patient-intake", "billing-support"]),
    ]
    data_classes: Annotated[
        list[str],
        msgspec.Meta(
            description="The data classes the conversation will carry (names from the policy); at least one.",
            examples=[["phi"], ["pan", "pii"]],
        ),
    ]
    # An identifier of the data subject (e.g. a patient or card holder id); stored encrypted,
    # with a keyed digest for retention and erasure requests.
    subject: str | None = None
    metadata: dict[str, Any] | None = None


class ConversationOut(msgspec.Struct):
    id: str
    route: str
    data_classes: list[str]
    subject: str | None
    metadata: dict[str, Any]
    policy_version: str
    turn_count: int
    step_count: int
    created_at: datetime
    updated_at: datetime


class TurnCreate(msgspec.Struct, forbid_unknown_fields=True):
    """A turn's input: a string, a list of content blocks, or `user_input` / `function_result`
    steps."""

    input: Annotated[
        str | list[dict[str, Any]] | dict[str, Any],
        msgspec.Meta(
            description="Text, a list of content blocks, or `user_input` / `function_result` steps.",
            examples=[
                "I have had a headache for two days.",
                [{"type": "text", "text": "Which slots are free next week?"}],
            ],
        ),
    ]
    background: Annotated[
        bool,
        msgspec.Meta(
            description="Run the turn in the background: the answer is 202 with the turn's id at once, and "
            "`GET /v1/conversations/{id}/turns/{turn_id}` shows its progress and result. Only on a route that "
            "permits background turns and where provider storage is permitted (422 `background-not-permitted` "
            "otherwise)."
        ),
    ] = False


class StorageOut(msgspec.Struct):
    """Whether the provider was allowed to keep this turn (`store`, as sent to the model), and why."""

    store: bool
    reason: str


class TurnOut(msgspec.Struct):
    conversation_id: str
    turn_id: str
    turn_number: int
    status: str  # completed | requires_action | failed
    # Why a turn failed (e.g. `model_failed`, `model_incomplete`); a failed turn stores nothing
    # and returns no steps.
    error_code: str | None
    steps: list[dict[str, Any]]
    output_text: str
    usage: dict[str, int]
    storage: StorageOut
    policy_version: str

    @classmethod
    def of(cls, result: TurnResult) -> TurnOut:
        return cls(
            conversation_id=result.conversation_id,
            turn_id=result.turn_id,
            turn_number=result.turn_number,
            status=result.status,
            error_code=result.error_code,
            steps=result.steps,
            output_text=result.output_text,
            usage=result.usage,
            storage=StorageOut(store=result.store, reason=result.storage_reason),
            policy_version=result.policy_version,
        )


class TurnStatusOut(msgspec.Struct):
    """A turn's progress and, once the model has answered, its result (as a foreground turn answers)."""

    conversation_id: str
    turn_id: str
    turn_number: int
    status: Annotated[
        str,
        msgspec.Meta(
            description="`in_progress` while the model works; then `completed`, `requires_action` or `failed` "
            "(`error_code` says why; `cancelled` for a cancelled turn)."
        ),
    ]
    error_code: str | None
    background: Annotated[bool, msgspec.Meta(description="Whether the turn runs (or ran) in the background.")]
    result: Annotated[
        TurnOut | None,
        msgspec.Meta(description="The turn's answer once it is `completed` or `requires_action`; null before."),
    ]


class DeletionReceiptOut(msgspec.Struct):
    """A deletion receipt: `payload` says what was destroyed (each conversation's id, step count,
    data-key version, when, which provider copies were deleted or are still pending, and the seqs
    of the audit records) and, for a subject erasure, what had to stay (`kept`: each conversation
    with its reason, `legal_hold` with the `hold_id`, `minimum_retention` with `deletable_from`, or
    `turn_in_progress`), signed with the audit key (Ed25519 over its RFC 8785 form). A receipt a
    retention run signed because the deleting process stopped first carries `recovered: true`."""

    payload: dict[str, Any]
    key_id: str
    signature: str
    public_key: str

    @classmethod
    def of(cls, receipt: dict[str, Any]) -> DeletionReceiptOut:
        return msgspec.convert(receipt, cls)


class ConversationSummaryOut(msgspec.Struct):
    """A conversation as a listing shows it: never its subject, metadata or content."""

    id: str
    route: str
    data_classes: list[str]
    policy_version: str
    turn_count: int
    step_count: int
    created_at: datetime
    updated_at: datetime
    keep_until: Annotated[
        datetime | None,
        msgspec.Meta(description="No deletion before this time (minimum retention); null when no rule says."),
    ]
    purge_at: Annotated[
        datetime | None,
        msgspec.Meta(description="The retention runner purges the conversation from this time on; null: never."),
    ]

    @classmethod
    def of(cls, summary: ConversationSummary) -> ConversationSummaryOut:
        return msgspec.convert(summary, cls, from_attributes=True)


class ConversationsOut(msgspec.Struct):
    conversations: list[ConversationSummaryOut]
    next_cursor: Annotated[
        str | None, msgspec.Meta(description="The `cursor` of the next page; null after the last conversation.")
    ]


class HistoryStep(msgspec.Struct):
    position: int
    turn_id: str
    step: dict[str, Any]


class HistoryOut(msgspec.Struct):
    conversation_id: str
    steps: list[HistoryStep]
    next_cursor: int | None


class AuditEventsOut(msgspec.Struct):
    chain: str
    events: list[dict[str, Any]]  # records as in schemas/audit-event.schema.json
    next_cursor: int | None


class AuditVerifyOut(msgspec.Struct):
    ok: bool
    chain: str
    checked: int
    head_seq: int
    head_hash: str
    first_bad_seq: int | None
    reason: str | None
    checkpoint_seq: int | None


# --- ops: the policy, retention, legal holds and the provider-copy ledger ------------------------


class RetentionRuleOut(msgspec.Struct):
    """ISO 8601 durations: delete after this long without activity; keep at least this long from creation."""

    delete_after: str | None
    keep_at_least: str | None

    @classmethod
    def of(cls, rule: RetentionRule) -> RetentionRuleOut:
        return cls(
            delete_after=rule.delete_after.iso if rule.delete_after else None,
            keep_at_least=rule.keep_at_least.iso if rule.keep_at_least else None,
        )


class DataClassOut(msgspec.Struct):
    description: str
    provider_storage: bool
    retention: RetentionRuleOut


class RouteOut(msgspec.Struct):
    """A route of the policy. `settings` are what Custody sends the model with every turn (model or
    agent, system instruction, tools, generation config, response format): the operator's
    configuration, never conversation content."""

    description: str
    data_classes: list[str]
    provider_storage: bool
    retention: RetentionRuleOut
    provider_ttl: Annotated[
        str | None,
        msgspec.Meta(
            description="How long a provider copy may live before Custody deletes it; null: the provider's own expiry."
        ),
    ]
    settings: dict[str, Any]
    blocked_classes: Annotated[
        list[str],
        msgspec.Meta(
            description="Classes whose detection refuses a turn on this route (`on_detect: block`) instead "
            "of raising the conversation's classification."
        ),
    ]
    background: Annotated[
        bool,
        msgspec.Meta(
            description="Whether a client may ask for a background turn here (only where provider storage is "
            "permitted too)."
        ),
    ] = False
    fallback: Annotated[
        str | None,
        msgspec.Meta(
            description="`generate_content`: a turn the Interactions surface cannot take (a server error, the "
            "surface missing, the circuit breaker open) goes through generateContent instead; null: it fails."
        ),
    ] = None
    media: Annotated[
        MediaRuleOut | None,
        msgspec.Meta(description="The media the route takes; null: text only."),
    ] = None


class MediaRuleOut(msgspec.Struct):
    """A route's media rule: the MIME types it takes, the decoded size of one block and of a turn's
    blocks together, and the URI prefixes a block may name its content by."""

    allowed: list[str]
    max_bytes: int
    max_total_bytes: int
    uri_prefixes: list[str]


class DetectorOut(msgspec.Struct):
    """A detector every turn's input is scanned with: a built-in, or the deployment's own RE2 pattern."""

    data_class: Annotated[str, msgspec.Meta(description="The class a hit raises.")]
    builtin: str | None
    pattern: str | None


class PolicyOut(msgspec.Struct):
    """The policy this service runs under."""

    version: Annotated[str, msgspec.Meta(description="The digest of the policy's content, as records name it.")]
    data_classes: dict[str, DataClassOut]
    routes: dict[str, RouteOut]
    detectors: dict[str, DetectorOut]

    @classmethod
    def of(cls, policy: Policy) -> PolicyOut:
        return cls(
            version=policy.version,
            data_classes={
                name: DataClassOut(c.description, c.provider_storage, RetentionRuleOut.of(c.retention))
                for name, c in sorted(policy.data_classes.items())
            },
            routes={
                name: RouteOut(
                    description=route.description,
                    data_classes=sorted(route.data_classes),
                    provider_storage=route.provider_storage,
                    retention=RetentionRuleOut.of(route.retention),
                    provider_ttl=route.provider_ttl.iso if route.provider_ttl else None,
                    settings=route.upstream_settings(),
                    blocked_classes=sorted(route.blocked_classes),
                    background=route.background,
                    fallback=route.fallback,
                    media=None
                    if route.media is None
                    else MediaRuleOut(
                        sorted(route.media.allowed),
                        route.media.max_bytes,
                        route.media.max_total_bytes,
                        list(route.media.uri_prefixes),
                    ),
                )
                for name, route in sorted(policy.routes.items())
            },
            detectors={
                d.name: DetectorOut(d.data_class, d.builtin, d.pattern_text)
                for d in sorted(policy.detectors.detectors, key=lambda d: d.name)
            },
        )


class RetentionCandidateOut(msgspec.Struct):
    """A conversation a run would purge now, and why: the rule that governs it and the deadline it gives."""

    conversation_id: str
    route: str
    data_classes: list[str]
    delete_after: str | None
    keep_at_least: str | None
    purge_at: str

    @classmethod
    def of(cls, candidate: Candidate) -> RetentionCandidateOut:
        return cls(
            conversation_id=candidate.conversation_id,
            route=candidate.route,
            data_classes=candidate.data_classes,
            delete_after=candidate.delete_after,
            keep_at_least=candidate.keep_at_least,
            purge_at=candidate.purge_at,
        )


class RetentionPreviewOut(msgspec.Struct):
    candidates: list[RetentionCandidateOut]
    more: Annotated[bool, msgspec.Meta(description="More conversations are due than `limit` listed.")]


_RUN_LIMIT = Annotated[int, msgspec.Meta(ge=1, le=1_000_000, description="Purge at most this many conversations.")]


class RetentionRunCreate(msgspec.Struct, forbid_unknown_fields=True):
    """How to run: a dry run lists what it would purge (as counts) and changes nothing."""

    dry_run: bool = False
    limit: _RUN_LIMIT | None = None


class RetentionRunOut(msgspec.Struct):
    """A retention run of the caller's tenant: its status, counts and times; never content."""

    id: str
    dry_run: bool
    status: Annotated[str, msgspec.Meta(description="`running`, `completed` or `failed`.")]
    started_by: Annotated[str, msgspec.Meta(description="The API key id (or CLI operator) that started it.")]
    policy_version: str
    counts: Annotated[
        dict[str, Any],
        msgspec.Meta(
            description="What the run has done so far: purged, skipped (held, busy, or purged by another runner), "
            "failed, provider_deleted, provider_failed, provider_pending, oldest_pending_seconds, recomputed, "
            "expiry_keys_destroyed, expiry_keys_failed, data_keys_moved (always 0 in a tenant's run: expiry "
            "keys are shared by every tenant), seconds, and receipts (a dry run: would_purge)."
        ),
    ]
    started_at: datetime
    finished_at: datetime | None

    @classmethod
    def of(cls, run: RunView) -> RetentionRunOut:
        return msgspec.convert(run, cls, from_attributes=True)


_REASON = Annotated[
    str,
    msgspec.Meta(
        min_length=1,
        max_length=500,
        # Something besides whitespace, and no NUL (which Postgres text cannot hold).
        pattern=r"^[^\x00]*[^\s\x00][^\x00]*$",
        description="Why the hold is placed (a case reference, say): shown to ops, never put in audit records.",
        examples=["litigation hold, case 2026-114"],
    ),
]


class TenantHoldCreate(msgspec.Struct, forbid_unknown_fields=True, tag_field="scope", tag="tenant"):
    """Hold every conversation of the tenant."""

    reason: _REASON


class ConversationHoldCreate(msgspec.Struct, forbid_unknown_fields=True, tag_field="scope", tag="conversation"):
    """Hold one conversation of the tenant."""

    reason: _REASON
    conversation_id: Annotated[
        str, msgspec.Meta(pattern=id_pattern("conv"), description="A conversation of the caller's tenant.")
    ]


class SubjectHoldCreate(msgspec.Struct, forbid_unknown_fields=True, tag_field="scope", tag="subject"):
    """Hold every conversation of one data subject, present and future."""

    reason: _REASON
    subject: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            description="The data subject's identifier, as conversations were opened with it; only its keyed "
            "digest is kept, and it is never shown or recorded.",
        ),
    ]


HoldCreate = TenantHoldCreate | ConversationHoldCreate | SubjectHoldCreate


class HoldOut(msgspec.Struct):
    """A legal hold. A subject hold never shows its subject (only a keyed digest of it is kept)."""

    id: str
    scope: Annotated[str, msgspec.Meta(description="`tenant`, `conversation` or `subject`.")]
    conversation_id: str | None
    reason: str
    active: bool
    created_by: str
    created_at: datetime
    released_at: datetime | None
    released_by: str | None

    @classmethod
    def of(cls, hold: HoldView) -> HoldOut:
        return cls(
            id=hold.id,
            scope=hold.scope,
            conversation_id=hold.conversation_id,
            reason=hold.reason,
            active=hold.released_at is None,
            created_by=hold.created_by,
            created_at=hold.created_at,
            released_at=hold.released_at,
            released_by=hold.released_by,
        )


class HoldsOut(msgspec.Struct):
    holds: list[HoldOut]


class ProviderCopyOut(msgspec.Struct):
    """A copy the provider still holds although Custody asked for its deletion (or its conversation is gone)."""

    interaction_id: str
    conversation_id: str
    created_at: str
    delete_attempts: int
    last_error: Annotated[
        str | None, msgspec.Meta(description="The type of the last deletion error (e.g. `APIError`), never its text.")
    ]


class ProviderCopiesOut(msgspec.Struct):
    count: int
    oldest_seconds: Annotated[
        float | None, msgspec.Meta(description="The oldest pending copy's age in seconds; null when none is pending.")
    ]
    copies: list[ProviderCopyOut]

    @classmethod
    def of(cls, pending: PendingCopies) -> ProviderCopiesOut:
        return cls(
            count=len(pending.copies),
            oldest_seconds=pending.oldest_seconds,
            copies=[msgspec.convert(copy, ProviderCopyOut) for copy in pending.copies],
        )


# --- errors, as the document describes them ------------------------------------------------------


class Problem(msgspec.Struct):
    """An RFC 9457 problem: the body of every error response (`application/problem+json`), as
    `service.api.problems` writes it."""

    type: Annotated[
        str,
        msgspec.Meta(
            pattern=r"^urn:custody:problem:[a-z-]+$",
            description="What went wrong, as a stable URN for programs to branch on.",
            examples=["urn:custody:problem:conversation-not-found"],
        ),
    ]
    title: Annotated[str, msgspec.Meta(description="A short summary of the problem type.")]
    status: Annotated[int, msgspec.Meta(ge=400, le=599, description="The HTTP status code.")]
    detail: Annotated[
        str, msgspec.Meta(description="What to do about this occurrence; never a copy of the request's content.")
    ]
    pointer: Annotated[
        str | msgspec.UnsetType,
        msgspec.Meta(description="Where in the request: a JSON pointer into the body (`/input/0`) or a parameter."),
    ] = msgspec.UNSET
    fields: Annotated[
        list[str] | msgspec.UnsetType,
        msgspec.Meta(description="The body members or parameters that do not match this document (400 only)."),
    ] = msgspec.UNSET
    code: Annotated[
        str | msgspec.UnsetType,
        msgspec.Meta(description="Why the model call failed, as a short machine reason (502 and 504 only)."),
    ] = msgspec.UNSET
    data_classes: Annotated[
        list[str] | msgspec.UnsetType,
        msgspec.Meta(
            description="The data classes the detectors found in a refused turn's input (422 "
            "`data-class-blocked` and `card-security-code` only); never what matched."
        ),
    ] = msgspec.UNSET


# What each status means, whichever operation answers it; an operation may say more (`notes`).
_PROBLEMS: dict[int, str] = {
    400: "Malformed request: the body is not JSON or nests deeper than 64 levels, an integer parameter is not a "
    "plain decimal, or the body or a parameter does not match this document (`fields` names which).",
    401: "No API key, or a malformed, unknown or revoked one.",
    403: "The key's role may not call this operation.",
    404: "No such conversation for this tenant (another tenant's conversation looks the same).",
    409: "Another turn holds the conversation; retry when it ends.",
    413: "The request body is larger than the configured limit.",
    415: "A media block of a type the route does not take (`pointer` says which).",
    422: "The request is well formed but refused (`pointer` says where).",
    429: "Too many failed authentications from this source or on this key id; retry after `Retry-After` seconds.",
    500: "The service failed, or a stored record failed its integrity check; nothing of it is returned.",
    502: "The model call failed after Custody's retries (`code` says why); the turn stored nothing.",
    503: "The database cannot be reached right now, or this replica is shutting down (`shutting-down`); retry after "
    "`Retry-After` seconds.",
    504: "The model call timed out after Custody's retries; the turn stored nothing.",
}

# Every /v1 operation can answer these: authentication and roles are checked against the
# database (401, 403, 503), failed authentications are rate limited (429), and anything
# unexpected is a 500.
AUTHENTICATED = (401, 403, 429, 500, 503)


def problem_responses(*statuses: int, notes: Mapping[int, str] | None = None) -> dict[int, ResponseSpec]:
    """The `responses=` of a route: a problem+json body for each status, described by `_PROBLEMS`
    or by the operation's own `notes`."""
    notes = notes or {}
    return {
        status: ResponseSpec(
            Problem, media_type=PROBLEM_JSON, description=notes.get(status, _PROBLEMS[status]), generate_examples=False
        )
        for status in sorted(set(statuses) | set(notes))
    }


def _header(description: str, schema: Schema, *, required: bool = True) -> OpenAPIHeader:
    return OpenAPIHeader(description=description, schema=schema, required=required)


def _response_headers(status: int) -> dict[str, OpenAPIHeader]:
    """The headers every response with this status carries (see `problems.problem` and
    `app._echo_request_id`)."""
    headers = {
        "X-Request-Id": _header(
            "The request's id, as the audit trail records it: the caller's own X-Request-Id when it has a safe "
            "shape, else one assigned (`req_…`).",
            Schema(type=OpenAPIType.STRING),
        ),
        "X-Custody-Request-Id-Replaced": _header(
            "Present when the caller's X-Request-Id was refused (it could carry personal data) and replaced.",
            Schema(type=OpenAPIType.STRING, enum=["malformed"]),
            required=False,
        ),
    }
    if status == 401:
        headers["WWW-Authenticate"] = _header(
            "The scheme to authenticate with.", Schema(type=OpenAPIType.STRING, examples=['Bearer realm="custody"'])
        )
    if status in (429, 503):
        headers["Retry-After"] = _header(
            "Seconds to wait before retrying.", Schema(type=OpenAPIType.INTEGER, minimum=0)
        )
    return headers


# A dataclass again, so that its `__init__` calls `__post_init__` (Operation has none to call).
@dataclasses.dataclass
class ApiOperation(Operation):
    """An operation as Custody answers it; use as the `operation_class` of every route.

    A `ResponseSpec` cannot carry headers, so the ones the service always sends are added here.
    """

    def __post_init__(self) -> None:
        responses = self.responses or {}
        for status, response in list(responses.items()):
            if not isinstance(response, OpenAPIResponse):
                continue
            if int(status) >= 400 and PROBLEM_JSON not in (response.content or {}):
                # Litestar's guess of a 400 for any operation with parameters, in its own error
                # shape; an operation that can answer 400 says so with `problem_responses`.
                del responses[status]
                continue
            response.headers = {**(response.headers or {}), **_response_headers(int(status))}
            if int(status) == 200 and self.operation_id in ("CreateTurn", "GetTurnEvents"):
                # The streamed answer (Accept: text/event-stream), beside or instead of the JSON one.
                response.content = {
                    **{k: v for k, v in (response.content or {}).items() if k != EVENT_STREAM},
                    EVENT_STREAM: OpenAPIMediaType(
                        schema=Schema(type=OpenAPIType.STRING, description=EVENT_STREAM_DOC)
                    ),
                }
            if int(status) == 202 and self.operation_id == "CreateTurn":
                response.headers["Location"] = _header(
                    "The turn started in the background, to poll: `/v1/conversations/{id}/turns/{turn_id}`.",
                    Schema(type=OpenAPIType.STRING),
                )


class StructSchemas(OpenAPISchemaPlugin):
    """The schemas of the wire structs, as Litestar makes them but truer in two ways it leaves out:

    - a struct that refuses unknown members (`forbid_unknown_fields`: the request is answered 400)
      says so, with `additionalProperties: false`;
    - a member that may be absent (`X | UnsetType`, as in `Problem`) is plainly an X, not a
      one-armed `oneOf` (which client generators turn into a wrapper type).
    """

    def is_plugin_supported_field(self, field_definition: FieldDefinition) -> bool:
        return not field_definition.is_union and field_definition.is_subclass_of(msgspec.Struct)

    def to_openapi_schema(self, field_definition: FieldDefinition, schema_creator: SchemaCreator) -> Schema:
        # The schema Litestar's own plugin for structs makes, then amended.
        builtin = next(
            plugin
            for plugin in schema_creator.plugins
            if plugin is not self and schema_creator.plugin_supports_field(plugin, field_definition)
        )
        schema = builtin.to_openapi_schema(field_definition, schema_creator)
        if field_definition.type_.__struct_config__.forbid_unknown_fields:
            schema.additional_properties = False
        properties = schema.properties or {}
        for name, member in properties.items():
            if isinstance(member, Schema) and member.one_of and len(member.one_of) == 1:
                properties[name] = _one_arm(member)
        return schema


def _one_arm(member: Schema) -> Schema:
    """`{"oneOf": [X], "description": …}` as X with the description."""
    (arm,) = member.one_of or ()
    if not isinstance(arm, Schema):
        return member
    merged = dataclasses.replace(arm)
    for field in dataclasses.fields(member):
        value = getattr(member, field.name)
        if field.name != "one_of" and value is not None:
            setattr(merged, field.name, value)
    return merged
