"""Rotating the audit signing key: what either key signed still verifies, the handover is audited, and a compromised key is believed only up to the rotation."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.audit import (
    Auditor,
    AuditSigner,
    TrustedKeys,
    checkpoint_all,
    read_public_keys,
    verify_chain,
    verify_export,
)
from service.auth_failures import AuthFailures
from service.background import BackgroundTasks
from service.config import REPO_ROOT, Settings
from service.context import ServiceContext
from service.database import make_engine, make_sessions
from service.errors import ConfigurationError
from service.secret_files import load_retired_keys
from service.simulator import RunningSimulator

from .api.helpers import open_conversation, take_turn
from .conftest import CANARY, Tenant, asgi_transport, deployment_env, make_tenant, signer_of

SCHEMA = json.loads((REPO_ROOT / "schemas" / "audit-event.schema.json").read_text())
RETIRED = "CUSTODY_AUDIT_RETIRED_PUBLIC_KEYS"


def custody(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real CLI in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "service", *args],
        env=os.environ | (env or {}),
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclasses.dataclass
class Deployment:
    """A database of the test's own, the service context a replica on the old key runs with, a tenant."""

    url: str
    engine: AsyncEngine
    old: ServiceContext
    tenant: Tenant
    keyring: Path
    pepper: Path
    old_key: Path

    def env(self, signing_key: Path, **extra: str) -> dict[str, str]:
        return deployment_env(self.url, self.keyring, signing_key, self.pepper, **extra)

    def replica(self, signer: AuditSigner, retired: TrustedKeys | None = None) -> ServiceContext:
        """The context of a replica started with `signer` and these retired keys."""
        return dataclasses.replace(
            self.old,
            auditor=Auditor(self.old.auditor.tracer, signer, retired),
            tasks=BackgroundTasks(),
            auth_failures=AuthFailures(),
        )

    async def chain(self) -> str:
        async with self.engine.connect() as connection:
            return str(
                (
                    await connection.execute(text("SELECT id FROM tenants WHERE name = :n"), {"n": self.tenant.name})
                ).scalar_one()
            )

    async def records(self, chain: str) -> list[dict[str, Any]]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT record FROM audit_events WHERE chain = :c ORDER BY seq"), {"c": chain}
            )
            return [dict(row) for row in rows.scalars()]

    async def checkpoint_keys(self, chain: str) -> list[tuple[int, str]]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                text("SELECT seq, key_id FROM audit_checkpoints WHERE chain = :c ORDER BY seq"), {"c": chain}
            )
            return [(int(seq), str(key_id)) for seq, key_id in rows]


@pytest.fixture
async def deployment(
    ctx: ServiceContext,
    gemini: RunningSimulator,
    fresh_database: str,
    keyring_path: Path,
    pepper_path: Path,
    signing_key_path: Path,
) -> AsyncIterator[Deployment]:
    """A rotation signs and records in every chain, so each test has a database of its own."""
    gemini.app.reset()
    engine = make_engine(fresh_database)
    old = dataclasses.replace(
        ctx, sessions=make_sessions(engine), tasks=BackgroundTasks(), auth_failures=AuthFailures()
    )
    try:
        tenant = await make_tenant(old)
        yield Deployment(fresh_database, engine, old, tenant, keyring_path, pepper_path, signing_key_path)
    finally:
        await engine.dispose()


