"""Startup: a DATABASE_URL, key store or API key that is set but does not work (or is missing) stops the service, clearly."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from service.audit import AuditSigner
from service.config import Settings
from service.errors import ConfigurationError, SchemaBehindError
from service.runtime import build_runtime
from service.simulator import SimulatorConfig, start_simulator

from .conftest import ADMIN_URL, TEST_PEPPER, key_store_of


def _secrets(tmp_path: Path, keyring_path: Path) -> dict[str, str]:
    """The three secret variables a deployment must set, pointing at files in `tmp_path`."""
    pepper = tmp_path / "pepper"
    if not pepper.exists():
        pepper.write_bytes(TEST_PEPPER)
        pepper.chmod(0o600)
    signing_key = tmp_path / "audit-signing-key.pem"
    AuditSigner.load_or_generate(signing_key)
    return {
        "CUSTODY_KEYRING": str(keyring_path),
        "CUSTODY_PEPPER_FILE": str(pepper),
        "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key),
    }


def _settings(tmp_path: Path, keyring_path: Path, **env: str) -> Settings:
    """A deployment's settings; its key store is the one `migrated_database` made beside DATABASE_URL,
    unless `env` names another (or `CUSTODY_KEY_STORE_URL=""`, none)."""
    key_store = {"CUSTODY_KEY_STORE_URL": key_store_of(env["DATABASE_URL"])} if "DATABASE_URL" in env else {}
    return Settings.from_env(
        {"CUSTODY_DATA_DIR": str(tmp_path / "data")} | _secrets(tmp_path, keyring_path) | key_store | env
    )


async def test_unreachable_database_url_fails_clearly(tmp_path: Path, keyring_path: Path) -> None:
    """A DATABASE_URL nobody answers on is an error naming DATABASE_URL, not a fallback."""
    settings = _settings(
        tmp_path, keyring_path, DATABASE_URL="postgresql://postgres:s3cret@127.0.0.1:1/custody", GEMINI_API_KEY="k"
    )
    with pytest.raises(ConfigurationError, match="cannot connect to the database at DATABASE_URL") as caught:
        await build_runtime(settings)
    assert "s3cret" not in str(caught.value)


async def test_database_behind_migrations_is_refused(tmp_path: Path, keyring_path: Path) -> None:
    """A database without the current schema is refused with the command that fixes it."""
    name = f"custody_empty_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        with pytest.raises(SchemaBehindError, match="run `custody migrate`"):
            await build_runtime(_settings(tmp_path, keyring_path, DATABASE_URL=url, GEMINI_API_KEY="k"))
    finally:
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()


async def test_rejected_api_key_fails_clearly(tmp_path: Path, keyring_path: Path, database_url: str) -> None:
    """An API key the Gemini endpoint refuses stops startup with a message naming the key variables."""
    with start_simulator(SimulatorConfig(api_key="the-right-key")) as gemini:
        settings = _settings(
            tmp_path,
            keyring_path,
            DATABASE_URL=database_url,
            GEMINI_API_KEY="a-wrong-key",
            GOOGLE_GEMINI_BASE_URL=gemini.base_url,
        )
        with pytest.raises(ConfigurationError, match="GEMINI_API_KEY"):
            await build_runtime(settings)


async def test_working_configuration_starts(tmp_path: Path, keyring_path: Path, database_url: str) -> None:
    """With a reachable database, a migrated schema and an accepted key, the runtime starts without embedded defaults."""
    with start_simulator(SimulatorConfig(api_key="the-right-key")) as gemini:
        settings = _settings(
            tmp_path,
            keyring_path,
            DATABASE_URL=database_url,
            GEMINI_API_KEY="the-right-key",
            GOOGLE_GEMINI_BASE_URL=gemini.base_url,
        )
        runtime = await build_runtime(settings)
        try:
            assert not any("EMBEDDED" in line for line in runtime.announcements)
            assert runtime.demo_keys == {}
        finally:
            await runtime.aclose()


async def test_missing_keyring_file_fails_clearly(tmp_path: Path, database_url: str) -> None:
    """CUSTODY_KEYRING naming a missing file is an error, not a freshly generated keyring."""
    settings = _settings(tmp_path, tmp_path / "absent.json", DATABASE_URL=database_url, GEMINI_API_KEY="k")
    with pytest.raises(ConfigurationError, match=r"absent\.json"):
        await build_runtime(settings)


async def test_invalid_policy_names_the_field(tmp_path: Path, keyring_path: Path, database_url: str) -> None:
    """A policy file with a bad field stops startup with that field's path."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\n"
        "data_classes:\n  public: {description: public, provider_storage: true}\n"
        "routes:\n  faq:\n    description: answers\n    model: 5\n    data_classes: [public]\n"
    )
    settings = _settings(
        tmp_path, keyring_path, DATABASE_URL=database_url, GEMINI_API_KEY="k", CUSTODY_POLICY=str(policy)
    )
    with pytest.raises(ConfigurationError, match=r"routes\.faq\.model"):
        await build_runtime(settings)


