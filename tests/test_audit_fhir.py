"""Tests for service.audit_fhir: Custody audit records as FHIR R4 AuditEvent resources."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import rfc8785
from fhir.resources.R4B.auditevent import AuditEvent

from service.audit import ACTIONS, FHIR_NDJSON, to_fhir_audit_event, to_fhir_ndjson
from service.config import REPO_ROOT

HL7 = "http://terminology.hl7.org/CodeSystem/"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
REST = HL7 + "audit-event-type"
RESTFUL = "http://hl7.org/fhir/restful-interaction"
LIFECYCLE = HL7 + "dicom-audit-lifecycle"
OUTCOMES = ("success", "denied", "error")
TENANT = "ten_4f01HQ9Z"

Coding = tuple[str, str]

# What the module's header table promises: action -> (type, subtype, action code, lifecycle).
EXPECTED: dict[str, tuple[Coding, Coding | None, str, str | None]] = {
    "conversation.create": ((REST, "rest"), (RESTFUL, "create"), "C", "1"),
    "conversation.read": ((REST, "rest"), (RESTFUL, "read"), "R", "6"),
    "conversation.delete": ((REST, "rest"), (RESTFUL, "delete"), "D", "15"),
    "conversation.list": ((REST, "rest"), (RESTFUL, "search-type"), "R", "6"),
    "subject.erase": ((REST, "rest"), (RESTFUL, "delete"), "D", "15"),
    "turn.start": ((REST, "rest"), (RESTFUL, "create"), "C", "1"),
    "turn.create": ((REST, "rest"), (RESTFUL, "create"), "C", "1"),
    "history.read": ((REST, "rest"), (RESTFUL, "read"), "R", "6"),
    "auth.failure": ((DCM, "110114"), (DCM, "110122"), "E", None),
    "access.denied": ((DCM, "110113"), (DCM, "110132"), "E", None),
    "detector.hit": ((DCM, "110113"), None, "E", None),
    "upstream.store": ((DCM, "110106"), None, "R", "11"),
    "upstream.delete": ((REST, "rest"), (RESTFUL, "delete"), "D", "14"),
    "retention.run": ((DCM, "110100"), None, "E", None),
    "retention.purge": ((REST, "rest"), (RESTFUL, "delete"), "D", "15"),
    "retention.recompute": ((DCM, "110100"), None, "U", None),
    "retention.expire_key": ((DCM, "110100"), None, "D", "15"),
    "retention.preview": ((REST, "rest"), (RESTFUL, "search-type"), "R", "6"),
    "retention.start": ((REST, "rest"), (RESTFUL, "create"), "C", "1"),
    "retention.status": ((REST, "rest"), (RESTFUL, "read"), "R", "6"),
    "policy.read": ((REST, "rest"), (RESTFUL, "read"), "R", "6"),
    "legal_hold.place": ((DCM, "110113"), (DCM, "110135"), "C", "1"),
    "legal_hold.release": ((DCM, "110113"), (DCM, "110135"), "U", None),
    "legal_hold.list": ((REST, "rest"), (RESTFUL, "search-type"), "R", "6"),
    "upstream.list": ((REST, "rest"), (RESTFUL, "search-type"), "R", "6"),
    "tenant.create": ((DCM, "110113"), (DCM, "110129"), "C", "1"),
    "tenant.list": ((REST, "rest"), (RESTFUL, "search-type"), "R", "6"),
    "api_key.issue": ((DCM, "110113"), (DCM, "110137"), "C", "1"),
    "api_key.list": ((REST, "rest"), (RESTFUL, "search-type"), "R", "6"),
    "api_key.revoke": ((DCM, "110113"), (DCM, "110137"), "U", None),
    "keyring.rotate": ((DCM, "110113"), (DCM, "110129"), "E", None),
    "audit.query": ((DCM, "110101"), None, "R", "6"),
    "audit.export": ((DCM, "110106"), None, "R", "10"),
    "audit.verify": ((DCM, "110101"), None, "R", "6"),
    "audit.checkpoint": ((DCM, "110101"), None, "E", None),
    "audit.signing_key_rotate": ((DCM, "110113"), (DCM, "110129"), "E", None),
}

# The resource each action's record names, by the action's first word.
RESOURCE_TYPES = {
    "conversation": "conversation",
    "subject": "conversation",
    "policy": "policy",
    "turn": "turn",
    "history": "conversation",
    "auth": None,
    "access": None,
    "detector": "conversation",
    "upstream": "upstream_interaction",
    "retention": "conversation",
    "legal_hold": "legal_hold",
    "tenant": "tenant",
    "api_key": "api_key",
    "keyring": "keyring",
    "audit": "audit_log",
}
# Where an action's resource is not the one its first word names.
ACTION_RESOURCE_TYPES = {"retention.expire_key": "expiry_key"}
# Actions run from the CLI or a local job: no key, no address, the system chain.
LOCAL_ACTIONS = {
    "tenant.create",
    "tenant.list",
    "api_key.issue",
    "api_key.list",
    "api_key.revoke",
    "keyring.rotate",
    "audit.signing_key_rotate",
    "retention.run",
    "retention.recompute",
    "retention.expire_key",
}

# Every string the converter may write that does not come from the record.
FIXED_STRINGS = {
    "AuditEvent",
    REST,
    RESTFUL,
    DCM,
    LIFECYCLE,
    HL7 + "security-source-type",
    HL7 + "audit-entity-type",
    HL7 + "object-role",
    HL7 + "v3-Confidentiality",
    "rest",
    "create",
    "read",
    "delete",
    "search-type",
    "110100",
    "110101",
    "110106",
    "110113",
    "110114",
    "110122",
    "110129",
    "110132",
    "110135",
    "110137",
    "110153",
    "C",
    "R",
    "U",
    "D",
    "E",
    "0",
    "4",
    "8",
    "1",
    "2",
    "3",
    "6",
    "10",
    "11",
    "13",
    "14",
    "15",
    "19",
    "20",
    "custody",
    "unauthenticated",
    "local process (no API key)",
    "urn:custody:api-key",
    "urn:custody:operator",
    "urn:custody:tenant",
    "action",
    "chain",
    "seq",
    "data_class",
    "policy_version",
    "trace_id",
    "span_id",
    "request_id",
    "prev_hash",
    "hash",
}
REASONS = {"success": None, "denied": "forbidden", "error": "provider_delete_failed"}


def _hex(seed: str, length: int) -> str:
    return hashlib.sha256(seed.encode()).hexdigest()[:length]


def make_record(action: str, outcome: str = "success", seq: int = 12, **overrides: Any) -> dict[str, Any]:
    """A record shaped as service.audit.append writes it, for the given action and outcome."""
    local = action in LOCAL_ACTIONS
    keyless = local or action == "auth.failure"
    resource_type = ACTION_RESOURCE_TYPES.get(action, RESOURCE_TYPES[action.split(".")[0]])
    record: dict[str, Any] = {
        "seq": seq,
        "chain": "system" if keyless else TENANT,
        "recorded_at": "2026-11-24T10:15:02.181000Z",
        "action": action,
        "outcome": outcome,
        "reason": REASONS[outcome],
        "actor": (
            {"tenant_id": None, "key_id": None, "role": None}
            if keyless
            else {"tenant_id": TENANT, "key_id": "key_ab12cd34", "role": "backend"}
        ),
        "resource": {"type": resource_type, "id": None if resource_type is None else f"{resource_type}_9c{seq}"},
        "source": {"address": None if local else "10.2.3.4", "request_id": None if local else "req_7f3a"},
        "data_classes": ["phi", "pii"] if resource_type == "conversation" else [],
        "policy_version": "sha256:" + _hex("policy", 64),
        "trace_id": _hex("trace" + action, 32),
        "span_id": _hex("span" + action, 16),
        "details": {"store": False, "storage_reason": "route_denies", "attempts": 2},
        "prev_hash": _hex(f"prev{seq}", 64),
        "hash": _hex(f"hash{seq}", 64),
    }
    record.update(overrides)
    return record


def all_records() -> list[dict[str, Any]]:
    """One record for every action and outcome, with distinct seqs."""
    pairs = [(action, outcome) for action in sorted(ACTIONS) for outcome in OUTCOMES]
    return [make_record(action, outcome, seq=n) for n, (action, outcome) in enumerate(pairs, 1)]


def assert_custody_rules(event: dict[str, Any]) -> None:
    """What the R4B model does not check: code bindings, sev-1, id length, instant timezone."""
    assert event["action"] in {"C", "R", "U", "D", "E"}
    assert event["outcome"] in {"0", "4", "8", "12"}
    assert re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", event["id"])
    assert datetime.fromisoformat(event["recorded"]).utcoffset() is not None
    assert event["agent"]
    assert all(isinstance(agent["requestor"], bool) for agent in event["agent"])
    for entity in event.get("entity", []):
        assert not ("name" in entity and "query" in entity), "sev-1: not both name and query"


def strings_in(value: Any) -> Iterator[str]:
    """Every string value (not key) in a JSON-like structure."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from strings_in(item)


