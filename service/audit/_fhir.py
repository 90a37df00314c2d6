"""Conversion of Custody audit records to FHIR R4 (4.0.1) AuditEvent resources and NDJSON."""

# How each Custody action is coded. "rest / x" = type audit-event-type#rest with subtype
# http://hl7.org/fhir/restful-interaction#x; bare numbers are DCM (http://dicom.nema.org/resources/
# ontology/DCM); 110113 = Security Alert. act = AuditEvent.action; lc = the subject entity's
# dicom-audit-lifecycle code (1 Origination, 6 Access/Use, 10 Export, 11 Disclosure, 14 Logical
# deletion, 15 Permanent erasure), "-" where no stage of the data's life fits.
#
# action              type / subtype               act lc  why
# conversation.create rest / create                C   1   a REST create
# conversation.read   rest / read                  R   6   a REST read (metadata only)
# conversation.delete rest / delete                D   15  crypto-shredded: the data key is
#                                                          destroyed, not flagged
# conversation.list   rest / search-type           R   6   a backend lists its conversations (all,
#                                                          or one subject's) by criteria: metadata
#                                                          only, as tenant.list
# subject.erase       rest / delete                D   15  every conversation of one data subject
#                                                          (GDPR Art. 17), crypto-shredded as in
#                                                          conversation.delete; a conditional
#                                                          delete is still rest/delete. The subject
#                                                          is never named (no identifier, no
#                                                          digest): the entity is the conversation
#                                                          type without an id, and each erased one
#                                                          has its own conversation.delete
# turn.start          rest / create                C   1   start of the turn-create interaction
#                                                          (a guess: nothing writes it yet)
# turn.create         rest / create                C   1   a REST create of a turn
# history.read        rest / read                  R   6   the steps of ONE conversation, as in
#                                                          the reference's example; not
#                                                          search-type (no criteria across the
#                                                          type), not history-instance (FHIR
#                                                          means a resource's prior versions)
# auth.failure        110114 User Authentication   E   -   a bearer key checked per request is
#                     / 110122 Login                       a login attempt
# access.denied       110113 / 110132 Use of       E   -   the role may not use the operation;
#                     Restricted Function                  nothing was accessed
# detector.hit        110113                       E   -   no DICOM sub-type fits
# upstream.store      110106 Export                R   11  the provider keeps a copy, so data
#                                                          leaves Custody's security domain;
#                                                          R as for audit.export
# upstream.delete     rest / delete                D   14  we can attest only that the provider
#                                                          accepted the delete
# retention.run       110100 Application Activity  E   -   the scheduled job itself; each erasure
#                                                          is its own retention.purge event
# retention.purge     rest / delete                D   15  crypto-shredding; DICOM's one delete
#                                                          event (110105) is for DICOM studies
# retention.recompute 110100 Application Activity  U   -   deadlines brought to a new policy
# retention.expire_key                                     the runner destroys a passed day's
#                     110100 Application Activity  D   15  expiry key: key material erased for
#                                                          good, which shreds every backup copy
#                                                          of the data keys it sealed
# retention.preview   rest / search-type           R   6   the dry run: the conversations past their
#                                                          deadline (metadata), found by criteria
# retention.start     rest / create                C   1   ops create a run (a job resource), coded
#                                                          as the other creations (tenant.create,
#                                                          api_key.issue); the run itself is its
#                                                          retention.run, its purges retention.purge
# retention.status    rest / read                  R   6   one run's status and counts, read as
#                                                          conversation.read reads metadata
# policy.read         rest / read                  R   6   the policy as configured: routes, classes,
#                                                          rules and settings, no conversation data
# legal_hold.place    110113 / 110135 Object       C   1   a hold changes whether an object may
#                     Security Attributes Changed          be deleted
# legal_hold.release  110113 / 110135              U   -   the hold's state changes
# legal_hold.list     rest / search-type           R   6   ops list holds, as api_key.list
# upstream.list       rest / search-type           R   6   the ledger's provider copies pending
#                                                          deletion (ids, ages, error types)
# tenant.create       110113 / 110129 Security     C   1   a tenant is a new isolation boundary;
#                     Configuration                        110136 Security Roles Changed does
#                                                          not fit: no role definition changes
# tenant.list         rest / search-type           R   6   an operator lists tenants (metadata)
# api_key.issue       110113 / 110137 User         C   1   a key is a principal's credential
#                     security Attributes Changed          and carries its role
# api_key.revoke      110113 / 110137              U   -   revoking sets revoked_at; the key
#                                                          row stays
# api_key.list        rest / search-type           R   6   an operator lists keys (never secrets)
# keyring.rotate      110113 / 110129              E   -   a KEK change is a security
#                                                          configuration change
# audit.query         110101 Audit Log Used        R   6   in-app audit reads (the reference)
# audit.export        110106 Export                R   10  the reference's export shape
# audit.verify        110101 Audit Log Used        R   6   the verifier reads the chain
# audit.checkpoint    110101 Audit Log Used        E   -   the head is read and signed
# audit.signing_key_  110113 / 110129              E   -   the key that signs checkpoints changes,
#   rotate                                                 a security configuration change as
#                                                          keyring.rotate is; one record per chain
#
# outcome: success 0, denied 4 (minor failure), error 8 (serious failure); outcomeDesc = reason.
# entity.type / entity.role (audit-entity-type / object-role) per resource type: api_key, keyring,
# expiry_key, audit_log 2 System Object / 13 Security Resource; policy and retention_policy (the
# route policy, which decides where data may go and how long it stays: security configuration, as
# a keyring is)
# 2 / 13; retention_run 2 / 20 Job; tenant 3 Organization / 19 Customer ("the recipient of
# services"); every other type 2 / 4 Domain Resource.
#
# The subject entity's last detail, `record`, is the native record itself (valueBase64Binary of its
# RFC 8785 JSON): the string details cannot tell 3 from "3" or null from "null", and the hash covers
# the exact values, so without it a FHIR export could not be checked against its chain offline.
#
# The actor's tenant is a second entity (3 Organization / 19 Customer), not a second agent (agents
# are participants, and the tenant did not act: its key did), nor agent.policy (a list of policy
# URIs that authorised the event; a tenant id is not one), nor who.identifier.assigner (Custody,
# not the tenant, assigns key ids).

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import rfc8785

