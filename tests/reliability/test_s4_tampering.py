"""Scenario 4: stored ciphertexts flipped and swapped across rows, conversations and tenants are refused on read, and audited."""

from __future__ import annotations

import json
import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx

from ..conftest import CANARY, NewTenant, Tenant
from .evidence import Evidence
from .figures import Figures

TENANTS = 2
CONVERSATIONS_PER_TENANT = 3
TURNS_PER_CONVERSATION = 3
SEED = 20_251_124
UNREADABLE = "urn:custody:problem:stored-data-unreadable"
# What each read is recorded as when it fails.
AUDITED_AS = {
    "history": "history.read",
    "conversation": "conversation.read",
    "turn": "turn.start",
    "replay": "turn.start",
}
# Tampering kinds, with their weights in the random mix.
KINDS = {
    "step bit flip": 3,
    "step swap across positions": 2,
    "step swap across conversations": 2,
    "step swap across tenants": 2,
    "profile bit flip": 1,
    "profile swap": 1,
    "data key bit flip": 1,
    "data key swap": 1,
    "idempotency response bit flip": 1,
    "idempotency response swap": 1,
}


@dataclass(frozen=True)
class Cell:
    """One stored ciphertext: a column of one row."""

    table: str
    column: str
    where: tuple[tuple[str, Any], ...]

    async def write(self, connection: asyncpg.Connection, value: bytes) -> None:
        conditions = " AND ".join(f"{name} = ${i + 2}" for i, (name, _) in enumerate(self.where))
        status = await connection.execute(
            f"UPDATE {self.table} SET {self.column} = $1 WHERE {conditions}", value, *(v for _, v in self.where)
        )
        assert status == "UPDATE 1", (self, status)


@dataclass(frozen=True)
class Replayable:
    """A stored idempotent response, and the request that replays it."""

    cell: Cell
    conversation: str
    key: str
    text: str


def _flip(value: bytes, rng: random.Random) -> bytes:
    changed = bytearray(value)
    changed[rng.randrange(len(changed))] ^= 1 << rng.randrange(8)
    return bytes(changed)


