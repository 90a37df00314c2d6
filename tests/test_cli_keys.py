"""`custody tenants` and `custody keys`: keys are printed once, stored as keyed hashes, revocable."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from .conftest import TEST_PEPPER


def _custody(*args: str, database_url: str, pepper: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"DATABASE_URL": database_url, "CUSTODY_PEPPER_FILE": str(pepper)}
    return subprocess.run([sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, timeout=60)


async def test_issue_use_and_revoke_a_key(
    database_url: str, engine: AsyncEngine, tmp_path: Path, api: httpx.AsyncClient
) -> None:
    """A key issued by the CLI authenticates with its role, is stored only as a hash, and stops working when revoked."""
    pepper = tmp_path / "pepper"
    pepper.write_bytes(TEST_PEPPER)
    pepper.chmod(0o600)
    name = f"clinic-{secrets.token_hex(3)}"
    assert _custody("tenants", "create", name, database_url=database_url, pepper=pepper).returncode == 0
    issued = _custody("keys", "issue", "--tenant", name, "--role", "backend", database_url=database_url, pepper=pepper)
    assert issued.returncode == 0, issued.stderr
    key = issued.stdout.strip()
    assert key.startswith("cust_") and key not in issued.stderr
    key_id = "key_" + key.removeprefix("cust_").split("_", 1)[0]

    async with engine.connect() as connection:
        row = (
            await connection.execute(text("SELECT api_keys::text FROM api_keys WHERE id = :i"), {"i": key_id})
        ).scalar_one()
    secret = key.split("_", 2)[2]
    assert secret not in row and secret.encode().hex() not in row

    headers = {"Authorization": f"Bearer {key}"}
    opened = await api.post(
        "/v1/conversations", json={"route": "public-faq", "data_classes": ["public"]}, headers=headers
    )
    assert opened.status_code == 201
    assert _custody("keys", "revoke", key_id, database_url=database_url, pepper=pepper).returncode == 0
    refused = await api.post(
        "/v1/conversations", json={"route": "public-faq", "data_classes": ["public"]}, headers=headers
    )
    assert refused.status_code == 401


def test_unknown_tenant_and_bad_role_are_refused(database_url: str, tmp_path: Path) -> None:
    """Issuing for a missing tenant fails with a message; a role outside backend/auditor/ops is refused by the parser."""
    pepper = tmp_path / "pepper"
    pepper.write_bytes(TEST_PEPPER)
    pepper.chmod(0o600)
    missing = _custody(
        "keys", "issue", "--tenant", "nobody-here", "--role", "ops", database_url=database_url, pepper=pepper
    )
    assert missing.returncode == 1 and "no tenant named" in missing.stderr
    bad_role = _custody("keys", "issue", "--tenant", "x", "--role", "admin", database_url=database_url, pepper=pepper)
    assert bad_role.returncode == 2