def allowed_strings(record: dict[str, Any]) -> set[str]:
    """The fixed vocabulary plus what the record holds, spelled as the converter may spell it."""
    allowed = FIXED_STRINGS | set(strings_in(record)) | {str(record["seq"])}
    allowed.add(f"{record['chain']}-{record['seq']}".replace("_", "-"))
    if record["resource"]["type"]:
        allowed.add(f"urn:custody:{record['resource']['type']}")
    for key, value in record["details"].items():
        allowed.add(f"details.{key}")
        allowed.add(json.dumps(value, sort_keys=True, separators=(",", ":")))
    allowed.add("record")
    allowed.add(base64.b64encode(rfc8785.dumps(record)).decode())
    return allowed


@pytest.mark.parametrize("outcome", OUTCOMES)
@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_every_action_and_outcome_is_a_valid_r4_audit_event(action: str, outcome: str) -> None:
    """Every action with every outcome converts to an AuditEvent that R4B and our rules accept."""
    event = to_fhir_audit_event(make_record(action, outcome))
    AuditEvent.model_validate(event)
    assert_custody_rules(event)


def test_the_mapping_table_covers_exactly_the_audit_actions() -> None:
    """The expected coding table names exactly the actions service.audit can write."""
    assert set(EXPECTED) == set(ACTIONS)


