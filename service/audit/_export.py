"""Audit exports that carry their own proof, and their offline verification."""

# A native export is NDJSON: a header line, then one record per line. A FHIR export is one
# AuditEvent per line, each carrying its exact native record (see audit_fhir); its header travels
# beside it as one base64url token (`X-Custody-Export-Header`, or printed by `custody audit
# export`). The header states the chain, the range (times and seqs), the hash of the last record
# in the range, the chain's head when exported, the last signed checkpoint inside the range, the
# chain's newest checkpoint, the public key, and an attestation signed over the exact range.
#
# Only the LAST checkpoint inside the range is carried (`checkpoints` stays a list, of zero or
# one): the chain is cumulative, so the hash at that checkpoint already covers every record of
# the range before it, and earlier checkpoints would add nothing but size. That keeps the header
# the same few KB whatever the number of checkpoints, so it fits in an HTTP header. The format
# name is unchanged: `checkpoints` always meant "signed checkpoints inside the range", a verifier
# checks each one listed, and old and new verifiers accept old and new headers alike.
#
# `custody audit verify --file EXPORT [--header TOKEN | --header-file FILE]` re-walks the records
# without the database; pin the public keys (`--public-key`, the key in use and the retired ones)
# to prove more than internal consistency.

from __future__ import annotations

import base64
import itertools
import json
import re
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any, Final, TypeGuard

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..models import AuditChainHead, AuditCheckpoint, AuditEvent
from ._chain import GENESIS, AuditSigner, ChainVerdict, ChainWalk, Checkpoint, attestation_refusal
from ._fhir import carried_record, to_fhir_audit_event
from ._keys import TrustedKeys, parse_public_keys
from ._queries import stream_records
from ._writer import iso_now

__all__ = [
    "EXPORT_FORMAT",
    "ExportRange",
    "ExportUnreadable",
    "export_header",
    "export_lines",
    "export_range",
    "header_token",
    "header_token_in",
    "read_header_token",
    "verify_export",
]

EXPORT_FORMAT = "custody-audit-export-v1"
HEADER_NAME = "X-Custody-Export-Header"


class ExportUnreadable(ValueError):
    """The input is not an export the verifier can read: a mistake to report, not a failed check."""


@dataclass(frozen=True)
class ExportRange:
    chain: str
    since: str | None
    until: str | None
    first_seq: int | None
    last_seq: int | None


async def export_range(session: AsyncSession, chain: str, since: str | None, until: str | None) -> ExportRange:
    """The contiguous seqs whose records fall in [since, until): exports never skip records."""
    recorded_at = AuditEvent.record["recorded_at"].astext
    query = select(func.min(AuditEvent.seq), func.max(AuditEvent.seq)).where(AuditEvent.chain == chain)
    if since is not None:
        query = query.where(recorded_at >= since)
    if until is not None:
        query = query.where(recorded_at < until)
    first, last = (await session.execute(query)).one()
    return ExportRange(
        chain, since, until, int(first) if first is not None else None, int(last) if last is not None else None
    )


async def _last_checkpoint(
    session: AsyncSession, chain: str, *, lowest: int | None = None, highest: int | None = None
) -> Checkpoint | None:
    """The chain's newest checkpoint with lowest <= seq <= highest: one row, however many exist."""
    query = select(AuditCheckpoint).where(AuditCheckpoint.chain == chain)
    if lowest is not None:
        query = query.where(AuditCheckpoint.seq >= lowest)
    if highest is not None:
        query = query.where(AuditCheckpoint.seq <= highest)
    row = await session.scalar(query.order_by(AuditCheckpoint.seq.desc()).limit(1))
    if row is None:
        return None
    return Checkpoint(row.chain, row.seq, row.head_hash, row.signed_at, row.key_id, row.signature)