__all__ = ["FHIR_NDJSON", "RECORD_DETAIL", "carried_record", "to_fhir_audit_event", "to_fhir_ndjson"]

FHIR_NDJSON: Final = "application/fhir+ndjson"
RECORD_DETAIL: Final = "record"

_HL7: Final = "http://terminology.hl7.org/CodeSystem/"
_AUDIT_EVENT_TYPE: Final = _HL7 + "audit-event-type"
_RESTFUL: Final = "http://hl7.org/fhir/restful-interaction"
_DCM: Final = "http://dicom.nema.org/resources/ontology/DCM"
_SOURCE_TYPE: Final = _HL7 + "security-source-type"
_ENTITY_TYPE: Final = _HL7 + "audit-entity-type"
_OBJECT_ROLE: Final = _HL7 + "object-role"
_LIFECYCLE: Final = _HL7 + "dicom-audit-lifecycle"
_CONFIDENTIALITY: Final = _HL7 + "v3-Confidentiality"

_Coding = tuple[str, str]  # (system, code)

_REST: Final[_Coding] = (_AUDIT_EVENT_TYPE, "rest")
_SECURITY_ALERT: Final[_Coding] = (_DCM, "110113")
_AUDIT_LOG_USED: Final[_Coding] = (_DCM, "110101")
_EXPORT: Final[_Coding] = (_DCM, "110106")


@dataclass(frozen=True, slots=True)
class _Coded:
    type: _Coding
    subtype: _Coding | None
    action: str
    lifecycle: str | None


