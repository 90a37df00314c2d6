"""The built wheel, installed into a fresh virtual environment, migrates and serves from outside the repository."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
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

# Builds the image's virtual environment with the image's own script: about a minute, with the
# runtime dependencies fetched from the package index (or pip's cache) and checked against the
# lock's hashes.
pytestmark = pytest.mark.wheel

CHECKOUT = Path(__file__).resolve().parents[1]
BUILD_VENV = CHECKOUT / "ops" / "container" / "build-venv.sh"
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
        [str(part) for part in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{command}:\n{result.stdout}\n{result.stderr}"
    return result


@dataclass(frozen=True)
class Installed:
    python: Path
    custody: Path
    site_packages: Path
    wheel: Path


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The container image's virtual environment, made by the script its Dockerfile runs
    (ops/container/build-venv.sh): the wheel built from this checkout, and the runtime
    dependencies of requirements-runtime.lock installed with their hashes checked, in a new
    environment that shares nothing with this test run's."""
    root = tmp_path_factory.mktemp("image")
    venv, wheels = root / "venv", root / "wheels"
    _run(BUILD_VENV, venv, wheels, env=os.environ | {"PYTHON": sys.executable})
    python = venv / "bin" / "python"
    site_packages = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))").stdout.strip())
    [wheel] = wheels.glob("custody-*.whl")
    return Installed(python=python, custody=venv / "bin" / "custody", site_packages=site_packages, wheel=wheel)


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


def test_wheel_carries_migrations_schemas_and_example_policy(installed: Installed) -> None:
    """The wheel holds the Alembic environment and versions, the JSON schemas and the example policy as package data."""
    with zipfile.ZipFile(installed.wheel) as archive:
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


def _clean_env() -> dict[str, str]:
    """This environment without anything that could lead back to the checkout or configure Custody."""
    return {
        key: value
        for key, value in os.environ.items()
        if key != "PYTHONPATH" and not key.startswith(("CUSTODY_", "GOOGLE_", "GEMINI_", "DATABASE_", "OTEL_"))
    }


def _tree(*roots: Path) -> dict[str, float]:
    """Every file and directory under `roots`, with its modification time."""
    found: dict[str, float] = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            found[str(path)] = path.lstat().st_mtime
    return found


def _lock_pins(lock: Path) -> dict[str, str]:
    """name -> version of every package a lock file pins (markers for other platforms included)."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if line and not line.startswith((" ", "#")) and "==" in line:
            name, _, rest = line.partition("==")
            pins[name.strip().lower()] = rest.split()[0].rstrip(";")
    return pins


def test_image_environment_holds_the_runtime_lock_and_nothing_else(installed: Installed) -> None:
    """The image's environment holds Custody and exactly the runtime lock's packages at its pins: no pip, no embedded Postgres, no test tools."""
    listed = _run(
        installed.python,
        "-c",
        "import importlib.metadata as m; print('\\n'.join(f'{d.metadata[\"Name\"]}=={d.version}' for d in m.distributions()))",
    ).stdout.split()
    installed_pins = {
        name.lower().replace("_", "-"): version for name, _, version in (p.partition("==") for p in listed)
    }
    assert installed_pins.pop("custody") == "0.1.0"
    locked = _lock_pins(CHECKOUT / "requirements-runtime.lock")
    assert set(installed_pins) <= set(locked), set(installed_pins) - set(locked)
    assert all(installed_pins[name] == locked[name] for name in installed_pins)
    assert not {"pip", "pgserver", "psutil", "pytest", "mypy", "setuptools"} & set(installed_pins)


def test_zero_config_in_the_image_environment_refuses_clearly_and_writes_nothing(
    installed: Installed, outside: Path
) -> None:
    """Without DATABASE_URL, `custody serve` from the image's environment (no embedded Postgres) exits 2 saying to set DATABASE_URL or install custody[embedded], and generates no secret."""
    result = subprocess.run(
        [str(installed.custody), "serve"], cwd=outside, env=_clean_env(), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "DATABASE_URL" in result.stderr
    assert "custody[embedded]" in result.stderr
    assert list(outside.iterdir()) == []


def test_installed_wheel_migrates_and_serves(
    installed: Installed,
    empty_database: str,
    outside: Path,
    gemini: RunningSimulator,
    tmp_path: Path,
) -> None:
    """`custody migrate` then `custody serve` from the image's environment, run outside the repository, bring an empty database to head, answer /readyz and /schema/openapi.json, take a turn through the SDK, drain on SIGTERM and exit 0, writing nothing into the environment, the working directory or HOME (as a read-only root filesystem requires)."""
    # Nothing may lead back to the checkout, or to settings from the caller's environment.
    home = tmp_path / "home"
    home.mkdir()
    env = _clean_env() | {"HOME": str(home)}
    where = _run(installed.python, "-c", "import service; print(service.__file__)", cwd=outside, env=env)
    assert Path(where.stdout.strip()).is_relative_to(installed.site_packages)

    stores = {"DATABASE_URL": empty_database, "CUSTODY_KEY_STORE_URL": key_store_of(empty_database)}
    migrated = _run(installed.custody, "migrate", cwd=outside, env=env | stores)
    assert "the database schema and the key store's are up to date" in migrated.stderr

    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    pepper = secrets_dir / "pepper"
    pepper.write_bytes(secrets.token_bytes(32))
    pepper.chmod(0o600)
    LocalKeyring.generate(secrets_dir / "keyring.json")
    AuditSigner.load_or_generate(secrets_dir / "audit-signing-key.pem")
    port = _free_port()
    # No CUSTODY_POLICY: the example policy must come from the package.
    env |= stores | {
        "GEMINI_API_KEY": "test-key",
        "GOOGLE_GEMINI_BASE_URL": gemini.base_url,
        "CUSTODY_KEYRING": str(secrets_dir / "keyring.json"),
        "CUSTODY_PEPPER_FILE": str(pepper),
        "CUSTODY_AUDIT_SIGNING_KEY": str(secrets_dir / "audit-signing-key.pem"),
        "CUSTODY_PORT": str(port),
        # As in the image: the bytecode was compiled at install, nothing is written at run time.
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    _run(installed.custody, "tenants", "create", "wheel-tenant", cwd=outside, env=env)
    key = _run(
        installed.custody, "keys", "issue", "--tenant", "wheel-tenant", "--role", "backend", cwd=outside, env=env
    ).stdout.strip()
    venv = installed.python.parent.parent
    before = _tree(venv, outside, home)
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
        headers = {"Authorization": f"Bearer {key}"}
        opened = httpx.post(
            f"{base}/v1/conversations", headers=headers, json={"route": "patient-intake", "data_classes": ["phi"]}
        )
        assert opened.status_code == 201, opened.text
        turn = httpx.post(
            f"{base}/v1/conversations/{opened.json()['id']}/turns",
            headers=headers,
            json={"input": "hello from the image"},
            timeout=60,
        )
        assert turn.status_code == 200, turn.text
        assert turn.json()["status"] == "completed"
        process.terminate()
        assert process.wait(timeout=30) == 0, log_path.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert _tree(venv, outside, home) == before