async def export_header(session: AsyncSession, span: ExportRange, signer: AuditSigner | None) -> dict[str, Any]:
    """The export's first line. With a signer, an attestation signs the exact range: its first
    seq and the hash before it, its last seq and last hash, so that a verifier holding the
    public key can tell an edited, truncated or padded export from the real one."""
    # Columns, not the mapped object: nothing of the head stays in the session's identity map.
    head = (
        await session.execute(
            select(AuditChainHead.seq, AuditChainHead.head_hash).where(AuditChainHead.chain == span.chain)
        )
    ).first()
    first_prev = last_hash = None
    inside: Checkpoint | None = None
    if span.first_seq is not None and span.last_seq is not None:
        first = await session.get(AuditEvent, (span.chain, span.first_seq))
        last = await session.get(AuditEvent, (span.chain, span.last_seq))
        first_prev = first.record["prev_hash"] if first is not None else None
        last_hash = last.record["hash"] if last is not None else None
        inside = await _last_checkpoint(session, span.chain, lowest=span.first_seq, highest=span.last_seq)
    latest = await _last_checkpoint(session, span.chain)
    exported_at = iso_now()
    attestation = None
    if signer is not None:
        attestation = signer.sign_payload(
            {
                "format": EXPORT_FORMAT,
                "chain": span.chain,
                "since": span.since,
                "until": span.until,
                "first_seq": span.first_seq,
                "first_prev_hash": first_prev,
                "last_seq": span.last_seq,
                "last_hash": last_hash,
                "exported_at": exported_at,
            }
        )
    return {
        "format": EXPORT_FORMAT,
        "exported_at": exported_at,
        "chain": span.chain,
        "range": {"since": span.since, "until": span.until, "first_seq": span.first_seq, "last_seq": span.last_seq},
        "range_head_hash": last_hash,
        "chain_head": {"seq": head.seq, "hash": head.head_hash} if head else None,
        "checkpoints": [inside.as_json()] if inside is not None else [],
        "latest_checkpoint": latest.as_json() if latest is not None else None,
        "attestation": attestation,
        "public_key": signer.public_pem() if signer else None,
    }


async def export_lines(session: AsyncSession, header: dict[str, Any], *, fhir: bool = False) -> AsyncIterator[str]:
    """Native: the header, then the range's records; FHIR: one AuditEvent per record (FHIR NDJSON
    lines must all be resources, so the header travels beside it: see `header_token`)."""
    if not fhir:
        yield json.dumps(header, separators=(",", ":")) + "\n"
    span = header["range"]
    if span["first_seq"] is None:
        return
    async for _, record in stream_records(session, header["chain"], first=span["first_seq"], last=span["last_seq"]):
        yield json.dumps(to_fhir_audit_event(record) if fhir else record, separators=(",", ":")) + "\n"


def header_token(header: dict[str, Any]) -> str:
    """The export header as one URL-safe base64 token, for an HTTP header beside a FHIR export."""
    return base64.urlsafe_b64encode(json.dumps(header, separators=(",", ":")).encode()).decode()


def read_header_token(token: str) -> dict[str, Any]:
    """The header from a `header_token` (padding optional); ExportUnreadable if it is not one."""
    text = token.strip()
    try:
        decoded = json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)))
    except ValueError:  # not base64, not UTF-8 or not JSON (binascii and Unicode errors included)
        raise ExportUnreadable(f"the header is not an export header token (the {HEADER_NAME} value)") from None
    return _checked_header(decoded)


_HEADER_LINE = re.compile(rf"^{HEADER_NAME}:[ \t]*(\S+)[ \t\r]*$", re.IGNORECASE | re.MULTILINE)


def header_token_in(text: str) -> str:
    """The header token in a file's text: the token alone, or saved response headers (`curl -D`)."""
    found = _HEADER_LINE.findall(text)
    if found:
        # `curl -L -D` saves every response's headers; the export's are the last.
        return str(found[-1])
    token = text.strip()
    if token and not any(character.isspace() for character in token):
        return token
    raise ExportUnreadable(f"the header file holds neither a token nor a {HEADER_NAME} line")


_CHECKPOINT_FIELDS: Final = frozenset(field.name for field in fields(Checkpoint))


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _checkpoint_of(value: Any) -> Checkpoint | None:
    if not isinstance(value, dict) or value.keys() != _CHECKPOINT_FIELDS:
        return None
    if not _is_int(value["seq"]) or not all(isinstance(value[name], str) for name in value if name != "seq"):
        return None
    return Checkpoint(**value)