async def test_tampered_ciphertexts_are_refused_on_read_and_audited(
    api: httpx.AsyncClient,
    new_tenant: NewTenant,
    database_url: str,
    evidence: Evidence,
    figures: Figures,
    full: bool,
) -> None:
    """Every bit flip or swap of a step, a profile, a wrapped data key or a stored idempotent response, across rows, conversations and tenants, is refused on read with a stored-data-unreadable problem and an audited failure, and the restored row reads again."""
    tampers = 1000 if full else 100
    rng = random.Random(SEED)
    tenants: list[Tenant] = [await new_tenant() for _ in range(TENANTS)]
    owner: dict[str, Tenant] = {}
    by_tenant: list[list[str]] = []
    sent: dict[str, tuple[str, str]] = {}  # turn id -> (Idempotency-Key, input)
    for t, tenant in enumerate(tenants):
        by_tenant.append([])
        for c in range(CONVERSATIONS_PER_TENANT):
            created = await api.post(
                "/v1/conversations",
                headers=tenant.headers(),
                json={"route": "patient-intake", "data_classes": ["phi"], "subject": CANARY, "metadata": {"n": CANARY}},
            )
            assert created.status_code == 201, created.text
            conversation = created.json()["id"]
            owner[conversation] = tenant
            by_tenant[t].append(conversation)
            for i in range(TURNS_PER_CONVERSATION):
                key, text = f"tamper-{t}-{c}-{i}", f"{CANARY} tamper setup {t} {c} {i}"
                done = await api.post(
                    f"/v1/conversations/{conversation}/turns",
                    headers=tenant.headers() | {"Idempotency-Key": key},
                    json={"input": text},
                )
                assert done.status_code == 200, done.text
                sent[done.json()["turn_id"]] = (key, text)
                evidence.canary_turns += 1
    conversations = list(owner)

    db = await asyncpg.connect(database_url)
    try:
        steps = {
            (r["conversation_id"], r["position"]): r["sealed"]
            for r in await db.fetch(
                "SELECT conversation_id, position, sealed FROM steps WHERE conversation_id = ANY($1)", conversations
            )
        }
        profiles = {
            r["id"]: r["profile"]
            for r in await db.fetch("SELECT id, profile FROM conversations WHERE id = ANY($1)", conversations)
        }
        wrapped = {
            r["conversation_id"]: r["wrapped"]
            for r in await db.fetch(
                "SELECT conversation_id, wrapped FROM data_keys WHERE conversation_id = ANY($1)", conversations
            )
        }
        replayable = [
            Replayable(
                Cell("idempotency_records", "response", (("tenant_id", r["tenant_id"]), ("key", r["key"]))),
                r["conversation_id"],
                *sent[r["turn_id"]],
            )
            for r in await db.fetch(
                "SELECT tenant_id, key, conversation_id, turn_id FROM idempotency_records "
                "WHERE conversation_id = ANY($1) ORDER BY conversation_id, turn_id",
                conversations,
            )
        ]
        responses = {
            item.cell: await db.fetchval(
                "SELECT response FROM idempotency_records WHERE tenant_id = $1 AND key = $2",
                *(v for _, v in item.cell.where),
            )
            for item in replayable
        }
        assert len(replayable) == len(conversations) * TURNS_PER_CONVERSATION
        assert all(responses.values())

        def step_cell(conversation: str, position: int) -> Cell:
            return Cell("steps", "sealed", (("conversation_id", conversation), ("position", position)))

        def positions(conversation: str) -> list[int]:
            return sorted(p for c, p in steps if c == conversation)

        def read_of(conversation: str, allowed: tuple[str, ...]) -> tuple[str, Any]:
            return rng.choice(allowed), conversation

        def plan(kind: str) -> tuple[list[tuple[Cell, bytes]], list[tuple[str, Any]]]:
            """(the cells to overwrite, with what), and the reads that must refuse them."""
            if kind == "step bit flip":
                c = rng.choice(conversations)
                p = rng.choice(positions(c))
                return [(step_cell(c, p), _flip(steps[c, p], rng))], [read_of(c, ("history", "turn"))]
            if kind.startswith("step swap"):
                if kind.endswith("positions"):
                    c = d = rng.choice(conversations)
                    p, q = rng.sample(positions(c), 2)
                elif kind.endswith("conversations"):
                    c, d = rng.sample(rng.choice(by_tenant), 2)
                    p, q = rng.choice(positions(c)), rng.choice(positions(d))
                else:
                    c, d = rng.choice(by_tenant[0]), rng.choice(by_tenant[1])
                    p, q = rng.choice(positions(c)), rng.choice(positions(d))
                cells = [(step_cell(c, p), steps[d, q]), (step_cell(d, q), steps[c, p])]
                return cells, [read_of(x, ("history", "turn")) for x in dict.fromkeys((c, d))]
            if kind == "profile bit flip":
                c = rng.choice(conversations)
                return [(Cell("conversations", "profile", (("id", c),)), _flip(profiles[c], rng))], [
                    ("conversation", c)
                ]
            if kind == "profile swap":
                c, d = rng.sample(conversations, 2)
                cells = [
                    (Cell("conversations", "profile", (("id", c),)), profiles[d]),
                    (Cell("conversations", "profile", (("id", d),)), profiles[c]),
                ]
                return cells, [("conversation", c), ("conversation", d)]
            any_read = ("history", "conversation", "turn")
            if kind == "data key bit flip":
                c = rng.choice(conversations)
                cell = Cell("data_keys", "wrapped", (("conversation_id", c),))
                return [(cell, _flip(wrapped[c], rng))], [read_of(c, any_read)]
            if kind == "data key swap":
                c, d = rng.sample(conversations, 2)
                cells = [
                    (Cell("data_keys", "wrapped", (("conversation_id", c),)), wrapped[d]),
                    (Cell("data_keys", "wrapped", (("conversation_id", d),)), wrapped[c]),
                ]
                return cells, [read_of(c, any_read), read_of(d, any_read)]
            if kind == "idempotency response bit flip":
                item = rng.choice(replayable)
                return [(item.cell, _flip(responses[item.cell], rng))], [("replay", item)]
            first, second = rng.sample(replayable, 2)
            cells = [(first.cell, responses[second.cell]), (second.cell, responses[first.cell])]
            return cells, [("replay", first), ("replay", second)]

        async def read(how: str, target: Any) -> httpx.Response:
            if how == "replay":
                return await api.post(
                    f"/v1/conversations/{target.conversation}/turns",
                    headers=owner[target.conversation].headers() | {"Idempotency-Key": target.key},
                    json={"input": target.text},
                )
            headers = owner[target].headers()
            if how == "history":
                return await api.get(f"/v1/conversations/{target}/steps", params={"limit": 500}, headers=headers)
            if how == "conversation":
                return await api.get(f"/v1/conversations/{target}", headers=headers)
            return await api.post(
                f"/v1/conversations/{target}/turns", headers=headers, json={"input": f"{CANARY} probe"}
            )

        names, weights = list(KINDS), list(KINDS.values())
        done_kinds: Counter[str] = Counter()
        reads = refused = audited = restored_ok = 0
        reasons: Counter[str] = Counter()
        unexpected: list[str] = []
        started = time.monotonic()
        for _ in range(tampers):
            kind = rng.choices(names, weights)[0]
            cells, reads_planned = plan(kind)
            originals = {
                cell: await db.fetchval(
                    f"SELECT {cell.column} FROM {cell.table} WHERE "
                    + " AND ".join(f"{n} = ${i + 1}" for i, (n, _) in enumerate(cell.where)),
                    *(v for _, v in cell.where),
                )
                for cell, _ in cells
            }
            async with db.transaction():
                for cell, value in cells:
                    await cell.write(db, value)
            done_kinds[kind] += 1
            for how, target in reads_planned:
                reads += 1
                response = await read(how, target)
                evidence.response("scenario 4 tampered read", response)
                ok = (
                    response.status_code == 500
                    and response.headers.get("content-type", "").startswith("application/problem+json")
                    and response.json().get("type") == UNREADABLE
                    and bool(response.json().get("detail"))
                )
                refused += ok
                if not ok:
                    unexpected.append(f"{kind} / {how}: HTTP {response.status_code} {response.text[:200]}")
                request_id = response.headers["x-request-id"]
                records = [
                    r
                    for r in await db.fetch(
                        "SELECT record->>'action' AS action, record->>'outcome' AS outcome, record->>'reason' AS reason "
                        "FROM audit_events WHERE record @> $1::jsonb",
                        json.dumps({"source": {"request_id": request_id}}),
                    )
                    if r["outcome"] == "error"
                ]
                if [r["action"] for r in records] == [AUDITED_AS[how]]:
                    audited += 1
                    reasons[records[0]["reason"]] += 1
            async with db.transaction():
                for cell, value in originals.items():
                    await cell.write(db, value)
            for how, target in reads_planned:
                # The same read once the row is restored (a turn is checked by reading the history,
                # so that the check itself stores nothing).
                again = await read("history" if how == "turn" else how, target)
                restored_ok += again.status_code == 200
        elapsed = time.monotonic() - started
    finally:
        await db.close()

    verified = [
        (await api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()["ok"] for tenant in tenants
    ]
    figures.record(
        "4. tampered ciphertexts",
        f"{tampers} random tamperings (seed {SEED}) of stored ciphertexts of {len(conversations)} conversations "
        f"in {TENANTS} tenants: bit flips and swaps of step `sealed` bytes (across positions, conversations, "
        "tenants), conversation `profile`, `data_keys.wrapped` and idempotency `response`; each read back "
        "through the history listing, a conversation read, a new turn or an idempotent replay, then restored",
        tampers=tampers,
        reads=reads,
        refused=refused,
        refusal_rate=f"{100 * refused / reads:.1f}%",
        audited_failures=audited,
        audit_reasons=dict(reasons),
        restored_reads_ok=restored_ok,
        kinds=dict(sorted(done_kinds.items())),
        seconds=round(elapsed, 1),
    )
    assert not unexpected, unexpected[:5]
    assert refused == reads
    assert audited == reads
    assert restored_ok == reads
    assert set(reasons) <= {"decryption", "key_unwrap"}
    assert all(verified)