def _rest(interaction: str, action: str, lifecycle: str) -> _Coded:
    return _Coded(_REST, (_RESTFUL, interaction), action, lifecycle)


def _alert(subtype: str | None, action: str, lifecycle: str | None = None) -> _Coded:
    return _Coded(_SECURITY_ALERT, (_DCM, subtype) if subtype else None, action, lifecycle)


# The table above, as data. An action missing here is an error, not a default: an export that
# guessed a code for an action it does not know would mis-describe the event to the auditor.
_ACTIONS: Final[Mapping[str, _Coded]] = {
    "conversation.create": _rest("create", "C", "1"),
    "conversation.read": _rest("read", "R", "6"),
    "conversation.delete": _rest("delete", "D", "15"),
    "conversation.list": _rest("search-type", "R", "6"),
    "subject.erase": _rest("delete", "D", "15"),
    "turn.start": _rest("create", "C", "1"),
    "turn.create": _rest("create", "C", "1"),
    "history.read": _rest("read", "R", "6"),
    "auth.failure": _Coded((_DCM, "110114"), (_DCM, "110122"), "E", None),
    "access.denied": _alert("110132", "E"),
    "detector.hit": _alert(None, "E"),
    "upstream.store": _Coded(_EXPORT, None, "R", "11"),
    "upstream.delete": _rest("delete", "D", "14"),
    "retention.run": _Coded((_DCM, "110100"), None, "E", None),
    "retention.purge": _rest("delete", "D", "15"),
    "retention.recompute": _Coded((_DCM, "110100"), None, "U", None),
    "retention.expire_key": _Coded((_DCM, "110100"), None, "D", "15"),
    "retention.preview": _rest("search-type", "R", "6"),
    "retention.start": _rest("create", "C", "1"),
    "retention.status": _rest("read", "R", "6"),
    "policy.read": _rest("read", "R", "6"),
    "legal_hold.place": _alert("110135", "C", "1"),
    "legal_hold.release": _alert("110135", "U"),
    "legal_hold.list": _rest("search-type", "R", "6"),
    "upstream.list": _rest("search-type", "R", "6"),
    "tenant.create": _alert("110129", "C", "1"),
    "tenant.list": _rest("search-type", "R", "6"),
    "api_key.issue": _alert("110137", "C", "1"),
    "api_key.list": _rest("search-type", "R", "6"),
    "api_key.revoke": _alert("110137", "U"),
    "keyring.rotate": _alert("110129", "E"),
    "audit.query": _Coded(_AUDIT_LOG_USED, None, "R", "6"),
    "audit.export": _Coded(_EXPORT, None, "R", "10"),
    "audit.verify": _Coded(_AUDIT_LOG_USED, None, "R", "6"),
    "audit.checkpoint": _Coded(_AUDIT_LOG_USED, None, "E", None),
    "audit.signing_key_rotate": _alert("110129", "E"),
}

_OUTCOMES: Final[Mapping[str, str]] = {"success": "0", "denied": "4", "error": "8"}

# resource type -> (audit-entity-type, object-role)
_ENTITY_KINDS: Final[Mapping[str, tuple[str, str]]] = {
    "conversation": ("2", "4"),
    "turn": ("2", "4"),
    "upstream_interaction": ("2", "4"),
    "legal_hold": ("2", "4"),
    "retention_run": ("2", "20"),
    "policy": ("2", "13"),
    "retention_policy": ("2", "13"),
    "api_key": ("2", "13"),
    "keyring": ("2", "13"),
    "expiry_key": ("2", "13"),
    "audit_log": ("2", "13"),
    "tenant": ("3", "19"),
}

# Classes whose presence makes the record's subject restricted (v3-Confidentiality R); for the
# rest we assert nothing, rather than claim "normal" for data we have not seen.
_RESTRICTED_CLASSES: Final = frozenset({"phi", "pii", "pan", "financial"})

