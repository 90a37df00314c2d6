"""Which database errors mean "the database cannot be reached right now" rather than a bug.

While Postgres is down, restarting or failing over, every request fails the same way; callers
should hear 503 with Retry-After (not 500), and a turn whose model reply is already in memory
should keep trying to store it. Everything else stays an error to investigate.
"""

from __future__ import annotations

import asyncpg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

__all__ = ["database_unreachable"]

# Connection exceptions (SQLSTATE class 08), the server refusing connections while it starts or
# stops (57P01 admin shutdown, 57P02 crash shutdown, 57P03 cannot connect now), and a connection
# that died under us.
_UNREACHABLE = (
    OSError,  # refused, reset, unreachable, and connect timeouts (TimeoutError is an OSError)
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.ConnectionDoesNotExistError,
    PoolTimeoutError,  # every pooled connection is stuck waiting on a database that went away
)


def database_unreachable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the database is unreachable."""
    seen = 0
    current: BaseException | None = exc
    while current is not None and seen < 8:
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        if isinstance(current, _UNREACHABLE):
            return True
        # SQLAlchemy wraps the driver's error (`orig`), which wraps asyncpg's (`__cause__`).
        current = getattr(current, "orig", None) or current.__cause__ or current.__context__
        seen += 1
    return False
