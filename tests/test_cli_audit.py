"""`custody audit`: checkpoint, verify the database, export, and verify an export offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from .api.helpers import open_conversation, take_turn
from .conftest import Tenant


def _custody(*args: str, database_url: str, key: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = os.environ | {
        "DATABASE_URL": database_url,
        "CUSTODY_AUDIT_SIGNING_KEY": str(key),
        "CUSTODY_DATA_DIR": str(data_dir),
    }
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def test_checkpoint_export_and_offline_verify(
    api: httpx.AsyncClient, tenant: Tenant, database_url: str, signing_key_path: Path, tmp_path: Path, ctx: Any
) -> None:
    """Checkpoints are signed, every chain verifies, and an export verifies offline until a line is edited."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    kept = tmp_path / "checkpoints.ndjson"
    signed = _custody(
        "audit", "checkpoint", "--out", str(kept), database_url=database_url, key=signing_key_path, data_dir=tmp_path
    )
    assert signed.returncode == 0, signed.stderr
    assert kept.read_text().strip(), "the checkpoints were not copied out"
    verified = _custody(
        "audit",
        "verify",
        "--checkpoints",
        str(kept),
        database_url=database_url,
        key=signing_key_path,
        data_dir=tmp_path,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "FIRST BAD" not in verified.stdout

    chain = (await api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()["chain"]
    exported = _custody(
        "audit", "export", "--chain", chain, database_url=database_url, key=signing_key_path, data_dir=tmp_path
    )
    assert exported.returncode == 0, exported.stderr
    export = tmp_path / "export.ndjson"
    export.write_text(exported.stdout)
    public = tmp_path / "audit.pub.pem"
    public.write_text(ctx.auditor.signer.public_pem())

    def verify_offline() -> subprocess.CompletedProcess[str]:
        # No reachable database: the file and the pinned key are all it has.
        return _custody(
            "audit",
            "verify",
            "--file",
            str(export),
            "--public-key",
            str(public),
            database_url="postgresql://nobody@127.0.0.1:1/none",
            key=signing_key_path,
            data_dir=tmp_path,
        )

    offline = verify_offline()
    assert offline.returncode == 0 and ": ok," in offline.stdout, offline.stdout + offline.stderr

    lines = export.read_text().splitlines()
    record = json.loads(lines[2])
    record["action"] = "conversation.read"
    lines[2] = json.dumps(record)
    export.write_text("\n".join(lines) + "\n")
    tampered = verify_offline()
    assert tampered.returncode == 1
    assert f"FIRST BAD RECORD seq {record['seq']}" in tampered.stdout
