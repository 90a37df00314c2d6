"""What the expiry layer costs: per data-key open, and per turn, beside the same work without it.

Run: .venv/bin/python ops/bench/expiry_layer.py [--opens 20000] [--loads 500] [--turns 200]

A conversation with a deadline keeps its data key sealed under its deadline's day's expiry key
(kept in the key store, a database of its own) on top of the KEK's key wrap; one without a
deadline keeps the key wrap alone. Builds the service in-process (`build_runtime`, as `custody
serve` does) on a fresh database and key store on the local Postgres (BENCH_ADMIN_URL), under the
example policy with `delete_after: P30D` on the class `phi` (none elsewhere), opens two
conversations on `patient-intake`, one carrying `phi` (sealed) and one `pii` (plain), and
measures, interleaved sample by sample:

  - open, in memory: unwrapping a data key (KW under the KEK) against opening the expiry layer
    first (AES-GCM under the day's key, from the process's cache) and then unwrapping;
  - open, with the database: `load_cipher` in a transaction of its own for a plain and a sealed
    conversation, the day's key cached, and once more with the cache emptied before each open
    (a round trip to the key store: what a replica pays once per day and key, every 10 minutes);
  - opening a conversation through the HTTP app in-process (the sealed one locks its day and seals);
  - a turn, through the HTTP app in-process against the in-process simulator: on a sealed and a
    plain conversation (the claim opens the layer; the finish checks whether the deadline changed
    day, one query for both kinds);
  - that check on its own, and a reseal when the day does change (a turn after midnight).

Prints medians and p99s, and the differences; asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import logging
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import yaml
from sqlalchemy import select, update

from service.api import create_app
from service.config import EXAMPLE_POLICY, Settings
from service.conversations import align_data_keys, load_cipher, unsealed
from service.crypto import WrappedKey
from service.database import migrate
from service.key_store import migrate_key_store
from service.models import Conversation, DataKey
from service.runtime import Runtime, build_runtime
from service.tenants import create_tenant, issue_key

ADMIN_URL = os.environ.get("BENCH_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def url_of(database: str) -> str:
    return ADMIN_URL.rsplit("/", 1)[0] + "/" + database


async def admin(sql: str) -> None:
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def row(name: str, unit: str, plain: list[float], sealed: list[float]) -> str:
    added = [s - p for s, p in zip(sealed, plain, strict=True)]
    return (
        f"{name:<38} {unit:>3} | plain {statistics.median(plain):>8.2f} p99 {percentile(plain, 0.99):>8.2f} | "
        f"sealed {statistics.median(sealed):>8.2f} p99 {percentile(sealed, 0.99):>8.2f} | "
        f"added {statistics.median(added):>7.2f} p99 {percentile(added, 0.99):>7.2f}"
    )


async def timed(work: Callable[[], Awaitable[Any]], scale: float) -> float:
    started = time.perf_counter()
    await work()
    return (time.perf_counter() - started) * scale


def policy_document() -> dict[str, Any]:
    document: dict[str, Any] = copy.deepcopy(yaml.safe_load(EXAMPLE_POLICY.read_text()))
    document["data_classes"]["phi"]["retention"] = {"delete_after": "P30D"}
    return document


async def bench(runtime: Runtime, args: argparse.Namespace) -> None:
    ctx = runtime.ctx
    async with ctx.sessions.begin() as session:
        await create_tenant(ctx.auditor, session, "bench", operator="bench", via="bench")
        _, key = await issue_key(ctx.auditor, session, ctx.pepper, "bench", "backend", operator="bench", via="bench")
    headers = {"Authorization": f"Bearer {key}"}
    transport = httpx.ASGITransport(app=cast(Any, create_app(ctx)))  # Litestar's ASGI types vs httpx's
    async with httpx.AsyncClient(transport=transport, base_url="http://bench", headers=headers, timeout=60) as http:
        ids = {}
        # The same route (the same model call, store=false), one class with a deadline and one without.
        for kind, route, classes in (("plain", "patient-intake", ["pii"]), ("sealed", "patient-intake", ["phi"])):
            created = await http.post("/v1/conversations", json={"route": route, "data_classes": classes})
            created.raise_for_status()
            ids[kind] = created.json()["id"]
            (await http.post(f"/v1/conversations/{ids[kind]}/turns", json={"input": "warm-up"})).raise_for_status()
        async with ctx.sessions() as session:
            rows = {kind: await session.get(DataKey, ids[kind]) for kind in ids}
            conversations = {kind: await session.get(Conversation, ids[kind]) for kind in ids}
        plain_row, sealed_row = rows["plain"], rows["sealed"]
        if plain_row is None or sealed_row is None or plain_row.expiry_day or not sealed_row.expiry_day:
            raise SystemExit("expected one plain and one sealed data key")

        print(f"expiry layer, per data-key open and per turn (in-process; Postgres at {ADMIN_URL.rsplit('@', 1)[-1]})")
        # 1. open, in memory (microseconds)
        plain_us, sealed_us = [], []
        for _ in range(args.opens):
            plain_us.append(await timed(lambda: _unwrap(runtime, plain_row), 1e6))
            sealed_us.append(await timed(lambda: _unwrap(runtime, sealed_row), 1e6))
        print(row("data-key open, in memory", "us", plain_us, sealed_us))

        # 2. open with the database, cached day key, then cold
        async def load(kind: str, cold: bool = False) -> None:
            if cold:
                ctx.expiry_keys.forget()
            conversation = conversations[kind]
            if conversation is None:
                raise SystemExit(f"the {kind} conversation is gone")
            async with ctx.sessions() as session:
                await load_cipher(session, ctx, conversation)

        plain_ms, sealed_ms, cold_ms = [], [], []
        for _ in range(args.loads):
            plain_ms.append(await timed(lambda: load("plain"), 1e3))
            sealed_ms.append(await timed(lambda: load("sealed"), 1e3))
            cold_ms.append(await timed(lambda: load("sealed", cold=True), 1e3))
        print(row("load_cipher, day key cached", "ms", plain_ms, sealed_ms))
        print(row("load_cipher, day key from key store", "ms", plain_ms, cold_ms))

        # 3. opening a conversation (a data key made, and sealed for the one with a deadline)
        async def create(classes: list[str]) -> None:
            made = await http.post("/v1/conversations", json={"route": "patient-intake", "data_classes": classes})
            made.raise_for_status()

        plain_open: list[float] = []
        sealed_open: list[float] = []
        for _ in range(args.turns):
            plain_open.append(await timed(lambda: create(["pii"]), 1e3))
            sealed_open.append(await timed(lambda: create(["phi"]), 1e3))
        print(row("open a conversation (HTTP in-process)", "ms", plain_open, sealed_open))

        # 4. turns
        plain_turn: list[float] = []
        sealed_turn: list[float] = []
        for sample in range(args.turns):
            for kind, into in (("plain", plain_turn), ("sealed", sealed_turn)):
                url = f"/v1/conversations/{ids[kind]}/turns"
                body = {"input": f"sample {sample}: any news?"}
                into.append(await timed(lambda url=url, body=body: _turn(http, url, body), 1e3))
        print(row("turn (HTTP in-process, simulator)", "ms", plain_turn, sealed_turn))

        # 5. the per-turn deadline check alone, and a reseal when the day changes
        async def check(kind: str) -> None:
            async with ctx.sessions.begin() as session:
                await align_data_keys(session, ctx, [ids[kind]])

        async def move(kind: str, days: int) -> None:
            async with ctx.sessions.begin() as session:
                await session.execute(
                    update(Conversation)
                    .where(Conversation.id == ids[kind])
                    .values(purge_at=Conversation.purge_at + timedelta(days=days))
                )
                await align_data_keys(session, ctx, [ids[kind]])

        empty_tx, check_ms, move_ms = [], [], []
        for step in range(args.loads):
            empty_tx.append(await timed(lambda: _empty(runtime), 1e3))
            check_ms.append(await timed(lambda: check("sealed"), 1e3))
            # Back and forth between two days, so every call reseals (both day keys stay cached).
            move_ms.append(await timed(lambda step=step: move("sealed", 1 if step % 2 == 0 else -1), 1e3))
        print(row("deadline check (no day change)", "ms", empty_tx, check_ms))
        print(row("reseal to another day", "ms", empty_tx, move_ms))
        print(
            "plain = the same work without the layer (for the last two rows: an empty transaction); "
            "added = sealed - plain, sample by sample"
        )


def _unwrap(runtime: Runtime, row: DataKey) -> Awaitable[bytes]:
    async def work() -> bytes:
        wrapped: WrappedKey = await unsealed(runtime.ctx, row)
        return runtime.ctx.keyring.unwrap(wrapped)

    return work()


async def _turn(http: httpx.AsyncClient, url: str, body: dict[str, Any]) -> None:
    (await http.post(url, json=body)).raise_for_status()


async def _empty(runtime: Runtime) -> None:
    async with runtime.ctx.sessions.begin() as session:
        await session.execute(select(1))


async def main_async(args: argparse.Namespace) -> None:
    database = f"custody_bench_expiry_{secrets.token_hex(4)}"
    await admin(f'CREATE DATABASE "{database}"')
    await admin(f'CREATE DATABASE "{database}_keys"')
    try:
        with tempfile.TemporaryDirectory() as scratch:
            made = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "service", "secrets", "init", f"{scratch}/secrets", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await made.communicate()
            policy = Path(scratch) / "policy.yaml"
            policy.write_text(yaml.safe_dump(policy_document(), sort_keys=False), encoding="utf-8")
            env = (
                dict(os.environ)
                | dict(line.split("=", 1) for line in out.decode().split())
                | {
                    "DATABASE_URL": url_of(database),
                    "CUSTODY_KEY_STORE_URL": url_of(f"{database}_keys"),
                    "CUSTODY_USE_SIMULATOR": "true",
                    "CUSTODY_POLICY": str(policy),
                    "CUSTODY_DATA_DIR": f"{scratch}/data",
                }
            )
            for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "GOOGLE_GEMINI_BASE_URL"):
                env.pop(name, None)
            await asyncio.to_thread(migrate, url_of(database))
            await asyncio.to_thread(migrate_key_store, url_of(f"{database}_keys"))
            runtime = await build_runtime(Settings.from_env(env), demo_keys=False, verify_upstream=False)
            try:
                await bench(runtime, args)
            finally:
                await runtime.aclose()
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        await admin(f'DROP DATABASE IF EXISTS "{database}_keys" WITH (FORCE)')


def main() -> None:
    # The in-process app and SDK log every request at INFO; only the figures belong on the output.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--opens", type=int, default=20000)
    parser.add_argument("--loads", type=int, default=500)
    parser.add_argument("--turns", type=int, default=200)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