@pytest.mark.parametrize("action", sorted(EXPECTED))
def test_each_action_gets_its_documented_coding(action: str) -> None:
    """Type, subtype, action code and entity lifecycle follow the table in the module header."""
    type_, subtype, code, lifecycle = EXPECTED[action]
    event = to_fhir_audit_event(make_record(action))
    assert event["type"] == {"system": type_[0], "code": type_[1]}
    expected_subtype = None if subtype is None else [{"system": subtype[0], "code": subtype[1]}]
    assert event.get("subtype") == expected_subtype
    assert event["action"] == code
    expected_lifecycle = None if lifecycle is None else {"system": LIFECYCLE, "code": lifecycle}
    assert event["entity"][0].get("lifecycle") == expected_lifecycle


@pytest.mark.parametrize(("outcome", "code"), [("success", "0"), ("denied", "4"), ("error", "8")])
def test_outcome_codes_and_reason(outcome: str, code: str) -> None:
    """Success is 0, denied 4 and error 8, and a failure's reason code becomes outcomeDesc."""
    record = make_record("history.read", outcome)
    event = to_fhir_audit_event(record)
    assert event["outcome"] == code
    assert event.get("outcomeDesc") == record["reason"]


@pytest.mark.parametrize(
    ("field", "value", "refusal"),
    [
        ("action", "conversation.share", "no AuditEvent coding for audit action"),
        ("outcome", "maybe", "unknown audit outcome"),
        ("resource", {"type": "patient", "id": "p1"}, "no AuditEvent entity coding for resource type"),
    ],
)
def test_unknown_codes_are_refused(field: str, value: Any, refusal: str) -> None:
    """An action, outcome or resource type with no documented coding raises, never a guess."""
    record = make_record("conversation.read")
    record[field] = value
    with pytest.raises(ValueError, match=refusal):
        to_fhir_audit_event(record)


def test_every_resource_type_the_service_writes_has_an_entity_coding() -> None:
    """Every resource type the service's code writes into records (retention.recompute's retention_policy among them) converts, so no real record breaks a FHIR export."""
    written: set[str] = set()
    for path in (REPO_ROOT / "service").rglob("*.py"):
        written |= set(re.findall(r'resource_type="([a-z_]+)"', path.read_text()))
    assert {"conversation", "legal_hold", "policy", "retention_policy", "retention_run"} <= written
    for resource_type in sorted(written):
        record = make_record("retention.recompute", resource={"type": resource_type, "id": None})
        AuditEvent.model_validate(to_fhir_audit_event(record))


def test_a_time_without_timezone_is_refused() -> None:
    """A naive recorded_at cannot become a FHIR instant, so conversion fails."""
    record = make_record("conversation.read", recorded_at="2026-11-24T10:15:02.181000")
    with pytest.raises(ValueError, match="timezone"):
        to_fhir_audit_event(record)


