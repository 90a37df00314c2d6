"""Audit exports that carry their own proof, and their offline verification.

A native export is NDJSON: a header line, then one record per line. The header states the
chain, the range (times and seqs), the hash of the last record in the range, the chain's head
when exported, the signed checkpoints inside the range with the newest one overall, and the
public key. `custody audit verify --file EXPORT` re-walks the records without the database;
pin the public key (`--public-key`) to prove more than internal consistency.
"""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from .audit import iso_now, read_checkpoints, stream_records
from .audit_chain import GENESIS, AuditSigner, ChainVerdict, ChainWalk, Checkpoint, attestation_valid, load_public_key
from .audit_fhir import to_fhir_audit_event
from .models import AuditChainHead, AuditEvent

__all__ = [
    "EXPORT_FORMAT",
    "ExportRange",
    "export_header",
    "export_lines",
    "export_range",
    "header_token",
    "verify_export",
]

EXPORT_FORMAT = "custody-audit-export-v1"


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


async def export_header(session: AsyncSession, span: ExportRange, signer: AuditSigner | None) -> dict[str, Any]:
    """The export's first line. With a signer, an attestation signs the exact range: its first
    seq and the hash before it, its last seq and last hash, so that a verifier holding the
    public key can tell an edited, truncated or padded export from the real one."""
    head = await session.scalar(
        select(AuditChainHead).where(AuditChainHead.chain == span.chain).execution_options(populate_existing=True)
    )
    first_prev = last_hash = None
    if span.first_seq is not None and span.last_seq is not None:
        first = await session.get(AuditEvent, (span.chain, span.first_seq))
        last = await session.get(AuditEvent, (span.chain, span.last_seq))
        first_prev = first.record["prev_hash"] if first is not None else None
        last_hash = last.record["hash"] if last is not None else None
    checkpoints = await read_checkpoints(session, span.chain)
    inside = [
        c.as_json()
        for c in checkpoints
        if span.first_seq is not None and span.last_seq is not None and span.first_seq <= c.seq <= span.last_seq
    ]
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
        "checkpoints": inside,
        "latest_checkpoint": checkpoints[-1].as_json() if checkpoints else None,
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


def verify_export(lines: Iterable[str], *, public_key_pem: bytes | None = None) -> tuple[ChainVerdict, str]:
    """Check an export offline; returns the verdict and which key it was checked with.

    The records must link up and end at the stated hash; with a key, the export's signed
    attestation must match the records exactly (first seq and the hash before it, last seq and
    last hash), and the checkpoints inside must be valid. Only a pinned key (`public_key_pem`,
    obtained out of band) proves the export came from Custody; the embedded one proves only that
    the file is consistent with itself.
    """
    iterator = iter(lines)
    header = json.loads(next(iterator))
    if header.get("format") != EXPORT_FORMAT:
        raise ValueError(f"not a {EXPORT_FORMAT} file")
    pem = public_key_pem or (header.get("public_key") or "").encode()
    key = load_public_key(pem) if pem else None
    key_source = "the pinned key" if public_key_pem else "the key embedded in the export (pin one with --public-key)"
    chain = header["chain"]
    span = header["range"]
    records = [json.loads(line) for line in iterator if line.strip()]
    first_seq, last_seq = span["first_seq"], span["last_seq"]

    def bad(seq: int | None, reason: str) -> tuple[ChainVerdict, str]:
        return ChainVerdict(chain, 0, 0, "", seq if seq is not None else 0, reason), key_source

    if key is not None:
        attestation = header.get("attestation")
        if not attestation or not attestation_valid(attestation, key):
            return bad(first_seq, "the export's attestation is missing or not signed by the audit key")
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
        if any(signed.get(name) != value for name, value in stated.items()):
            return bad(first_seq, "the export's header differs from what was signed")
    if first_seq is None:
        return (ChainVerdict(chain, 0, 0, "") if not records else bad(1, "records in an empty range")[0]), key_source
    if not records:
        return bad(first_seq, "the export holds no records")
    start_prev = str(records[0].get("prev_hash", ""))
    if first_seq == 1 and start_prev != GENESIS:
        return bad(1, "the first record of the chain does not start from the genesis hash")
    if key is not None and header["attestation"]["payload"].get("first_prev_hash") != start_prev:
        return bad(first_seq, "the first record's prev_hash differs from the signed one")
    checkpoints = [Checkpoint(**c) for c in header["checkpoints"]]
    walk = ChainWalk(chain, start_seq=first_seq, start_prev_hash=start_prev, checkpoints=checkpoints)
    for record in records:
        if not walk.add(int(record.get("seq", -1)), record):
            break
    verdict = walk.verdict(expected_head=(last_seq, header["range_head_hash"]), public_key=key)
    return verdict, key_source