def _checked_header(value: Any) -> dict[str, Any]:
    """`value` if it is a header of this format, shaped as `export_header` writes it."""
    if not isinstance(value, dict) or value.get("format") != EXPORT_FORMAT:
        raise ExportUnreadable(f"not a {EXPORT_FORMAT} header")
    span = value.get("range")
    checkpoints = value.get("checkpoints")
    shaped = (
        isinstance(value.get("chain"), str)
        and isinstance(value.get("exported_at"), str)
        and isinstance(span, dict)
        and all(span.get(name) is None or isinstance(span[name], str) for name in ("since", "until"))
        and all(span.get(name) is None or _is_int(span[name]) for name in ("first_seq", "last_seq"))
        and (span.get("first_seq") is None) == (span.get("last_seq") is None)
        and (value.get("range_head_hash") is None or isinstance(value["range_head_hash"], str))
        and isinstance(checkpoints, list)
        and all(_checkpoint_of(c) is not None for c in checkpoints)
        and (value.get("attestation") is None or isinstance(value["attestation"], dict))
        and (value.get("public_key") is None or isinstance(value["public_key"], str))
    )
    if not shaped:
        raise ExportUnreadable(f"the {EXPORT_FORMAT} header is malformed")
    return value


_NOT_JSON: Final = object()


def _parse(line: str | None) -> Any:
    """The line's JSON value; `_NOT_JSON` if it has none (None for no line)."""
    try:
        return json.loads(line) if line is not None else None
    except ValueError:
        return _NOT_JSON


def _is_audit_event(value: Any) -> bool:
    return isinstance(value, dict) and value.get("resourceType") == "AuditEvent"


def _native_record(line: str) -> dict[str, Any] | str:
    """The record on a native export line, or why the line is not one."""
    record = _parse(line)
    if record is _NOT_JSON:
        return "the line is not JSON"
    return record if isinstance(record, dict) else "the line is not a JSON object"


def _fhir_record(line: str) -> dict[str, Any] | str:
    """The record an AuditEvent line carries, or why it cannot be trusted. The whole event must be
    exactly what the carried record converts to, so that an edit to any of its fields is caught
    (the chain then checks the record itself)."""
    event = _parse(line)
    if event is _NOT_JSON:
        return "the line is not JSON"
    if not _is_audit_event(event):
        return "the line is not a FHIR AuditEvent"
    record = carried_record(event)
    if record is None:
        return "the AuditEvent carries no readable Custody record"
    try:
        rebuilt = to_fhir_audit_event(record)
    except (ValueError, KeyError, TypeError, AttributeError):
        return "the AuditEvent's Custody record is not a valid audit record"
    if rebuilt != event:
        return "the AuditEvent differs from the Custody record it carries"
    return record


def _load_keys(pem: bytes, whose: str) -> TrustedKeys:
    try:
        return TrustedKeys(parse_public_keys(pem, whose))
    except ValueError as exc:
        raise ExportUnreadable(str(exc)) from None


_HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


