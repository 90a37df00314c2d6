"""Retention runner throughput: purge rate with one runner and with two at once, and a dry run's time.

Run: .venv/bin/python ops/bench/retention.py [--conversations 10000] [--turns 10] [--provider-share 0.1]
                                             [--limit N]

Seeds a database of its own on the local Postgres (BENCH_ADMIN_URL, default the test server's
`postgres` database) once: N conversations opened through the service's own audited open path
(`open_conversation`, a data key each), each with T turns of two sealed steps (an input and a
reply of about 1 KB, sealed with the conversation's cipher through `append_steps`) and their turn
rows; a share of them on the provider-storage route `public-faq`, with one provider copy per
turn on the ledger. Every deadline is then set in the past. Each measurement runs on a copy of
that database (CREATE DATABASE ... TEMPLATE), as `custody retention run` processes (the command
an operator or a cron job runs; their in-process simulator answers the provider deletions):

  - dry run: one `--dry-run` listing every due conversation (its stdout discarded);
  - one runner: one run purging every due conversation;
  - two runners: two runs started at once over the same set.

With `--limit N`, only the first N conversations are left due in the copy for the purges (the
rest stay in the database, so the tables keep their size, with deadlines in the future); by
default every one of them is due. (The runner's own `--limit` would not do here: it counts the
candidates a runner looks at, so two runners with half the limit each purge well under it between
them.)

Rates are conversations purged per second over the runs' own window (earliest start to latest
finish, from the retention_runs rows: process start-up excluded); the wall time of the processes
is shown beside it. Prints a table; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import yaml
from sqlalchemy import func, select, update

from service.audit import RequestMeta
from service.auth import Principal
from service.config import EXAMPLE_POLICY, Settings
from service.conversations import append_steps, encode_json, load_cipher, open_conversation
from service.database import migrate
from service.ids import new_id
from service.key_store import migrate_key_store
from service.models import Conversation, Turn, UpstreamInteraction
from service.runtime import Runtime, build_runtime
from service.tenants import create_tenant, issue_key

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
TENANTS = 8  # each tenant has its own audit chain: seeding in parallel needs no shared lock
RULES: dict[str, Any] = {
    "data_classes": {
        "public": {"delete_after": "P7D"},
        "phi": {"keep_at_least": "P60D", "delete_after": "P1Y"},
    },
    "routes": {"patient-intake": {"delete_after": "P180D"}, "public-faq": {"delete_after": "P7D"}},
}
REPLY = "The clinic is open from eight to six on weekdays; bring your insurance card and a list of medicines. " * 10


def url_of(database: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + database


async def admin(sql: str) -> None:
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def policy_document() -> dict[str, Any]:
    document: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE_POLICY.read_text(encoding="utf-8")))
    for kind, rules in RULES.items():
        for name, rule in rules.items():
            document[kind][name]["retention"] = rule
    return document


def steps_of(turn: int) -> list[Any]:
    question = f"turn {turn}: what are the opening hours, and what should I bring to my appointment?"
    return [
        {"type": "user_input", "content": [{"type": "text", "text": question}]},
        {"type": "model_output", "content": [{"type": "text", "text": REPLY}], "x_sim_meta": {"turn": turn}},
    ]


async def seed_tenant(
    runtime: Runtime, principal: Principal, count: int, turns: int, provider_every: int, done: list[int]
) -> tuple[int, int]:
    """`count` conversations of `turns` turns for one tenant; returns (conversations, provider copies)."""
    ctx = runtime.ctx
    meta = RequestMeta(address=None, request_id=None)
    copies = 0
    for index in range(count):
        stored = provider_every > 0 and index % provider_every == 0
        route, classes = ("public-faq", ["public"]) if stored else ("patient-intake", ["phi"])
        view = await open_conversation(
            ctx, principal, meta, route=route, data_classes=classes, subject=None, metadata=None
        )
        async with ctx.sessions.begin() as session:
            conversation = await session.get(Conversation, view.id)
            if conversation is None:
                raise SystemExit(f"{view.id} vanished while seeding")
            cipher = await load_cipher(session, ctx, conversation)
            for number in range(1, turns + 1):
                turn_id = new_id("turn")
                session.add(
                    Turn(
                        id=turn_id,
                        conversation_id=view.id,
                        number=number,
                        status="completed",
                        first_position=2 * (number - 1),
                        step_count=2,
                        usage={"total_tokens": 400},
                        provider_storage=stored,
                        storage_reason="permitted: bench" if stored else "route_denies: bench",
                        policy_version=ctx.policy.version,
                        upstream_status="completed",
                        upstream_latency_ms=250.0,
                        upstream_attempts=1,
                        key_id=principal.key_id,
                        finished_at=func.now(),
                    )
                )
                await session.flush()
                await append_steps(
                    session, cipher, turn_id, 2 * (number - 1), [encode_json(step) for step in steps_of(number)]
                )
                session.add(
                    UpstreamInteraction(
                        id=f"v1_bench{secrets.token_hex(12)}",
                        tenant_id=principal.tenant_id,
                        conversation_id=view.id,
                        turn_id=turn_id,
                        stored=stored,
                    )
                )
                copies += stored
            conversation.turn_count, conversation.step_count = turns, 2 * turns
        done[0] += 1
    return count, copies


async def seed(env: dict[str, str], conversations: int, turns: int, share: float) -> tuple[int, int]:
    runtime = await build_runtime(Settings.from_env(env), demo_keys=False, verify_upstream=False)
    try:
        ctx = runtime.ctx
        principals = []
        async with ctx.sessions.begin() as session:
            for index in range(TENANTS):
                tenant = await create_tenant(ctx.auditor, session, f"bench-{index}", operator="bench", via="bench")
                row, _ = await issue_key(
                    ctx.auditor, session, ctx.pepper, tenant.id, "backend", operator="bench", via="bench"
                )
                principals.append(Principal(tenant_id=row.tenant_id, key_id=row.id, role="backend"))
        provider_every = round(1 / share) if share > 0 else 0
        shares = [conversations // TENANTS + (i < conversations % TENANTS) for i in range(TENANTS)]
        done = [0]

        async def report() -> None:
            while True:
                await asyncio.sleep(10)
                print(f"  seeded {done[0]}/{conversations}", file=sys.stderr, flush=True)

        reporter = asyncio.create_task(report())
        try:
            results = await asyncio.gather(
                *(
                    seed_tenant(runtime, p, n, turns, provider_every, done)
                    for p, n in zip(principals, shares, strict=True)
                )
            )
        finally:
            reporter.cancel()
        async with ctx.sessions.begin() as session:
            # Every deadline in the past: the whole set is due.
            await session.execute(update(Conversation).values(purge_at=func.now() - func.make_interval(0, 0, 0, 1)))
            due = await session.scalar(select(func.count()).select_from(Conversation))
        if due != conversations:
            raise SystemExit(f"seeded {due} conversations, not {conversations}")
        return sum(r[0] for r in results), sum(r[1] for r in results)
    finally:
        await runtime.aclose()


@dataclass
class Measured:
    name: str
    runners: int
    purged: int
    listed: int
    provider_deleted: int
    window: float  # earliest run start to latest run finish, from the database
    wall: float  # the processes, start-up included
    statuses: list[str]


async def measure(
    name: str, template: str, env: dict[str, str], args: list[str], runners: int, due: int = 0
) -> Measured:
    clone = f"{template}_{secrets.token_hex(3)}"
    await admin(f'CREATE DATABASE "{clone}" TEMPLATE "{template}"')
    try:
        run_env = env | {"DATABASE_URL": url_of(clone)}
        if due:
            connection = await asyncpg.connect(url_of(clone))
            try:
                await connection.execute(
                    "UPDATE conversations SET purge_at = now() + interval '1 year' "
                    "WHERE id NOT IN (SELECT id FROM conversations ORDER BY id LIMIT $1)",
                    due,
                )
            finally:
                await connection.close()
        started = time.monotonic()
        processes = [
            subprocess.Popen(  # noqa: ASYNC220 - Popen only forks; the processes are awaited in threads
                [
                    sys.executable,
                    "-m",
                    "service",
                    "--as",
                    f"bench-{i}",
                    "retention",
                    "run",
                    *args,
                ],
                env=run_env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(runners)
        ]
        for process in processes:
            _, errors = await asyncio.to_thread(process.communicate)
            if process.returncode != 0:
                raise SystemExit(f"{name}: custody retention run exited {process.returncode}: {errors.strip()[-500:]}")
        wall = time.monotonic() - started
        connection = await asyncpg.connect(url_of(clone))
        try:
            rows = await connection.fetch(
                "SELECT status, counts, extract(epoch FROM finished_at) AS f, extract(epoch FROM started_at) AS s "
                "FROM retention_runs"
            )
        finally:
            await connection.close()
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{clone}" WITH (FORCE)')
    counts = [json.loads(r["counts"]) if isinstance(r["counts"], str) else r["counts"] for r in rows]
    window = float(max(r["f"] for r in rows) - min(r["s"] for r in rows))
    return Measured(
        name,
        runners,
        sum(c["purged"] for c in counts),
        sum(c.get("would_purge", 0) for c in counts),
        sum(c["provider_deleted"] for c in counts),
        window,
        wall,
        [r["status"] for r in rows],
    )


async def main_async(args: argparse.Namespace) -> None:
    template = f"custody_bench_retention_{secrets.token_hex(4)}"
    await admin(f'CREATE DATABASE "{template}"')
    # One key store serves the template and its copies: a run destroys only the keys of days that
    # have passed, and every seeded conversation's key is sealed under a day ahead.
    await admin(f'CREATE DATABASE "{template}_keys"')
    try:
        with tempfile.TemporaryDirectory() as scratch:
            made = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "service", "secrets", "init", f"{scratch}/secrets"],
                check=True,
                capture_output=True,
                text=True,
            )
            policy = Path(scratch) / "policy.yaml"
            policy.write_text(yaml.safe_dump(policy_document(), sort_keys=False), encoding="utf-8")
            env = (
                dict(os.environ)
                | dict(line.split("=", 1) for line in made.stdout.split())
                | {
                    "DATABASE_URL": url_of(template),
                    "CUSTODY_KEY_STORE_URL": url_of(f"{template}_keys"),
                    "CUSTODY_USE_SIMULATOR": "true",
                    "CUSTODY_POLICY": str(policy),
                    "CUSTODY_DATA_DIR": f"{scratch}/data",
                }
            )
            for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL"):
                env.pop(name, None)
            await asyncio.to_thread(migrate, url_of(template))
            await asyncio.to_thread(migrate_key_store, url_of(f"{template}_keys"))
            print(
                f"seeding {args.conversations} conversations x {args.turns} turns "
                f"(2 sealed steps each), {args.provider_share:.0%} on a provider-storage route ...",
                file=sys.stderr,
                flush=True,
            )
            started = time.monotonic()
            seeded, copies = await seed(env, args.conversations, args.turns, args.provider_share)
            seeding = time.monotonic() - started
            results = [
                await measure("dry run", template, env, ["--dry-run"], 1),
                await measure("purge, one runner", template, env, [], 1, args.limit),
                await measure("purge, two runners at once", template, env, [], 2, args.limit),
            ]
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        await admin(f'DROP DATABASE IF EXISTS "{template}_keys" WITH (FORCE)')

    print(
        f"retention runner: {seeded} due conversations x {args.turns} turns ({2 * args.turns} sealed steps each), "
        f"{copies} provider copies on the ledger; seeded in {seeding:.0f} s"
    )
    print(f"purges: {'all due conversations' if not args.limit else f'the first {args.limit} due'}")
    print(
        f"{'measurement':<28} | {'runners':>7} | {'purged':>6} | {'listed':>6} | {'copies deleted':>14} | "
        f"{'run s':>7} | {'wall s':>7} | {'conversations/s':>15}"
    )
    for m in results:
        rate = (m.listed or m.purged) / m.window if m.window else float("nan")
        print(
            f"{m.name:<28} | {m.runners:>7} | {m.purged:>6} | {m.listed:>6} | {m.provider_deleted:>14} | "
            f"{m.window:>7.1f} | {m.wall:>7.1f} | {rate:>15.0f}"
        )
        if set(m.statuses) != {"completed"}:
            print(f"  note: run statuses {m.statuses}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=10_000)
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument(
        "--provider-share", type=float, default=0.1, help="share of conversations with provider copies (one per turn)"
    )
    parser.add_argument(
        "--limit", type=int, default=0, help="conversations left due for each purge measurement (0: all)"
    )
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