# FHIR id: [A-Za-z0-9\-\.]{1,64}. Custody ids use `_` as their only separator.
_ID_UNSAFE: Final = re.compile(r"[^A-Za-z0-9.\-]")

# A bearer key was presented (or not) over the network; with no address the action came from
# the CLI or another local process, which holds no API key and must not read as "unauthenticated".
_NO_KEY_REMOTE: Final = "unauthenticated"
_NO_KEY_LOCAL: Final = "local process (no API key)"


def to_fhir_audit_event(record: Mapping[str, Any]) -> dict[str, Any]:
    """One Custody audit record as a FHIR R4 AuditEvent; raises ValueError on an unknown code."""
    action = record["action"]
    coded = _ACTIONS.get(action)
    if coded is None:
        raise ValueError(f"no AuditEvent coding for audit action {action!r}")
    outcome = _OUTCOMES.get(record["outcome"])
    if outcome is None:
        raise ValueError(f"unknown audit outcome {record['outcome']!r}")

    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "id": _fhir_id(record["chain"], record["seq"]),
        "type": _coding(coded.type),
    }
    if coded.subtype is not None:
        event["subtype"] = [_coding(coded.subtype)]
    event["action"] = coded.action
    event["recorded"] = _instant(record["recorded_at"])
    event["outcome"] = outcome
    if record["reason"]:
        event["outcomeDesc"] = record["reason"]
    actor = record["actor"] or {}
    source = record["source"] or {}
    event["agent"] = [_agent(actor, source, remote=action == "auth.failure")]
    event["source"] = {"observer": {"display": "custody"}, "type": [_coding((_SOURCE_TYPE, "4"))]}
    event["entity"] = _entities(record, coded, actor, source)
    return event


def carried_record(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """The native record an AuditEvent from `to_fhir_audit_event` carries; None if it has none."""
    try:
        details = event["entity"][0]["detail"]
        [encoded] = [d["valueBase64Binary"] for d in details if d.get("type") == RECORD_DETAIL]
        record = json.loads(base64.b64decode(encoded, validate=True))
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):  # binascii.Error is a ValueError
        return None
    return record if isinstance(record, dict) else None