@asynccontextmanager
async def client(ctx: ServiceContext) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for a replica running with `ctx`."""
    transport = asgi_transport(create_app(ctx, max_body_bytes=64_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as api:
        yield api
    await ctx.tasks.drain(timeout=10)


async def activity(api: httpx.AsyncClient, tenant: Tenant) -> dict[str, Any]:
    """A conversation with a turn, and another deleted: its receipt."""
    kept = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), kept, f"my secret is {CANARY}")
    gone = await open_conversation(api, tenant.headers())
    response = await api.delete(f"/v1/conversations/{gone}", headers=tenant.headers())
    assert response.status_code == 200, response.text
    return dict(response.json())


async def export(api: httpx.AsyncClient, tenant: Tenant, path: Path) -> Path:
    response = await api.get("/v1/audit/export", headers=tenant.headers("auditor"))
    assert response.status_code == 200, response.text
    return write(path, response.text)


def rotated_env(stdout: str) -> dict[str, str]:
    """The `VAR=value` lines the rotation printed: what the operator sets for every replica."""
    lines = dict(line.split("=", 1) for line in stdout.splitlines())
    assert set(lines) == {"CUSTODY_AUDIT_SIGNING_KEY", RETIRED}, stdout
    return lines


def write(path: Path, content: str | dict[str, Any]) -> Path:
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


async def test_everything_either_key_signed_verifies_after_a_rotation(deployment: Deployment, tmp_path: Path) -> None:
    """After `custody audit rotate-signing-key`, one chain holding checkpoints of the old key (some signed by a replica not yet restarted) and of the new one verifies from the CLI and the API, and exports and receipts made before and after verify offline with the key that signed them."""
    tenant, old_ctx = deployment.tenant, deployment.old
    old_signer = signer_of(old_ctx)
    async with client(old_ctx) as old_api:
        receipt_before = await activity(old_api, tenant)
        await checkpoint_all(old_ctx.auditor, old_ctx.sessions)
        export_before = await export(old_api, tenant, tmp_path / "before.ndjson")

    new_key = tmp_path / "new" / "audit-signing-key.pem"
    outside = tmp_path / "outside-checkpoints.ndjson"
    rotated = custody(
        "--as", "ops-anna", "audit", "rotate-signing-key", "--new-key", str(new_key), "--generate",
        "--out", str(outside), env=deployment.env(deployment.old_key),
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    settings = rotated_env(rotated.stdout)
    assert settings["CUSTODY_AUDIT_SIGNING_KEY"] == str(new_key)
    retired_path = Path(settings[RETIRED])
    assert retired_path == new_key.parent / "audit-retired-public-keys.pem"
    assert new_key.stat().st_mode & 0o777 == 0o600
    new_signer, _ = AuditSigner.load_or_generate(new_key)
    retired = TrustedKeys(read_public_keys(retired_path))
    assert retired.ids == [old_signer.key_id]
    assert len(outside.read_text().splitlines()) == 2  # the tenant's chain and the system chain

    # The replicas: one restarted with the new key and the retired one, one still on the old key.
    new_ctx = deployment.replica(new_signer, retired)
    chain = await deployment.chain()
    async with client(new_ctx) as new_api, client(old_ctx) as old_api:
        # Made before the new key has signed any checkpoint: the attestation is the new key's,
        # the checkpoint it carries the old key's.
        straddling = await export(new_api, tenant, tmp_path / "straddling.ndjson")
        await activity(old_api, tenant)
        await checkpoint_all(old_ctx.auditor, old_ctx.sessions)  # the old replica signs on
        receipt_after = await activity(new_api, tenant)
        await checkpoint_all(new_ctx.auditor, new_ctx.sessions)
        export_after = await export(new_api, tenant, tmp_path / "after.ndjson")
        verified = (await new_api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()

    signers = await deployment.checkpoint_keys(chain)
    handover = next(r["seq"] for r in await deployment.records(chain) if r["action"] == "audit.signing_key_rotate")
    assert [key for seq, key in signers if seq > handover] == [old_signer.key_id, new_signer.key_id]
    assert verified["ok"], verified
    assert verified["checkpoint_seq"] == signers[-1][0]

    # Without the retired key, the service names the key it does not know.
    async with client(deployment.replica(new_signer)) as forgetful:
        refused = (await forgetful.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()
    assert not refused["ok"]
    assert refused["first_bad_seq"] == signers[0][0]
    assert f"signed by key {old_signer.key_id}, which is not a trusted audit key" in refused["reason"]

    # `custody audit verify` as the restarted replicas run it: every chain, and the copies kept outside.
    restarted = deployment.env(new_key, **{RETIRED: str(retired_path)})
    every_chain = custody("audit", "verify", "--checkpoints", str(outside), env=restarted)
    assert every_chain.returncode == 0, every_chain.stdout + every_chain.stderr
    assert "FIRST BAD" not in every_chain.stdout
    forgot = custody("audit", "verify", "--chain", chain, env=deployment.env(new_key))
    assert forgot.returncode == 1
    assert f"signed by key {old_signer.key_id}, which is not a trusted audit key" in forgot.stdout

    old_pem = write(tmp_path / "old.pub.pem", old_signer.public_pem())
    new_pem = write(tmp_path / "new.pub.pem", new_signer.public_pem())
    both = tmp_path / "both"
    both.mkdir()
    write(both / "old.pem", old_signer.public_pem())
    write(both / "new.pem", new_signer.public_pem())

    def offline(*args: str) -> subprocess.CompletedProcess[str]:
        # No database: the file and the pinned keys are all it has.
        return custody(*args, env={"DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none"})

    for made, keys in (
        (export_before, [old_pem]),
        (export_after, [new_pem]),
        (straddling, [new_pem, old_pem]),
        (straddling, [new_pem, retired_path]),
        (straddling, [both]),
    ):
        pins = [arg for key in keys for arg in ("--public-key", str(key))]
        checked = offline("audit", "verify", "--file", str(made), *pins)
        assert checked.returncode == 0, (made.name, keys, checked.stdout + checked.stderr)
        assert ": ok," in checked.stdout
    for made, key, unknown in ((export_before, new_pem, old_signer), (straddling, new_pem, old_signer)):
        refused_offline = offline("audit", "verify", "--file", str(made), "--public-key", str(key))
        assert refused_offline.returncode == 1, refused_offline.stdout + refused_offline.stderr
        assert f"signed by key {unknown.key_id}, which is not a trusted audit key" in refused_offline.stdout

    before = write(tmp_path / "receipt-before.json", receipt_before)
    after = write(tmp_path / "receipt-after.json", receipt_after)
    for receipt, key in ((before, old_pem), (after, new_pem), (before, both), (after, both)):
        checked = offline("receipts", "verify", str(receipt), "--public-key", str(key))
        assert checked.returncode == 0, (receipt.name, key.name, checked.stdout + checked.stderr)
        assert "valid receipt" in checked.stdout
    unknown_receipt = offline("receipts", "verify", str(before), "--public-key", str(new_pem))
    assert unknown_receipt.returncode == 1
    assert f"NOT VALID: signed by key {old_signer.key_id}, which is not a trusted audit key" in unknown_receipt.stdout
    assert CANARY not in every_chain.stdout + every_chain.stderr + rotated.stdout + rotated.stderr


async def test_the_rotation_is_audited_in_every_chain_and_signed_over(deployment: Deployment, tmp_path: Path) -> None:
    """Each chain gets an `audit.signing_key_rotate` record naming the operator and both key ids, then a checkpoint of the old key over it and that checkpoint's record."""
    old_signer = signer_of(deployment.old)
    new_key = tmp_path / "audit-signing-key.pem"
    new_signer, _ = AuditSigner.load_or_generate(new_key)  # made beforehand, as `custody secrets init` would
    rotated = custody(
        "--as", "ops-anna", "audit", "rotate-signing-key", "--new-key", str(new_key),
        "--retired-keys", str(tmp_path / "retired.pem"), env=deployment.env(deployment.old_key),
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    for chain in (await deployment.chain(), "system"):
        records = await deployment.records(chain)
        [handover] = [r for r in records if r["action"] == "audit.signing_key_rotate"]
        jsonschema.validate(handover, SCHEMA)
        assert handover["actor"] == {"tenant_id": None, "key_id": None, "role": None, "operator": "ops-anna"}
        assert handover["resource"] == {"type": "audit_log", "id": chain}
        assert handover["details"] == {
            "old_key_id": old_signer.key_id,
            "new_key_id": new_signer.key_id,
            "compromised": False,
            "old_key_trusted_until": None,
            "handover_signed_with": old_signer.key_id,
        }
        following = records[handover["seq"]]  # the record after it (seqs start at 1)
        assert following["action"] == "audit.checkpoint"
        assert following["details"] == {"seq": handover["seq"], "key_id": old_signer.key_id}
        assert (handover["seq"], old_signer.key_id) in await deployment.checkpoint_keys(chain)
    # The checkpoints cover the handover, so the records verify as they stand.
    async with deployment.old.sessions() as session:
        verdict = await verify_chain(session, await deployment.chain(), deployment.old.auditor.trusted_keys)
    assert verdict.ok, verdict


async def test_a_compromised_key_is_believed_only_for_what_it_signed_before_the_rotation(
    deployment: Deployment, tmp_path: Path
) -> None:
    """With `--compromised` the new key signs the handover and the old key is kept with a limit: what it signed before verifies, while a checkpoint, export or receipt a replica still holding it signs afterwards fails naming the key."""
    tenant, old_ctx = deployment.tenant, deployment.old
    old_signer = signer_of(old_ctx)
    async with client(old_ctx) as old_api:
        receipt_before = await activity(old_api, tenant)
        await checkpoint_all(old_ctx.auditor, old_ctx.sessions)
    retired_dir = tmp_path / "retired"
    retired_dir.mkdir()
    new_key = tmp_path / "audit-signing-key.pem"
    rotated = custody(
        "audit", "rotate-signing-key", "--new-key", str(new_key), "--generate", "--compromised",
        env=deployment.env(deployment.old_key, **{RETIRED: str(retired_dir)}),
    )  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert rotated_env(rotated.stdout)[RETIRED] == str(retired_dir)
    written = (retired_dir / f"audit-{old_signer.key_id}.pub.pem").read_text()
    assert "Custody-Trusted-Until: " in written
    new_signer, _ = AuditSigner.load_or_generate(new_key)
    retired = TrustedKeys(read_public_keys(retired_dir))
    limit = next(iter(retired)).trusted_until
    assert limit is not None

    chain = await deployment.chain()
    handover = next(r for r in await deployment.records(chain) if r["action"] == "audit.signing_key_rotate")
    assert handover["details"]["compromised"] is True
    assert handover["details"]["old_key_trusted_until"] == limit
    assert (handover["seq"], new_signer.key_id) in await deployment.checkpoint_keys(chain)

    new_ctx = deployment.replica(new_signer, retired)
    async with client(new_ctx) as new_api:
        before = (await new_api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()
        assert before["ok"], before
        async with client(old_ctx) as old_api:  # a replica not yet restarted, holding the stolen key
            receipt_late = await activity(old_api, tenant)
            export_late = await export(old_api, tenant, tmp_path / "late.ndjson")
            late = next(c for c in await checkpoint_all(old_ctx.auditor, old_ctx.sessions) if c.chain == chain)
        after = (await new_api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()
    assert not after["ok"]
    assert after["first_bad_seq"] == late.seq
    assert (
        f"signed by retired key {old_signer.key_id} at {late.signed_at}, after it stopped being trusted"
        in (after["reason"])
    )
    verdict, _ = verify_export(
        export_late.read_text().splitlines(), pinned_keys=retired | TrustedKeys.of(new_signer.public_key)
    )
    assert not verdict.ok
    assert "after it stopped being trusted" in (verdict.reason or "")

    pins = ["--public-key", str(retired_dir), "--public-key", str(write(tmp_path / "new.pem", new_signer.public_pem()))]
    earlier = custody("receipts", "verify", str(write(tmp_path / "before.json", receipt_before)), *pins)
    assert earlier.returncode == 0, earlier.stdout + earlier.stderr
    later = custody("receipts", "verify", str(write(tmp_path / "late.json", receipt_late)), *pins)
    assert later.returncode == 1
    assert f"signed by retired key {old_signer.key_id} at" in later.stdout
    assert "after it stopped being trusted" in later.stdout


async def test_a_rotation_to_the_key_in_use_or_over_an_existing_file_changes_nothing(
    deployment: Deployment, tmp_path: Path
) -> None:
    """Rotating to the key already in use, or `--generate` over an existing file, ends in one line with exit 2, and no record or retired key is written."""
    same = custody(
        "audit", "rotate-signing-key", "--new-key", str(deployment.old_key),
        "--retired-keys", str(tmp_path / "retired.pem"), env=deployment.env(deployment.old_key),
    )  # fmt: skip
    assert same.returncode == 2
    assert "is the key in use" in same.stderr
    existing = write(tmp_path / "existing.pem", "")
    over = custody(
        "audit", "rotate-signing-key", "--new-key", str(existing), "--generate", env=deployment.env(deployment.old_key)
    )
    assert over.returncode == 2
    assert "never overwrites" in over.stderr
    for result in (same, over):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "retired.pem").exists()
    records = await deployment.records("system") + await deployment.records(await deployment.chain())
    assert not [r for r in records if r["action"] == "audit.signing_key_rotate"]


def _private_pem() -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return (
        Ed25519PrivateKey.generate()
        .private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        .decode()
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("not a key", "holds no PEM public key"),
        ("PRIVATE", "block 1 is a PRIVATE KEY, not a PUBLIC KEY"),
        ("Custody-Trusted-Untill: 2026-01-01T00:00:00Z\nPUBLIC", "unknown attribute Custody-Trusted-Untill"),
        ("Custody-Trusted-Until: 2026-01-01T00:00:00Z\nOWN", "lists the audit signing key in use"),
    ],
)
def test_a_retired_key_setting_that_cannot_be_read_stops_startup_naming_the_variable(
    tmp_path: Path, signing_key_path: Path, content: str | None, message: str
) -> None:
    """A retired-keys path that is missing, not PEM, a private key, misspelt, or that lists the key in use as compromised is a configuration error naming CUSTODY_AUDIT_RETIRED_PUBLIC_KEYS."""
    signer, _ = AuditSigner.load_or_generate(signing_key_path)
    path = tmp_path / "retired.pem"
    if content is not None:
        other = AuditSigner.load_or_generate(tmp_path / "other.pem")[0].public_pem()
        body = content.replace("PRIVATE", _private_pem()).replace("PUBLIC", other).replace("OWN", signer.public_pem())
        path.write_text(body)
    settings = Settings.from_env({"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/x", RETIRED: str(path)})
    with pytest.raises(ConfigurationError, match=RETIRED) as caught:
        load_retired_keys(settings, signer, [])
    assert message in str(caught.value)


def test_the_cli_refuses_to_start_on_a_malformed_retired_key_file(
    database_url: str, keyring_path: Path, pepper_path: Path, signing_key_path: Path, tmp_path: Path
) -> None:
    """A `custody` command given a retired-keys file holding a private key stops before doing anything, in one line naming the variable, exit 2."""
    private = _private_pem()
    malformed = write(tmp_path / "retired.pem", private)
    env = deployment_env(database_url, keyring_path, signing_key_path, pepper_path, **{RETIRED: str(malformed)})
    result = custody("audit", "verify", env=env)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"custody: cannot start: {RETIRED}={malformed}: ")
    assert "PRIVATE KEY" in line
    assert private.splitlines()[1] not in result.stderr  # the private key's bytes are never repeated back
