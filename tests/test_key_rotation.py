"""KEK rotation: data keys move to the new version, content stays readable, running replicas follow.

Every test runs with each kind of keyring: a keyring file, and KEKs in a PKCS#11 token (SoftHSM2).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from service.api import create_app
from service.context import ServiceContext
from service.crypto import rewrap_data_keys
from service.database import make_engine, make_sessions
from service.key_store import ExpiryKeyStore

from .api.helpers import open_conversation, take_turn
from .conftest import KeyringUnderTest, asgi_transport, deployment_env, key_store_of, make_tenant


@pytest.fixture
async def replica(
    ctx: ServiceContext, fresh_database: str, keyring_under_test: KeyringUnderTest
) -> AsyncIterator[ServiceContext]:
    """A service on a database and keyring of its own (rotation rewraps every data key)."""
    engine = make_engine(fresh_database)
    expiry_keys = ExpiryKeyStore.connect(key_store_of(fresh_database))
    yield dataclasses.replace(
        ctx, sessions=make_sessions(engine), keyring=keyring_under_test.keyring, expiry_keys=expiry_keys
    )
    await engine.dispose()
    await expiry_keys.aclose()


async def test_rotation_rewraps_and_a_running_replica_keeps_reading(
    replica: ServiceContext,
    keyring_under_test: KeyringUnderTest,
    fresh_database: str,
    signing_key_path: Path,
    pepper_path: Path,
) -> None:
    """After `custody keyring rotate`, every data key is under the new KEK, steps are untouched, and a replica that loaded the old keyring still reads and writes."""
    tenant = await make_tenant(replica)
    transport = asgi_transport(create_app(replica))
    async with httpx.AsyncClient(transport=transport, base_url="http://replica") as api:
        conversation = await open_conversation(api, tenant.headers())
        await take_turn(api, tenant.headers(), conversation, "before rotation")
        async with replica.sessions() as session:
            sealed_before = (
                (
                    await session.execute(
                        text("SELECT sealed FROM steps WHERE conversation_id = :c ORDER BY position"),
                        {"c": conversation},
                    )
                )
                .scalars()
                .all()
            )

        env = os.environ | deployment_env(fresh_database, keyring_under_test.environment, signing_key_path, pepper_path)
        rotated = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "service", "keyring", "rotate"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert rotated.returncode == 0, rotated.stderr
        assert "rewrapped 1 data keys under KEK version 2" in rotated.stdout

        async with replica.sessions() as session:
            versions = (await session.execute(text("SELECT DISTINCT kek_version FROM data_keys"))).scalars().all()
            sealed_after = (
                (
                    await session.execute(
                        text("SELECT sealed FROM steps WHERE conversation_id = :c ORDER BY position"),
                        {"c": conversation},
                    )
                )
                .scalars()
                .all()
            )
            record = (
                await session.execute(
                    text(
                        "SELECT record FROM audit_events WHERE chain = 'system' AND record->>'action' = 'keyring.rotate'"
                    )
                )
            ).scalar_one()
        assert versions == [2]
        assert sealed_after == sealed_before  # step ciphertext is never re-encrypted
        assert record["details"] == {"kek_version": 2, "rewrapped": 1, "unreadable": 0}

        assert replica.keyring.current_version == 1  # loaded before the rotation...
        after = await take_turn(api, tenant.headers(), conversation, "what did I say first?")
        assert after["output_text"] == 'You first said: "before rotation".'
        assert replica.keyring.current_version == 2  # ...and followed the keyring when it met version 2


async def test_rewrap_is_resumable(replica: ServiceContext) -> None:
    """Running the rewrap again when every key is current rewraps nothing."""
    tenant = await make_tenant(replica)
    async with httpx.AsyncClient(transport=asgi_transport(create_app(replica)), base_url="http://r") as api:
        await open_conversation(api, tenant.headers())
    replica.keyring.rotate()
    first = await rewrap_data_keys(replica.auditor, replica.sessions, replica.keyring, replica.expiry_keys)
    again = await rewrap_data_keys(replica.auditor, replica.sessions, replica.keyring, replica.expiry_keys)
    assert (first.rewrapped, again.rewrapped) == (1, 0)
    assert first.version == again.version == 2