def to_fhir_ndjson(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    """Each record as one compact AuditEvent line ending in "\\n", for `FHIR_NDJSON` bodies."""
    for record in records:
        # ensure_ascii also escapes U+2028/U+2029, which some line splitters treat as breaks.
        event = to_fhir_audit_event(record)
        yield json.dumps(event, separators=(",", ":"), ensure_ascii=True) + "\n"


def _coding(coding: _Coding) -> dict[str, str]:
    return {"system": coding[0], "code": coding[1]}


def _fhir_id(chain: str, seq: int) -> str:
    fhir_id = _ID_UNSAFE.sub("-", f"{chain}-{seq}")
    # Truncating would let two chains' events share an id, so refuse instead.
    if len(fhir_id) > 64:
        raise ValueError(f"audit event id {fhir_id!r} is longer than FHIR's 64 characters")
    return fhir_id


def _instant(value: str | datetime) -> str:
    """A FHIR instant needs a timezone, so a naive time is refused; the result is UTC."""
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    if moment.utcoffset() is None:
        raise ValueError(f"recorded_at {value!r} has no timezone")
    # Custody writes UTC with microseconds and "Z"; normalising keeps that form for any input.
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _agent(actor: Mapping[str, Any], source: Mapping[str, Any], *, remote: bool) -> dict[str, Any]:
    key_id, address = actor.get("key_id"), source.get("address")
    who: dict[str, Any]
    if key_id:
        who = {"identifier": {"system": "urn:custody:api-key", "value": key_id}}
    elif actor.get("operator"):
        # A person at the console (the CLI): named by the operator identity Custody recorded.
        who = {"identifier": {"system": "urn:custody:operator", "value": actor["operator"]}}
    else:
        # A failed authentication always came over the network, even when its summary record
        # (an overflow of many sources) names no address.
        who = {"display": _NO_KEY_REMOTE if address or remote else _NO_KEY_LOCAL}
    agent: dict[str, Any] = {"type": {"coding": [_coding((_DCM, "110153"))]}, "who": who}
    if actor.get("role"):
        agent["role"] = [{"text": actor["role"]}]
    agent["requestor"] = True
    if address:
        agent["network"] = {"address": address, "type": "2"}
    return agent


def _entities(
    record: Mapping[str, Any], coded: _Coded, actor: Mapping[str, Any], source: Mapping[str, Any]
) -> list[dict[str, Any]]:
    resource = record["resource"] or {}
    resource_type, resource_id = resource.get("type"), resource.get("id")
    subject: dict[str, Any] = {}
    if resource_type is not None:
        kind = _ENTITY_KINDS.get(resource_type)
        if kind is None:
            raise ValueError(f"no AuditEvent entity coding for resource type {resource_type!r}")
        identifier = {"system": f"urn:custody:{resource_type}"}
        if resource_id is not None:
            identifier["value"] = resource_id
        subject["what"] = {"identifier": identifier}
        subject["type"] = _coding((_ENTITY_TYPE, kind[0]))
        subject["role"] = _coding((_OBJECT_ROLE, kind[1]))
        # The lifecycle names the attempted stage; outcome says whether it happened.
        if coded.lifecycle is not None:
            subject["lifecycle"] = _coding((_LIFECYCLE, coded.lifecycle))
    data_classes = record["data_classes"] or []
    if _RESTRICTED_CLASSES.intersection(str(c).lower() for c in data_classes):
        subject["securityLabel"] = [_coding((_CONFIDENTIALITY, "R"))]
    # Record-level facts go on the subject entity (R4 has no event-level detail). With no
    # resource (an authentication failure) the entity has no `what` and carries only these.
    # Neither `name` nor `query` is ever set, so invariant sev-1 holds by construction.
    subject["detail"] = _details(record, data_classes, source)
    entities = [subject]

    tenant_id = actor.get("tenant_id")
    if tenant_id and not (resource_type == "tenant" and resource_id == tenant_id):
        entities.append(
            {
                "what": {"identifier": {"system": "urn:custody:tenant", "value": tenant_id}},
                "type": _coding((_ENTITY_TYPE, "3")),
                "role": _coding((_OBJECT_ROLE, "19")),
            }
        )
    return entities


def _details(record: Mapping[str, Any], data_classes: Iterable[Any], source: Mapping[str, Any]) -> list[dict[str, str]]:
    # The Custody action name is kept because several actions share one FHIR coding
    # (conversation.read and history.read are both rest/read). The string details are for
    # readers; the `record` detail last is the exact record, for verification.
    details = [_detail("action", record["action"]), _detail("chain", record["chain"]), _detail("seq", record["seq"])]
    details += [_detail("data_class", data_class) for data_class in data_classes]
    fixed = (
        ("policy_version", record["policy_version"]),
        ("trace_id", record["trace_id"]),
        ("span_id", record["span_id"]),
        ("request_id", source.get("request_id")),
        ("prev_hash", record["prev_hash"]),
        ("hash", record["hash"]),
    )
    # A null fixed field says nothing; a null under `details` is kept, since its key is a fact.
    details += [_detail(name, value) for name, value in fixed if value is not None]
    for key, value in sorted((record["details"] or {}).items()):
        details.append(_detail(f"details.{key}", value))
    details.append({"type": RECORD_DETAIL, "valueBase64Binary": base64.b64encode(rfc8785.dumps(dict(record))).decode()})
    return details


def _detail(name: str, value: Any) -> dict[str, str]:
    # FHIR strings must be non-empty, so "" is written as JSON (two quotes), as are numbers,
    # booleans, null and nested values (compact, keys sorted, so the text is stable).
    if isinstance(value, str) and value:
        return {"type": name, "valueString": value}
    return {"type": name, "valueString": json.dumps(value, sort_keys=True, separators=(",", ":"))}
