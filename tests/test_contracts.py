"""Checked-in contracts and the migrations cannot drift from the code."""

from __future__ import annotations

from typing import Any

import httpx
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api.app import openapi_document
from service.config import REPO_ROOT
from service.models import Base


def test_openapi_document_is_checked_in() -> None:
    """schemas/openapi.json is exactly what the app serves at /schema (regenerate with `custody openapi`)."""
    assert (REPO_ROOT / "schemas" / "openapi.json").read_text() == openapi_document()


def test_every_operation_has_a_pascal_case_id() -> None:
    """Each operation has a PascalCase operationId and a tag."""
    import json

    document = json.loads(openapi_document())
    for path, methods in document["paths"].items():
        for method, operation in methods.items():
            assert operation["operationId"][0].isupper(), (path, method)
            assert operation.get("tags"), (path, method)


async def test_models_match_migrations(engine: AsyncEngine) -> None:
    """The database built by `alembic upgrade head` has exactly the tables and columns the models declare."""

    def diff(connection: Connection) -> list[Any]:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        differences: list[Any] = compare_metadata(context, Base.metadata)  # alembic's diff tuples
        return differences

    async with engine.connect() as connection:
        differences = await connection.run_sync(diff)
    assert differences == []


async def test_schema_is_served(api: httpx.AsyncClient) -> None:
    """The running service serves the same OpenAPI document at /schema/openapi.json."""
    import json

    served = (await api.get("/schema/openapi.json")).json()
    assert served == json.loads((REPO_ROOT / "schemas" / "openapi.json").read_text())
