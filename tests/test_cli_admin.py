"""`custody tenants`, `keys` and the CLI's manners: keys printed once and stored hashed, tenants named by name or id, operators on record, one line per mistake."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .conftest import deployment_env

Custody = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def custody(
    database_url: str, keyring_path: Path, signing_key_path: Path, pepper_path: Path, tmp_path: Path
) -> Custody:
    """Runs `custody ARGS` as a deployment on the test database; `env` adds or overrides variables."""

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        environment = (
            os.environ
            | deployment_env(database_url, keyring_path, signing_key_path, pepper_path, CUSTODY_DATA_DIR=str(tmp_path))
            | (env or {})
        )
        return subprocess.run(
            [sys.executable, "-m", "service", *args], env=environment, capture_output=True, text=True, timeout=120
        )

    return run


async def _records(engine: AsyncEngine, pattern: dict[str, object]) -> list[dict[str, Any]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT record FROM audit_events WHERE record @> CAST(:p AS jsonb) ORDER BY chain, seq"),
            {"p": json.dumps(pattern)},
        )
        return [dict(row.record) for row in rows]


async def test_issue_use_and_revoke_a_key(custody: Custody, engine: AsyncEngine, api: httpx.AsyncClient) -> None:
    """A key issued by the CLI authenticates with its role, is stored only as a hash, and stops working when revoked."""
    name = f"clinic-{secrets.token_hex(3)}"
    created = custody("tenants", "create", name)
    assert created.returncode == 0, created.stderr
    issued = custody("keys", "issue", "--tenant", name, "--role", "backend")
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()
    assert key.startswith("cust_")
    assert key not in issued.stderr
    key_id = "key_" + key.removeprefix("cust_").split("_", 1)[0]
    async with engine.connect() as connection:
        row = (
            await connection.execute(text("SELECT api_keys::text FROM api_keys WHERE id = :i"), {"i": key_id})
        ).scalar_one()
    secret = key.split("_", 2)[2]
    assert secret not in row
    assert secret.encode().hex() not in row

    headers = {"Authorization": f"Bearer {key}"}
    opened = await api.post(
        "/v1/conversations", json={"route": "public-faq", "data_classes": ["public"]}, headers=headers
    )
    assert opened.status_code == 201
    assert custody("keys", "revoke", key_id).returncode == 0
    refused = await api.post(
        "/v1/conversations", json={"route": "public-faq", "data_classes": ["public"]}, headers=headers
    )
    assert refused.status_code == 401


async def test_tenants_are_named_by_name_or_id_and_listed(custody: Custody) -> None:
    """A tenant is found by its name or its id in every command; `tenants list` and `keys list` show them, never a secret."""
    name = f"ward-{secrets.token_hex(3)}"
    tenant_id = custody("tenants", "create", name).stdout.strip()
    by_id = custody("keys", "issue", "--tenant", tenant_id, "--role", "auditor")
    by_name = custody("keys", "issue", "--tenant", name, "--role", "ops")
    assert by_id.returncode == 0, by_id.stderr + by_name.stderr
    assert by_name.returncode == 0, by_id.stderr + by_name.stderr
    tenants = custody("tenants", "list")
    assert f"{tenant_id}\t{name}\t" in tenants.stdout
    keys = custody("keys", "list", "--tenant", name)
    lines = keys.stdout.splitlines()
    assert [line.split("\t")[1:3] for line in lines] == [[name, "auditor"], [name, "ops"]]
    for issued in (by_id, by_name):
        assert issued.stdout.strip().split("_", 2)[2] not in keys.stdout
    exported = custody("audit", "export", "--chain", name)
    assert exported.returncode == 0
    assert json.loads(exported.stdout.splitlines()[0])["chain"] == tenant_id


async def test_cli_actions_are_audited_under_the_operator(custody: Custody, engine: AsyncEngine) -> None:
    """CLI actions record the operator (`--as NAME`, else the OS user) and listing keys is itself audited."""
    name = f"bank-{secrets.token_hex(3)}"
    tenant_id = custody("--as", "alice.ops", "tenants", "create", name).stdout.strip()
    custody("keys", "list", "--tenant", name)
    created = await _records(engine, {"action": "tenant.create", "resource": {"id": tenant_id}})
    assert [r["actor"] for r in created] == [{"tenant_id": None, "key_id": None, "role": None, "operator": "alice.ops"}]
    listed = await _records(engine, {"action": "api_key.list", "chain": tenant_id})
    assert len(listed) == 1
    assert listed[0]["actor"]["operator"]
    refused = custody("--as", "alice\nops", "tenants", "list")
    assert refused.returncode == 1
    assert "--as takes" in refused.stderr


@pytest.mark.parametrize(
    ("args", "env", "code", "message"),
    [
        (("tenants", "create", "x" * 300), {}, 1, "a tenant name is 1 to 100"),
        (("keys", "issue", "--tenant", "nobody-here", "--role", "ops"), {}, 1, "no such tenant"),
        (("keys", "issue", "--tenant", "x", "--role", "admin"), {}, 2, "invalid choice"),
        (("keys", "revoke", "key_not-a-key"), {}, 1, "a key id reads"),
        (("audit", "export", "--chain", "system", "--since", "2026-11-24T00:00:00"), {}, 2, "needs a timezone"),
        (("audit", "export", "--chain", "system", "--since", "yesterday"), {}, 2, "not an ISO 8601 time"),
        (("audit", "verify", "--checkpoints", "/nonexistent/checkpoints"), {}, 2, "cannot read"),
        (("tenants", "list"), {"CUSTODY_PORT": "abc"}, 2, "CUSTODY_PORT"),
        (("tenants", "list"), {"CUSTODY_KEYRING": "/etc/hostname"}, 2, "cannot start"),
        (("tenants", "list"), {"CUSTODY_UPSTREAM_ATTEMPTS": "many"}, 2, "CUSTODY_UPSTREAM_ATTEMPTS"),
    ],
)
def test_ordinary_mistakes_are_one_line_and_an_exit_code(
    custody: Custody, tmp_path: Path, args: tuple[str, ...], env: dict[str, str], code: int, message: str
) -> None:
    """A bad argument, file or setting ends in one line on stderr and an exit code, never a traceback."""
    result = custody(*args, env=env)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_checkpoints_file_that_is_not_json_is_one_line(custody: Custody, tmp_path: Path) -> None:
    """`audit verify --checkpoints` with a file that is not JSON says so in one line (exit 2)."""
    junk = tmp_path / "checkpoints"
    junk.write_text("not json\n")
    result = custody("audit", "verify", "--checkpoints", str(junk))
    assert result.returncode == 2
    assert "is not a checkpoints file" in result.stderr
    assert "Traceback" not in result.stderr
