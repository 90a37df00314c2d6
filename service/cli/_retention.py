"""`custody retention run`: the retention runner from the console, with its progress and a summary.

The run is the service's own (`service.retention.run_retention`, audited as `retention.run` with
the operator as `started_by`); this module only shows it: a bar on stderr redrawn per batch (a
line per batch when stderr is not a terminal), then a table on stdout of what the run did, or,
for a dry run, of what it would purge and why.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from sqlalchemy import func, select

from ..context import ServiceContext
from ..database_errors import database_unreachable
from ..errors import CustodyError
from ..ids import new_id
from ..legal_holds import held
from ..models import Conversation
from ..retention import Candidate, RunSummary, run_retention
from ..runtime import Runtime
from ..tenants import find_tenant, list_tenants
from ._common import CommandFailed, with_runtime

__all__ = ["add_retention_commands"]

_BAR_WIDTH = 30


def _positive(value: str) -> int:
    """An argparse type: a whole number of at least 1."""
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 1, not {value[:40]!r}")
    return int(value)


async def _due_now(ctx: ServiceContext, tenant_id: str | None, limit: int | None) -> int:
    """How many conversations are past their deadline and not held: the bar's length. An estimate:
    the run recomputes deadlines first, and other runners may purge some meanwhile."""
    query = select(func.count()).select_from(Conversation).where(Conversation.purge_at <= ctx.clock.now(), ~held())
    if tenant_id is not None:
        query = query.where(Conversation.tenant_id == tenant_id)
    async with ctx.sessions() as session:
        due = int(await session.scalar(query) or 0)
    return min(due, limit) if limit is not None else due


class _Progress:
    """The `progress` callback of a run: called once per batch with the run's counts so far."""

    def __init__(self, stream: TextIO, run_id: str, due: int, *, dry_run: bool) -> None:
        self.stream = stream
        self.run_id = run_id
        self.due = due
        self.dry_run = dry_run
        self.terminal = stream.isatty()
        self.batches = 0
        self._drawn = 0

    def __call__(self, summary: RunSummary) -> None:
        self.batches += 1
        if summary.dry_run:
            done = len(summary.candidates)
            counts = f"would purge {done}"
        else:
            done = summary.purged + summary.skipped + summary.failed
            counts = f"purged {summary.purged}, skipped {summary.skipped}, failed {summary.failed}"
        # The estimate may fall short (deadlines recomputed at the start of the run).
        total = max(self.due, done)
        if self.terminal:
            filled = _BAR_WIDTH * done // total if total else _BAR_WIDTH
            line = f"retention run [{'#' * filled}{'.' * (_BAR_WIDTH - filled)}] {done}/{total} {counts}"
            self.stream.write("\r" + line.ljust(self._drawn))
            self._drawn = len(line)
        else:
            self.stream.write(
                f"custody: retention run {self.run_id}: batch {self.batches}, {done} of ~{total}: {counts}\n"
            )
        self.stream.flush()

    def close(self) -> None:
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns padded to their widest cell, two spaces apart."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def _rule(candidate: Candidate) -> str:
    parts = []
    if candidate.delete_after:
        parts.append(f"delete_after {candidate.delete_after}")
    if candidate.keep_at_least:
        parts.append(f"keep_at_least {candidate.keep_at_least}")
    return ", ".join(parts) or "-"


def _report(summary: RunSummary, tenant_names: dict[str, str]) -> list[str]:
    lines = _table(
        [
            ("run", f"{summary.run_id} ({'dry run, ' if summary.dry_run else ''}completed)"),
            ("purged", str(summary.purged)),
            ("skipped", str(summary.skipped)),
            ("failed", str(summary.failed)),
            ("provider copies deleted", str(summary.provider_deleted)),
            ("provider copies failed", str(summary.provider_failed)),
            ("provider copies pending", str(summary.provider_pending)),
            ("oldest pending copy", _age(summary.oldest_pending_seconds)),
            ("deadlines recomputed", str(summary.recomputed)),
            ("receipts recovered", str(summary.receipts_recovered)),
            ("expiry keys destroyed", str(summary.expiry_keys_destroyed)),
            ("expiry keys failed", str(summary.expiry_keys_failed)),
            ("data keys moved", str(summary.data_keys_moved)),
            ("seconds", f"{summary.seconds:.2f}"),
        ]
    )
    if summary.dry_run:
        lines += ["", f"would purge {len(summary.candidates)} conversation(s)"]
        if summary.candidates:
            lines += _table(
                [
                    ("conversation", "tenant", "route", "classes", "rule", "deadline"),
                    *(
                        (
                            c.conversation_id,
                            tenant_names.get(c.tenant_id, c.tenant_id),
                            c.route,
                            ",".join(c.data_classes),
                            _rule(c),
                            c.purge_at,
                        )
                        for c in summary.candidates
                    ),
                ]
            )
    return lines


def _retention_run(args: argparse.Namespace) -> int:
    async def work(runtime: Runtime, operator: str) -> int:
        ctx = runtime.ctx
        tenant_id: str | None = None
        async with ctx.sessions() as session:
            if args.tenant is not None:
                tenant_id = (await find_tenant(session, args.tenant)).id
            names = {tenant.id: tenant.name for tenant in await list_tenants(session)}
        run_id = new_id("run")
        progress = _Progress(sys.stderr, run_id, await _due_now(ctx, tenant_id, args.limit), dry_run=args.dry_run)
        try:
            summary = await run_retention(
                ctx,
                started_by=operator,
                dry_run=args.dry_run,
                tenant_id=tenant_id,
                limit=args.limit,
                progress=progress,
                run_id=run_id,
            )
        except CustodyError:
            raise
        except Exception as exc:
            if database_unreachable(exc):
                raise
            # By type only: a driver's message can quote data or the URL.
            raise CommandFailed(
                f"retention run {run_id} failed ({type(exc).__name__}); "
                "what it purged stays purged, and the next run carries on",
                exit_code=1,
            ) from None
        finally:
            progress.close()
        for line in _report(summary, names):
            print(line)
        return 0

    return with_runtime(args, work)


def add_retention_commands(commands: argparse._SubParsersAction[Any]) -> None:
    retention = commands.add_parser("retention", help="run the retention runner").add_subparsers(
        dest="action", required=True
    )
    run = retention.add_parser(
        "run",
        help="purge every conversation past its deadline (and stale provider copies) now; "
        "progress on stderr, a summary on stdout",
    )
    run.add_argument("--dry-run", action="store_true", help="list what would be purged and why; change nothing")
    run.add_argument("--tenant", help="only this tenant's conversations (its name or id)")
    run.add_argument("--limit", type=_positive, metavar="N", help="purge (or list) at most N conversations")
    run.set_defaults(handler=_retention_run)