def test_recorded_is_normalised_to_utc() -> None:
    """A time with an offset is written as the same instant in UTC with a Z."""
    record = make_record("conversation.read", recorded_at="2026-11-24T11:15:02.181+01:00")
    assert to_fhir_audit_event(record)["recorded"] == "2026-11-24T10:15:02.181000Z"


def test_id_is_chain_and_seq_made_fhir_safe() -> None:
    """The id is chain-seq with underscores turned into hyphens."""
    assert to_fhir_audit_event(make_record("conversation.read", seq=7))["id"] == "ten-4f01HQ9Z-7"
    assert to_fhir_audit_event(make_record("auth.failure", seq=7))["id"] == "system-7"


def test_an_id_longer_than_64_characters_is_refused() -> None:
    """A chain id too long for a FHIR id raises rather than being truncated into a clash."""
    with pytest.raises(ValueError, match="64"):
        to_fhir_audit_event(make_record("conversation.read", chain="ten_" + "x" * 70))


def test_authenticated_agent_names_the_key_role_and_address() -> None:
    """An authenticated caller is the requesting agent: key id, role and IP address."""
    agent = to_fhir_audit_event(make_record("conversation.read"))["agent"]
    assert agent == [
        {
            "type": {"coding": [{"system": DCM, "code": "110153"}]},
            "who": {"identifier": {"system": "urn:custody:api-key", "value": "key_ab12cd34"}},
            "role": [{"text": "backend"}],
            "requestor": True,
            "network": {"address": "10.2.3.4", "type": "2"},
        }
    ]


def test_unauthenticated_and_local_agents_are_told_apart() -> None:
    """With no key, a network caller reads as unauthenticated (even a summary of many sources), a CLI action names its operator, and one without reads as local."""
    remote = to_fhir_audit_event(make_record("auth.failure", "denied"))["agent"][0]
    assert remote["who"] == {"display": "unauthenticated"}
    assert "role" not in remote
    assert remote["network"]["address"] == "10.2.3.4"
    local = to_fhir_audit_event(make_record("keyring.rotate"))["agent"][0]
    assert local["who"] == {"display": "local process (no API key)"}
    assert "network" not in local
    overflow = make_record("auth.failure", "denied", source={"address": None, "request_id": None})
    assert to_fhir_audit_event(overflow)["agent"][0]["who"] == {"display": "unauthenticated"}
    operator = {"tenant_id": None, "key_id": None, "role": None, "operator": "alice.ops"}
    named = to_fhir_audit_event(make_record("keyring.rotate", actor=operator))["agent"][0]
    assert named["who"] == {"identifier": {"system": "urn:custody:operator", "value": "alice.ops"}}


def test_the_actor_tenant_is_a_customer_entity_once() -> None:
    """The actor's tenant is an Organization/Customer entity, not repeated as the subject."""
    entities = to_fhir_audit_event(make_record("conversation.read"))["entity"]
    assert entities[1] == {
        "what": {"identifier": {"system": "urn:custody:tenant", "value": TENANT}},
        "type": {"system": HL7 + "audit-entity-type", "code": "3"},
        "role": {"system": HL7 + "object-role", "code": "19"},
    }
    actor = {"tenant_id": TENANT, "key_id": "key_ops1", "role": "ops"}
    own = make_record("tenant.create", actor=actor, resource={"type": "tenant", "id": TENANT})
    assert len(to_fhir_audit_event(own)["entity"]) == 1
    assert len(to_fhir_audit_event(make_record("auth.failure", "denied"))["entity"]) == 1


def test_subject_entity_identifies_the_resource_without_content() -> None:
    """The subject entity names the resource by identifier and codes its kind, nothing more."""
    subject = to_fhir_audit_event(make_record("api_key.revoke"))["entity"][0]
    assert subject["what"] == {"identifier": {"system": "urn:custody:api_key", "value": "api_key_9c12"}}
    assert subject["type"]["code"] == "2"
    assert subject["role"]["code"] == "13"
    assert not {"name", "query", "description"} & subject.keys()