def verify_export(
    lines: Iterable[str],
    *,
    public_key_pem: bytes | None = None,
    pinned_keys: TrustedKeys | None = None,
    fhir_header: str | None = None,
) -> tuple[ChainVerdict, str]:
    """Check an export offline; returns the verdict and which keys it was checked with.

    Without `fhir_header` the lines are a native export (header first); with it (the token from
    `header_token`) they are a FHIR export's AuditEvents. The records must link up and end at
    the stated hash; with keys, the export's signed attestation must match the records exactly
    (first seq and the hash before it, last seq and last hash), and the checkpoint inside must be
    valid, each checked with the key its key id names. Only pinned keys (`pinned_keys`, or
    `public_key_pem`: PEM with one key or several; obtained out of band) prove the export came
    from Custody: pin the audit key in use when it was made, and the retired keys that signed
    before it, so that an export whose range holds a checkpoint signed before a rotation still
    verifies. The embedded key proves only that the file is consistent with itself. Raises
    ExportUnreadable when the input is not an export of the kind stated (a mistake, not a forgery
    to name).
    """
    if public_key_pem is not None and pinned_keys is not None:
        raise ValueError("pin the keys once: public_key_pem or pinned_keys")
    iterator: Iterator[str] = (line for line in lines if line.strip())
    first_line = next(iterator, None)
    first = _parse(first_line)
    records: Iterator[dict[str, Any] | str]
    if fhir_header is None:
        if first_line is None:
            raise ExportUnreadable("the file is empty")
        if first is _NOT_JSON:
            raise ExportUnreadable("line 1 is not JSON: this is not an audit export")
        if _is_audit_event(first):
            raise ExportUnreadable(f"a FHIR export: give its header ({HEADER_NAME}) with --header or --header-file")
        header = _checked_header(first)
        records = (_native_record(line) for line in iterator)
    else:
        if isinstance(first, dict) and "format" in first:
            raise ExportUnreadable("this is a native export, which carries its own header: verify it without --header")
        if first_line is not None and not _is_audit_event(first):
            raise ExportUnreadable("line 1 is not a FHIR AuditEvent: this is not a FHIR audit export")
        header = read_header_token(fhir_header)
        records = (_fhir_record(line) for line in itertools.chain([first_line] if first_line else [], iterator))

    keys: TrustedKeys | None
    if public_key_pem:
        pinned_keys = _load_keys(public_key_pem, "the pinned public key")
    if pinned_keys is not None:
        keys = pinned_keys
        key_source = f"the pinned key{'s' if len(keys) > 1 else ''} {', '.join(keys.ids)}"
    else:
        embedded = header.get("public_key")
        keys = _load_keys(str(embedded).encode(), "the export's embedded public key") if embedded else None
        key_source = "the key embedded in the export (pin one with --public-key)"
    chain = header["chain"]
    span = header["range"]
    first_seq, last_seq = span["first_seq"], span["last_seq"]

    def bad(seq: int | None, reason: str) -> tuple[ChainVerdict, str]:
        return ChainVerdict(chain, 0, 0, "", seq if seq is not None else 0, reason), key_source

    if keys is not None:
        attestation = header.get("attestation")
        if not attestation:
            return bad(first_seq, "the export's attestation is missing")
        refusal = attestation_refusal(attestation, keys, "exported_at")
        if refusal is not None:
            return bad(first_seq, f"the export's attestation is not signed by the audit key: {refusal}")
        signed = attestation["payload"]
        stated = {
            "format": header["format"],
            "chain": chain,
            "since": span["since"],
            "until": span["until"],
            "first_seq": first_seq,
            "last_seq": last_seq,
            "last_hash": header["range_head_hash"],
            "exported_at": header["exported_at"],
        }
        if not isinstance(signed, dict) or any(signed.get(name) != value for name, value in stated.items()):
            return bad(first_seq, "the export's header differs from what was signed")
    item = next(records, None)
    if first_seq is None:
        return (ChainVerdict(chain, 0, 0, "") if item is None else bad(1, "records in an empty range")[0]), key_source
    if item is None:
        return bad(first_seq, "the export holds no records")
    if isinstance(item, str):
        return bad(first_seq, item)
    start_prev = item.get("prev_hash")
    if not isinstance(start_prev, str) or not _HEX_DIGEST.fullmatch(start_prev):
        return bad(first_seq, "the first record's prev_hash is not a SHA-256 hash")
    if first_seq == 1 and start_prev != GENESIS:
        return bad(1, "the first record of the chain does not start from the genesis hash")
    if keys is not None and header["attestation"]["payload"].get("first_prev_hash") != start_prev:
        return bad(first_seq, "the first record's prev_hash differs from the signed one")
    checkpoints = [Checkpoint(**c) for c in header["checkpoints"]]
    walk = ChainWalk(chain, start_seq=first_seq, start_prev_hash=start_prev, checkpoints=checkpoints)
    accepted = 0
    for record in itertools.chain([item], records):
        # Every record before this one was accepted in order, so this line stands at that seq.
        at = first_seq + accepted
        if isinstance(record, str):
            return bad(at, record)
        seq = record.get("seq")
        try:
            added = walk.add(seq if _is_int(seq) else -1, record)
        except ValueError:  # RFC 8785 refuses NaN, infinities and integers past 2**53
            return bad(at, "the record is not canonical JSON, so it cannot be hashed")
        if not added:
            break
        accepted += 1
    verdict = walk.verdict(expected_head=(last_seq, header["range_head_hash"]), keys=keys)
    return verdict, key_source
