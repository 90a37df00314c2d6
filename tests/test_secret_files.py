"""Secrets fail closed: a deployment never runs on a generated keyring, pepper or signing key, nor on the simulator unasked."""

from __future__ import annotations

import dataclasses
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from sqlalchemy import delete

from service.api import create_app
from service.config import Settings
from service.context import ServiceContext
from service.crypto import FileKeyring, LocalKeyring, ensure_current_sentinel
from service.errors import ConfigurationError
from service.models import KeyringSentinel
from service.runtime import build_runtime
from service.secret_files import init_secrets, load_keyring, load_pepper, load_signer, stage_secrets

from .conftest import TEST_PEPPER, asgi_transport, key_store_of


def _deployment(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env(
        {"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/x", "CUSTODY_DATA_DIR": str(tmp_path)} | env
    )


@pytest.mark.parametrize(
    ("loader", "variable"),
    [
        (load_keyring, "CUSTODY_KEYRING"),
        (load_pepper, "CUSTODY_PEPPER_FILE"),
        (load_signer, "CUSTODY_AUDIT_SIGNING_KEY"),
    ],
)
def test_deployment_without_a_secret_stops_naming_the_variable(
    tmp_path: Path, loader: Callable[[Settings, list[str]], object], variable: str
) -> None:
    """With DATABASE_URL set, an unset secret variable is an error naming it, and nothing is generated."""
    announced: list[str] = []
    with pytest.raises(ConfigurationError, match=variable) as caught:
        loader(_deployment(tmp_path), announced)
    assert "custody secrets init" in str(caught.value)
    assert list(tmp_path.iterdir()) == []
    assert announced == []


@pytest.mark.parametrize(
    ("loader", "variable"),
    [
        (load_keyring, "CUSTODY_KEYRING"),
        (load_pepper, "CUSTODY_PEPPER_FILE"),
        (load_signer, "CUSTODY_AUDIT_SIGNING_KEY"),
    ],
)
def test_a_named_secret_that_is_missing_is_never_generated(
    tmp_path: Path, loader: Callable[[Settings, list[str]], object], variable: str
) -> None:
    """A secret variable naming a file that does not exist is an error, in the zero-config run too."""
    missing = tmp_path / "nowhere" / "secret"
    settings = Settings.from_env({"CUSTODY_DATA_DIR": str(tmp_path), variable: str(missing)})
    with pytest.raises(ConfigurationError, match="does not exist"):
        loader(settings, [])
    assert not missing.exists()


def test_zero_config_generates_each_secret_and_says_so(tmp_path: Path) -> None:
    """Without DATABASE_URL the three secrets are generated in the data dir, mode 0600, each announced."""
    settings = Settings.from_env({"CUSTODY_DATA_DIR": str(tmp_path)})
    announced: list[str] = []
    load_keyring(settings, announced)
    load_pepper(settings, announced)
    load_signer(settings, announced)
    assert len(announced) == 3
    assert all(line.startswith("EMBEDDED DEFAULT") for line in announced)
    for path in tmp_path.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path


def test_secrets_init_creates_all_three_and_prints_the_variables(tmp_path: Path) -> None:
    """`custody secrets init DIR` writes the three secrets 0600 and prints one VAR=path line each; a deployment then loads them."""
    target = tmp_path / "secrets"
    result = subprocess.run(
        [sys.executable, "-m", "service", "secrets", "init", str(target)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split("=", 1)[0] for line in lines] == [
        "CUSTODY_KEYRING",
        "CUSTODY_PEPPER_FILE",
        "CUSTODY_AUDIT_SIGNING_KEY",
    ]
    env = dict(line.split("=", 1) for line in lines)
    for value in env.values():
        assert stat.S_IMODE(Path(value).stat().st_mode) == 0o600
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    settings = _deployment(tmp_path, **env)
    announced: list[str] = []
    load_keyring(settings, announced)
    assert len(load_pepper(settings, announced)) == 32
    load_signer(settings, announced)
    assert announced == []
    again = subprocess.run(
        [sys.executable, "-m", "service", "secrets", "init", str(target)], capture_output=True, text=True, timeout=60
    )
    assert again.returncode == 2
    assert "refusing to overwrite" in again.stderr
    assert "Traceback" not in again.stderr


def test_init_refuses_to_overwrite_any_existing_secret(tmp_path: Path) -> None:
    """`init_secrets` leaves an existing secret alone and creates nothing when one is in the way."""
    (tmp_path / "pepper").write_bytes(b"x" * 32)
    with pytest.raises(ConfigurationError, match="refusing to overwrite"):
        init_secrets(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pepper"]


async def test_deployment_without_gemini_credentials_needs_the_simulator_asked_for(
    tmp_path: Path, keyring_path: Path, signing_key_path: Path, database_url: str
) -> None:
    """With DATABASE_URL set and no Gemini key, startup stops unless CUSTODY_USE_SIMULATOR=true, which is then announced."""
    pepper = tmp_path / "pepper"
    pepper.write_bytes(TEST_PEPPER)
    pepper.chmod(0o600)
    secrets = {
        "DATABASE_URL": database_url,
        "CUSTODY_KEY_STORE_URL": key_store_of(database_url),
        "CUSTODY_KEYRING": str(keyring_path),
        "CUSTODY_PEPPER_FILE": str(pepper),
        "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key_path),
        "CUSTODY_DATA_DIR": str(tmp_path / "data"),
    }
    with pytest.raises(ConfigurationError, match="CUSTODY_USE_SIMULATOR"):
        await build_runtime(Settings.from_env(secrets))
    runtime = await build_runtime(Settings.from_env(secrets | {"CUSTODY_USE_SIMULATOR": "true"}))
    try:
        assert any("CUSTODY_USE_SIMULATOR is set" in line and "SIMULATOR" in line for line in runtime.announcements)
        assert runtime.demo_keys == {}
    finally:
        await runtime.aclose()


async def test_startup_refuses_a_keyring_that_cannot_unwrap_the_database(
    tmp_path: Path, keyring_path: Path, signing_key_path: Path, fresh_database: str
) -> None:
    """A deployment started with another keyring than the one its data keys were wrapped with stops with a message, instead of answering 500 later."""
    pepper = tmp_path / "pepper"
    pepper.write_bytes(TEST_PEPPER)
    pepper.chmod(0o600)
    env = {
        "DATABASE_URL": fresh_database,
        "CUSTODY_KEY_STORE_URL": key_store_of(fresh_database),
        "CUSTODY_PEPPER_FILE": str(pepper),
        "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key_path),
        "CUSTODY_DATA_DIR": str(tmp_path / "data"),
        "CUSTODY_USE_SIMULATOR": "true",
    }
    first = await build_runtime(Settings.from_env(env | {"CUSTODY_KEYRING": str(keyring_path)}))
    await first.aclose()
    other = tmp_path / "other-keyring.json"
    LocalKeyring.generate(other)
    with pytest.raises(ConfigurationError, match=r"cannot unwrap .* KEK version\(s\) 1"):
        await build_runtime(Settings.from_env(env | {"CUSTODY_KEYRING": str(other)}))


async def test_readyz_fails_when_the_keyring_cannot_unwrap(ctx: ServiceContext, tmp_path: Path) -> None:
    """/readyz answers 503 naming the KEK version while the keyring in use cannot unwrap that version's sentinel."""
    async with ctx.sessions.begin() as session:
        await ensure_current_sentinel(session, ctx.keyring)
    other = tmp_path / "other-keyring.json"
    LocalKeyring.generate(other)
    wrong = dataclasses.replace(ctx, keyring=FileKeyring(other))
    for context, expected in ((ctx, 200), (wrong, 503)):
        transport = asgi_transport(create_app(context))
        async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
            response = await client.get("/readyz")
        assert response.status_code == expected, response.text
    assert "KEK version(s) 1" in response.json()["detail"]
    assert response.headers["retry-after"]


def test_cli_with_database_url_and_no_signing_key_stops_without_a_traceback(
    tmp_path: Path, database_url: str, keyring_path: Path, pepper_path: Path
) -> None:
    """`custody audit checkpoint` in a deployment without CUSTODY_AUDIT_SIGNING_KEY exits 2 naming it, generating nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CUSTODY_")} | {
        "DATABASE_URL": database_url,
        "CUSTODY_KEYRING": str(keyring_path),
        "CUSTODY_PEPPER_FILE": str(pepper_path),
        "CUSTODY_DATA_DIR": str(tmp_path / "data"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "service", "audit", "checkpoint"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "CUSTODY_AUDIT_SIGNING_KEY" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists()


async def test_sentinels_are_left_for_the_current_version_only_once(ctx: ServiceContext) -> None:
    """Leaving the current version's sentinel twice keeps one row, which the keyring unwraps."""
    async with ctx.sessions.begin() as session:
        await session.execute(delete(KeyringSentinel))
        await ensure_current_sentinel(session, ctx.keyring)
        await ensure_current_sentinel(session, ctx.keyring)
    async with ctx.sessions() as session:
        rows = (await session.scalars(KeyringSentinel.__table__.select())).all()
    assert len(rows) == 1


def _mounted_secret(directory: Path) -> Path:
    """A directory laid out as Kubernetes mounts a Secret with fsGroup: group-readable files behind `..data`."""
    made = init_secrets(directory / "made")
    data = directory / "mounted" / "..2026_11_30_10_00_00.000"
    data.mkdir(parents=True)
    for path in (made.keyring, made.pepper, made.audit_signing_key):
        (data / path.name).write_bytes(path.read_bytes())
        (data / path.name).chmod(0o440)
    (directory / "mounted" / "..data").symlink_to(data.name)
    for path in (made.keyring, made.pepper, made.audit_signing_key):
        (directory / "mounted" / path.name).symlink_to(f"..data/{path.name}")
    return directory / "mounted"


def test_stage_copies_a_mounted_secret_into_private_files_the_loaders_accept(tmp_path: Path) -> None:
    """`custody secrets stage` turns a Secret mounted group-readable (which the loaders refuse) into mode 0600 copies they accept, skipping the volume's own entries."""
    mounted = _mounted_secret(tmp_path)
    refused = _deployment(tmp_path, CUSTODY_PEPPER_FILE=str(mounted / "pepper"))
    with pytest.raises(ConfigurationError, match="readable by group"):
        load_pepper(refused, [])
    target = tmp_path / "staged"
    target.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "service", "secrets", "stage", str(mounted), str(target)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in target.iterdir()) == ["audit-signing-key.pem", "keyring.json", "pepper"]
    assert {stat.S_IMODE(path.stat().st_mode) for path in target.iterdir()} == {0o600}
    settings = _deployment(
        tmp_path,
        CUSTODY_KEYRING=str(target / "keyring.json"),
        CUSTODY_PEPPER_FILE=str(target / "pepper"),
        CUSTODY_AUDIT_SIGNING_KEY=str(target / "audit-signing-key.pem"),
    )
    assert load_pepper(settings, []) == (mounted / "pepper").read_bytes()
    assert load_keyring(settings, []).current_version == 1
    load_signer(settings, [])


def test_staging_again_replaces_the_copies(tmp_path: Path) -> None:
    """Staging into a directory that already holds copies (the pod restarted) replaces them with the Secret's current content and leaves no partial file."""
    mounted = _mounted_secret(tmp_path)
    target = tmp_path / "staged"
    target.mkdir()
    (target / "pepper").write_bytes(b"an older pepper, replaced")
    staged = stage_secrets(mounted, target)
    assert [path.name for path in staged] == ["audit-signing-key.pem", "keyring.json", "pepper"]
    assert (target / "pepper").read_bytes() == (mounted / "pepper").read_bytes()
    assert sorted(path.name for path in target.iterdir()) == ["audit-signing-key.pem", "keyring.json", "pepper"]


def test_stage_refuses_an_empty_or_missing_source_in_one_line(tmp_path: Path) -> None:
    """Staging from a missing directory, or one with no file, is a ConfigurationError naming it."""
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigurationError, match="not a directory"):
        stage_secrets(tmp_path / "missing", tmp_path)
    with pytest.raises(ConfigurationError, match="no file to stage"):
        stage_secrets(tmp_path / "empty", tmp_path)