def test_serve_exits_with_the_message(tmp_path: Path, keyring_path: Path) -> None:
    """`custody serve` with a dead DATABASE_URL exits non-zero and says why on stderr."""
    env = (
        os.environ
        | _secrets(tmp_path, keyring_path)
        | {
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/custody",
            "CUSTODY_KEY_STORE_URL": "postgresql://postgres@127.0.0.1:1/custody_keys",
            "GEMINI_API_KEY": "k",
            "CUSTODY_DATA_DIR": str(tmp_path),
        }
    )
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "cannot start: cannot connect to the database at DATABASE_URL" in result.stderr


async def test_a_deployment_without_a_key_store_stops_naming_the_variable(
    tmp_path: Path, keyring_path: Path, database_url: str
) -> None:
    """With DATABASE_URL set and CUSTODY_KEY_STORE_URL not, startup stops with a message naming the variable, and so does `custody migrate` (exit 2, one line)."""
    settings = _settings(
        tmp_path, keyring_path, DATABASE_URL=database_url, GEMINI_API_KEY="k", CUSTODY_KEY_STORE_URL=""
    )
    with pytest.raises(ConfigurationError, match="CUSTODY_KEY_STORE_URL is not set"):
        await build_runtime(settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")} | {
        "DATABASE_URL": database_url,
        "CUSTODY_DATA_DIR": str(tmp_path),
    }
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("custody: cannot start: CUSTODY_KEY_STORE_URL is not set")


async def test_a_key_store_url_naming_the_services_own_database_is_refused(
    tmp_path: Path, keyring_path: Path, fresh_database: str
) -> None:
    """A key store in the service's own database (which a backup of it would then hold) stops startup with a message saying why."""
    from service.key_store import migrate_key_store

    await asyncio.to_thread(migrate_key_store, fresh_database)  # as if someone migrated it there
    settings = _settings(
        tmp_path, keyring_path, DATABASE_URL=fresh_database, GEMINI_API_KEY="k", CUSTODY_KEY_STORE_URL=fresh_database
    )
    with pytest.raises(ConfigurationError, match="names the service's own database"):
        await build_runtime(settings)


async def test_an_unreachable_key_store_stops_startup_without_its_password(
    tmp_path: Path, keyring_path: Path, database_url: str
) -> None:
    """A key store nobody answers on is an error naming CUSTODY_KEY_STORE_URL, never repeating the URL's password."""
    settings = _settings(
        tmp_path,
        keyring_path,
        DATABASE_URL=database_url,
        GEMINI_API_KEY="k",
        CUSTODY_KEY_STORE_URL="postgresql://postgres:s3cret@127.0.0.1:1/keys",
    )
    with pytest.raises(ConfigurationError, match="cannot connect to the key store at CUSTODY_KEY_STORE_URL") as caught:
        await build_runtime(settings)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    ("detector", "field"),
    [
        ("{pattern: 'MRN-[0-9]{8}', data_class: public, must_match: [MRN-1234], must_not_match: [x]}", "must_match"),
        ("{pattern: '(?=MRN)MRN', data_class: public, must_match: [MRN], must_not_match: [x]}", "pattern"),
    ],
)
async def test_a_detector_that_fails_its_check_stops_startup(
    tmp_path: Path, keyring_path: Path, database_url: str, detector: str, field: str
) -> None:
    """A deployment pattern that misses its must_match example, or that RE2 refuses, stops startup naming the detector."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\n"
        "data_classes:\n  public: {description: public, provider_storage: true}\n"
        f"detectors:\n  record_number: {detector}\n"
        "routes:\n  faq:\n    description: answers\n    model: m\n    data_classes: [public]\n"
    )
    settings = _settings(
        tmp_path, keyring_path, DATABASE_URL=database_url, GEMINI_API_KEY="k", CUSTODY_POLICY=str(policy)
    )
    with pytest.raises(ConfigurationError, match=rf"detectors\.record_number\.{field}.*detector record_number"):
        await build_runtime(settings)
