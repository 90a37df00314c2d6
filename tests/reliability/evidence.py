"""What the scenarios leave behind for the canary sweep: replica logs, error bodies, database dumps."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import httpx

__all__ = ["Evidence", "canary_needles", "table_texts"]


def canary_needles(canary: str) -> list[str]:
    """The forms the canary would take at rest: the text itself, and its bytes as bytea hex."""
    return [canary, canary.encode().hex()]


@dataclass
class Evidence:
    """Shared by the session: every scenario files here what the final sweep must search."""

    root: Path
    # Bodies of every non-2xx response a scenario received, with where it came from.
    bodies: list[tuple[str, str]] = field(default_factory=list)
    # Turns whose content carried the canary (so that a clean sweep means something).
    canary_turns: int = 0

    @property
    def logs(self) -> Path:
        path = self.root / "logs"
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def dumps(self) -> Path:
        path = self.root / "dumps"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def response(self, where: str, response: httpx.Response) -> None:
        """Keep a response's body if it was not a success."""
        if response.status_code >= 300:
            self.bodies.append((f"{where}: HTTP {response.status_code}", response.text))

    async def snapshot(self, database_url: str, name: str, *, pg_dump: Path | None = None) -> None:
        """Keep a database's audit records and every table as text, and its pg_dump, for the
        sweep: a throwaway cluster is gone by the time the sweep runs."""
        connection = await asyncpg.connect(database_url)
        try:
            audit = await connection.fetch("SELECT record::text FROM audit_events ORDER BY chain, seq")
        finally:
            await connection.close()
        (self.dumps / f"{name}.audit.txt").write_text("\n".join(row[0] for row in audit))
        (self.dumps / f"{name}.tables.txt").write_text("\n".join(await table_texts(database_url)))
        binary = str(pg_dump) if pg_dump else shutil.which("pg_dump")
        if binary:
            dump = await asyncio.to_thread(
                subprocess.run, [binary, "--data-only", database_url], capture_output=True, check=True, timeout=120
            )
            (self.dumps / f"{name}.pg_dump.sql").write_bytes(dump.stdout)

    def files(self) -> list[Path]:
        return sorted(p for p in self.root.rglob("*") if p.is_file())


async def table_texts(database_url: str) -> list[str]:
    """Every row of every table in the public schema, as text (bytea shows as hex)."""
    connection = await asyncpg.connect(database_url)
    try:
        tables = [r[0] for r in await connection.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        texts: list[str] = []
        for table in tables:
            texts.extend(row[0] for row in await connection.fetch(f'SELECT t::text FROM "{table}" t'))
    finally:
        await connection.close()
    return texts
