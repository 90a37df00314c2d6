"""Alembic environment of the service database: async engine, one transaction per migration,
under an advisory lock (service/alembic_environment.py)."""

from __future__ import annotations

from service.alembic_environment import run_environment
from service.models import Base

# Several replicas may start at once; only one migrates, the others wait and find nothing to do.
MIGRATION_LOCK = 0x6375_7374_6F64_79  # "custody"

run_environment(Base.metadata, lock=MIGRATION_LOCK)
