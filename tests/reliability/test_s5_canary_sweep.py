"""Scenario 5: after the other scenarios, the canary every turn carried is nowhere but in the ciphertext."""

from __future__ import annotations

import asyncio
import subprocess

import asyncpg
import httpx
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from ..conftest import CANARY, NewTenant
from .evidence import Evidence, canary_needles, table_texts
from .figures import Figures


def _hits(texts: list[str]) -> int:
    return sum(text.count(needle) for text in texts for needle in canary_needles(CANARY))


async def test_the_canary_is_in_no_log_span_error_body_audit_record_or_row(
    api: httpx.AsyncClient,
    new_tenant: NewTenant,
    database_url: str,
    spans: InMemorySpanExporter,
    evidence: Evidence,
    figures: Figures,
) -> None:
    """The canary inside every turn's content of every scenario appears, as text or as hex, in no replica log, span, error body, audit record, table row or database dump."""
    # Content of its own first, read back by its owner: the canary really is stored (as
    # ciphertext), so a clean sweep means something even when this test runs alone.
    tenant = await new_tenant()
    created = await api.post(
        "/v1/conversations",
        headers=tenant.headers(),
        json={"route": "patient-intake", "data_classes": ["phi"], "subject": CANARY, "metadata": {"n": CANARY}},
    )
    conversation = created.json()["id"]
    turn = await api.post(
        f"/v1/conversations/{conversation}/turns", headers=tenant.headers(), json={"input": f"{CANARY} sweep"}
    )
    assert turn.status_code == 200, turn.text
    evidence.canary_turns += 1
    refused = await api.post(
        f"/v1/conversations/{conversation}/turns", headers=tenant.headers(), json={"input": CANARY, "extra": CANARY}
    )
    evidence.response("scenario 5 malformed turn", refused)
    readable = (await api.get(f"/v1/conversations/{conversation}/steps", headers=tenant.headers())).text

    logs = [path.read_text(errors="replace") for path in sorted(evidence.logs.glob("*.log"))]
    span_texts = [span.to_json() for span in spans.get_finished_spans()]
    bodies = [body for _, body in evidence.bodies]
    connection = await asyncpg.connect(database_url)
    try:
        audit = [row[0] for row in await connection.fetch("SELECT record::text FROM audit_events")]
    finally:
        await connection.close()
    for path in sorted(evidence.dumps.glob("*.audit.txt")):
        audit.extend(path.read_text().splitlines())
    rows = await table_texts(database_url)
    for path in sorted(evidence.dumps.glob("*.tables.txt")):
        rows.extend(path.read_text().splitlines())
    session_dump = await asyncio.to_thread(
        subprocess.run, ["pg_dump", "--data-only", database_url], capture_output=True, check=True, timeout=300
    )
    dumps = [session_dump.stdout.decode(errors="replace")]
    dumps += [p.read_text(errors="replace") for p in sorted(evidence.dumps.glob("*.pg_dump.sql"))]

    hits = {
        "replica logs": _hits(logs),
        "spans": _hits(span_texts),
        "error bodies": _hits(bodies),
        "audit records": _hits(audit),
        "table rows": _hits(rows),
        "pg_dump": _hits(dumps),
    }
    figures.record(
        "5. canary sweep",
        "after scenarios 1-4: the canary (in every turn's content, subjects and metadata) searched as text and as "
        "bytea hex in the replicas' logs, the in-process spans, every non-2xx body received, every audit record, "
        "every table row as text and pg_dumps of the session database and the killed cluster",
        turns_with_canary=evidence.canary_turns,
        replica_logs=len(logs),
        log_bytes=sum(map(len, logs)),
        spans=len(span_texts),
        error_bodies=len(bodies),
        audit_records=len(audit),
        table_rows=len(rows),
        dump_bytes=sum(map(len, dumps)),
        canary_hits=sum(hits.values()),
        hits_by_source=hits,
    )
    assert CANARY in readable  # the owner reads it back: it is stored, as ciphertext
    assert refused.status_code == 400
    # (Replica logs exist only when the replica scenarios ran in this session.)
    assert span_texts, "a source is empty: the sweep would prove nothing"
    assert bodies, "a source is empty: the sweep would prove nothing"
    assert audit, "a source is empty: the sweep would prove nothing"
    assert rows, "a source is empty: the sweep would prove nothing"
    assert hits == dict.fromkeys(hits, 0), hits
