"""The built wheel, installed into a fresh virtual environment, migrates and serves from outside the repository."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import httpx
import pytest

from service.audit import AuditSigner
from service.crypto import LocalKeyring
from service.simulator import RunningSimulator

from .conftest import ADMIN_URL, key_store_of

# Builds a wheel and installs it into a new virtual environment: a few seconds, no network.
pytestmark = pytest.mark.wheel

CHECKOUT = Path(__file__).resolve().parents[1]
# What the build reads: pyproject.toml names README.md, and service/ links into the three
# directories beside it.
BUILD_INPUTS = ["pyproject.toml", "README.md", "service", "migrations", "schemas", "ops"]
PACKAGE_DATA = [
    "service/migrations/env.py",
    "service/migrations/script.py.mako",
    "service/migrations/versions/0001_initial_schema.py",
    "service/migrations/key_store/env.py",
    "service/migrations/key_store/script.py.mako",
    "service/migrations/key_store/versions/0001_expiry_keys.py",
    "service/schemas/policy.schema.json",
    "service/schemas/openapi.json",
    "service/schemas/audit-event.schema.json",
    "service/policy.example.yaml",
]


def _run(
    *command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; its output is the failure message if it fails."""
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel `pip wheel` builds from a copy of the checkout (a build/ left in the checkout could
    put stale files into it)."""
    source = tmp_path_factory.mktemp("source")
    for name in BUILD_INPUTS:
        origin = CHECKOUT / name
        if origin.is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
            shutil.copytree(origin, source / name, symlinks=True, ignore=ignore)
        else:
            shutil.copy2(origin, source / name)
    dist = tmp_path_factory.mktemp("dist")
    _run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--quiet", "--wheel-dir", dist)
    [built] = dist.glob("custody-*.whl")
    return built


@dataclass(frozen=True)
class Installed:
    python: Path
    custody: Path
    site_packages: Path


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A new virtual environment with the wheel installed in it.

    The wheel is the only Custody there. Its dependencies are the ones this test run already has:
    a .pth line puts this environment's site-packages after the new one's (it runs none of that
    directory's own .pth files, so the development install's import hook stays out), and `pip check`
    confirms they satisfy the wheel's requirements. Installing them from the registry instead would
    add some 20 s and a network dependency to every run.
    """
    venv = tmp_path_factory.mktemp("venv")
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps", "--no-index", wheel)
    site_packages = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site_packages / "_custody_test_dependencies.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    _run(sys.executable, "-m", "pip", "--python", python, "check")
    return Installed(python=python, custody=venv / "bin" / "custody", site_packages=site_packages)


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    """A new database on the test server with nothing in it (not migrated), and an empty key store
    beside it (`key_store_of`), both dropped afterwards."""
    name = f"custody_wheel_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        await admin.execute(f'CREATE DATABASE "{name}_keys"')
        yield ADMIN_URL.rsplit("/", 1)[0] + "/" + name
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}_keys" WITH (FORCE)')
    finally:
        await admin.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A working directory outside the repository."""
    directory = tmp_path / "elsewhere"
    directory.mkdir()
    assert CHECKOUT not in directory.resolve().parents
    return directory


def test_wheel_carries_migrations_schemas_and_example_policy(wheel: Path) -> None:
    """The wheel holds the Alembic environment and versions, the JSON schemas and the example policy as package data."""
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
    assert [name for name in PACKAGE_DATA if name not in names] == []
    # Every migration in the checkout ships (the service database's and the key store's), and
    # nothing else under their versions/.
    for versions_dir in ("versions", "key_store/versions"):
        versions = {
            f"service/migrations/{versions_dir}/{path.name}"
            for path in (CHECKOUT / "migrations" / versions_dir).glob("*.py")
        }
        shipped = {name for name in names if name.startswith(f"service/migrations/{versions_dir}/")}
        assert shipped == versions


def test_installed_wheel_migrates_and_serves(
    installed: Installed,
    empty_database: str,
    outside: Path,
    gemini: RunningSimulator,
    tmp_path: Path,
) -> None:
    """`custody migrate` then `custody serve` from a wheel install, run outside the repository, bring an empty database to head and answer /readyz and /schema/openapi.json."""
    # Nothing may lead back to the checkout, or to settings from the caller's environment.
    env = {
        key: value
        for key, value in os.environ.items()
        if key != "PYTHONPATH" and not key.startswith(("CUSTODY_", "GOOGLE_", "GEMINI_", "DATABASE_"))
    }
    where = _run(installed.python, "-c", "import service; print(service.__file__)", cwd=outside, env=env)
    assert Path(where.stdout.strip()).is_relative_to(installed.site_packages)

    stores = {"DATABASE_URL": empty_database, "CUSTODY_KEY_STORE_URL": key_store_of(empty_database)}
    migrated = _run(installed.custody, "migrate", cwd=outside, env=env | stores)
    assert "the database schema and the key store's are up to date" in migrated.stderr

    pepper = tmp_path / "pepper"
    pepper.write_bytes(secrets.token_bytes(32))
    pepper.chmod(0o600)
    LocalKeyring.generate(tmp_path / "keyring.json")
    AuditSigner.load_or_generate(tmp_path / "audit-signing-key.pem")
    port = _free_port()
    # No CUSTODY_POLICY: the example policy must come from the package.
    env |= stores | {
        "GEMINI_API_KEY": "test-key",
        "GOOGLE_GEMINI_BASE_URL": gemini.base_url,
        "CUSTODY_KEYRING": str(tmp_path / "keyring.json"),
        "CUSTODY_PEPPER_FILE": str(pepper),
        "CUSTODY_AUDIT_SIGNING_KEY": str(tmp_path / "audit-signing-key.pem"),
        "CUSTODY_PORT": str(port),
        "CUSTODY_DATA_DIR": str(tmp_path / "data"),
    }
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(installed.custody), "serve"], cwd=outside, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log_path.read_text()
            try:
                ready = httpx.get(f"{base}/readyz")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "custody serve did not start listening:\n" + log_path.read_text()
                time.sleep(0.1)
        assert ready.status_code == 200, ready.text
        served = httpx.get(f"{base}/schema/openapi.json")
        assert served.status_code == 200
        shipped = json.loads((installed.site_packages / "service" / "schemas" / "openapi.json").read_text())
        assert served.json() == shipped
    finally:
        process.terminate()
        process.wait(timeout=15)