@pytest.mark.parametrize(
    ("classes", "labelled"),
    [
        (["phi"], True),
        (["pii"], True),
        (["pan"], True),
        (["financial"], True),
        (["none"], False),
        ([], False),
        (None, False),
    ],
)
def test_restricted_classes_set_a_confidentiality_label(classes: Any, labelled: bool) -> None:
    """PHI, PII, PAN or financial data labels the subject R; other classes add no label."""
    subject = to_fhir_audit_event(make_record("history.read", data_classes=classes))["entity"][0]
    expected = [{"system": HL7 + "v3-Confidentiality", "code": "R"}] if labelled else None
    assert subject.get("securityLabel") == expected


def test_details_carry_the_record_facts_as_strings() -> None:
    """Data classes, policy, trace, request, hashes and each details key become string details."""
    record = make_record(
        "conversation.create",
        details={"route": "triage", "store": False, "n": 3, "empty": "", "none": None, "nested": {"b": 1, "a": 2}},
    )
    subject = to_fhir_audit_event(record)["entity"][0]
    assert [(d["type"], d.get("valueString")) for d in subject["detail"]] == [
        ("action", "conversation.create"),
        ("chain", TENANT),
        ("seq", "12"),
        ("data_class", "phi"),
        ("data_class", "pii"),
        ("policy_version", record["policy_version"]),
        ("trace_id", record["trace_id"]),
        ("span_id", record["span_id"]),
        ("request_id", "req_7f3a"),
        ("prev_hash", record["prev_hash"]),
        ("hash", record["hash"]),
        ("details.empty", '""'),
        ("details.n", "3"),
        ("details.nested", '{"a":2,"b":1}'),
        ("details.none", "null"),
        ("details.route", "triage"),
        ("details.store", "false"),
        ("record", None),
    ]


def test_an_event_without_a_resource_still_carries_its_record_facts() -> None:
    """An authentication failure has no `what`, but its hashes and trace are kept as details."""
    subject = to_fhir_audit_event(make_record("auth.failure", "denied"))["entity"][0]
    assert "what" not in subject
    assert "lifecycle" not in subject
    types = {d["type"] for d in subject["detail"]}
    assert types >= {"hash", "prev_hash", "trace_id", "details.store"}


def test_output_invents_nothing() -> None:
    """Every string in every event is from the record or the fixed code tables, never made up."""
    for record in all_records():
        event = to_fhir_audit_event(record)
        written = {s for s in strings_in(event) if s != event["recorded"]}
        assert not written - allowed_strings(record), record["action"]


def test_ndjson_is_one_compact_event_per_line() -> None:
    """Several events serialise as one compact, valid R4B JSON object per newline-ended line."""
    records = [*all_records()[:5], make_record("detector.hit", details={"note": "a\nb\u2028c"})]
    body = "".join(to_fhir_ndjson(records))
    assert FHIR_NDJSON == "application/fhir+ndjson"
    assert body.endswith("\n")
    lines = body.split("\n")[:-1]
    assert len(lines) == len(records)
    assert len(body.splitlines()) == len(records), "U+2028 must be escaped, not written raw"
    for line, record in zip(lines, records, strict=True):
        event = json.loads(line)
        assert event == to_fhir_audit_event(record)
        assert line == json.dumps(event, separators=(",", ":"))
        AuditEvent.model_validate_json(line)


def _carried(event: dict[str, Any]) -> Any:
    """The record an event carries in its subject entity's `record` detail, decoded."""
    [detail] = [d for d in event["entity"][0]["detail"] if d["type"] == "record"]
    assert set(detail) == {"type", "valueBase64Binary"}
    return json.loads(base64.b64decode(detail["valueBase64Binary"], validate=True))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"details": {"a": "3", "b": 3, "c": "null", "d": None, "e": "", "f": [1, "1"], "g": 1.5, "h": "true"}},
        {"reason": "", "data_classes": ["PHI"], "policy_version": None, "trace_id": None, "span_id": None},
        {
            "actor": {"tenant_id": TENANT, "key_id": "key_ops1", "role": "ops"},
            "resource": {"type": "tenant", "id": TENANT},
        },
        {"source": {"address": None, "request_id": "req_1"}, "details": {"note": "a\nb\u2028c é"}},
    ],
)
def test_each_event_carries_its_record_losslessly(overrides: dict[str, Any]) -> None:
    """Every event carries the exact native record (values the string details cannot tell apart included) and still validates as R4B."""
    records = [record | overrides for record in all_records()]
    for record in records:
        event = to_fhir_audit_event(record)
        assert _carried(event) == record
        AuditEvent.model_validate(event)
