"""What every `custody` command shares: messages, the runtime, the operator, argument types."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TypeVar

from ..audit import SYSTEM_CHAIN, utc_instant
from ..config import Settings
from ..operators import operator_name
from ..runtime import Runtime, build_runtime
from ..tenants import find_tenant

__all__ = ["CommandFailed", "chain_of", "instant", "say", "with_runtime"]

T = TypeVar("T")


def say(message: str) -> None:
    """A message for the operator, on stderr; stdout carries only a command's output."""
    print(message, file=sys.stderr, flush=True)


def with_runtime(args: argparse.Namespace, work: Callable[[Runtime, str], Awaitable[T]]) -> T:
    """Run `work(runtime, operator)` on a runtime built by the same composition root as `serve`
    (the same settings, secrets, database checks and keyring proof), then close it."""
    operator = operator_name(args.operator)
    settings = Settings.from_env()

    async def run() -> T:
        runtime = await build_runtime(settings, demo_keys=False, verify_upstream=False)
        try:
            for line in runtime.announcements:
                if line.startswith("EMBEDDED DEFAULT"):
                    say(f"custody: {line}")
            return await work(runtime, operator)
        finally:
            await runtime.aclose()

    return asyncio.run(run())


async def chain_of(runtime: Runtime, name: str) -> str:
    """An audit chain named the way tenants are named everywhere: a tenant's name or id, or `system`."""
    if name == SYSTEM_CHAIN:
        return SYSTEM_CHAIN
    async with runtime.ctx.sessions() as session:
        return (await find_tenant(session, name)).id


def instant(value: str) -> str:
    """An argparse type: an ISO 8601 time with its timezone, in the audit records' own form."""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError("not an ISO 8601 time (e.g. 2026-11-24T00:00:00Z)") from None
    try:
        return utc_instant(moment)
    except ValueError:
        raise argparse.ArgumentTypeError("needs a timezone (e.g. 2026-11-24T00:00:00Z)") from None


class CommandFailed(Exception):
    """An input the command cannot work with (an unreadable file, say): one line, `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code
