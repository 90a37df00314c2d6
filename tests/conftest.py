"""Shared fixtures: a fresh Postgres database per test session, migrated with Alembic."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest
from litestar import Litestar
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.ext.asyncio import AsyncEngine

from service.api import create_app
from service.audit import Auditor, AuditSigner
from service.auth_failures import AuthFailures
from service.background import BackgroundTasks
from service.config import REPO_ROOT, UpstreamSettings
from service.context import ServiceContext
from service.crypto import FileKeyring, Keyring, LocalKeyring, Pkcs11Keyring
from service.database import make_engine, make_sessions, migrate
from service.key_store import ExpiryKeyStore, migrate_key_store
from service.policy import load_policy
from service.simulator import RunningSimulator, SimulatorConfig, start_simulator
from service.tenants import create_tenant, issue_key
from service.upstream import Upstream

from .softhsm import SoftHsm, Token
from .wycheproof import missing_message


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--reliability",
        choices=("short", "full"),
        default="short",
        help="size of the reliability scenarios (tests/reliability): short for CI, full for docs/reliability.md",
    )


def pytest_runtest_call(item: pytest.Item) -> None:
    # A missing Wycheproof file fails its suite instead of skipping it (tests/wycheproof.py): CI's
    # clone has ../shared beside it, so a green run must mean the vectors were checked.
    missing = item.get_closest_marker("wycheproof_missing")
    if missing is not None:
        pytest.fail(missing_message(missing.args[0]), pytrace=False)


ADMIN_URL = os.environ.get("CUSTODY_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def _with_database(url: str, name: str) -> str:
    return url.rsplit("/", 1)[0] + "/" + name


def key_store_of(database_url: str) -> str:
    """The key store that `migrated_database` made beside a database: `<name>_keys`, on the same
    server (a test has no second server; a deployment puts it on another)."""
    location, separator, query = database_url.partition("?")
    base, _, name = location.rpartition("/")
    return f"{base}/{name}_keys{separator}{query}"


async def _admin(sql: str) -> None:
    connection = await asyncpg.connect(ADMIN_URL)
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


@asynccontextmanager
async def migrated_database(prefix: str) -> AsyncIterator[str]:
    """A new database on the test server, migrated to head with Alembic, and its key store beside it
    (`key_store_of(url)`), migrated too; both dropped afterwards."""
    name = f"{prefix}_{secrets.token_hex(4)}"
    await _admin(f'CREATE DATABASE "{name}"')
    await _admin(f'CREATE DATABASE "{name}_keys"')
    url = _with_database(ADMIN_URL, name)
    try:
        await asyncio.to_thread(migrate, url)
        await asyncio.to_thread(migrate_key_store, key_store_of(url))
        yield url
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await _admin(f'DROP DATABASE IF EXISTS "{name}_keys" WITH (FORCE)')


@pytest.fixture(scope="session")
async def database_url() -> AsyncIterator[str]:
    """The session's database, shared by the tests that can share it."""
    async with migrated_database("custody_test") as url:
        yield url


@pytest.fixture
async def fresh_database() -> AsyncIterator[str]:
    """A database of the test's own, for tests that change shared state (such as rewrapping
    every data key)."""
    async with migrated_database("custody_test_own") as url:
        yield url


@pytest.fixture(scope="session")
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = make_engine(database_url)
    yield engine
    await engine.dispose()


@pytest.fixture
def unique() -> str:
    """A short random suffix, so that tests sharing the session database never collide."""
    return secrets.token_hex(4)


# --- the service, wired to the test database and an embedded simulator -------------------------

CANARY = "CANARY-d41d8cd98f00b204-NEVER-AT-REST"
TEST_PEPPER = b"test-pepper-" + bytes(20)


@pytest.fixture(scope="session")
def gemini() -> Iterator[RunningSimulator]:
    """The simulator the service calls in tests, shared by the session."""
    with start_simulator(SimulatorConfig(retention_seconds=3600)) as sim:
        yield sim


@pytest.fixture(scope="session")
def keyring_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keyring.json"
    LocalKeyring.generate(path)
    return path


@pytest.fixture(scope="session")
def session_keyring(keyring_path: Path) -> FileKeyring:
    """The keyring the service uses in tests: the file-backed one it runs with."""
    return FileKeyring(keyring_path)


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftHsm]:
    """SoftHSM2 with a token directory of the session's own (SOFTHSM2_CONF points every process
    of the session at it); fails, never skips, where SoftHSM2 is not installed."""
    hsm = SoftHsm(tmp_path_factory.mktemp("softhsm"))
    previous = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    yield hsm
    if previous is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = previous


@pytest.fixture
def token(softhsm: SoftHsm) -> Token:
    """An empty SoftHSM2 token of the test's own."""
    return softhsm.take()


@dataclasses.dataclass(frozen=True)
class KeyringUnderTest:
    """A keyring with KEK version 1, and the variables that point a `custody` process at it."""

    keyring: Keyring
    environment: dict[str, str]


@pytest.fixture(params=["file", "pkcs11"])
def keyring_under_test(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyringUnderTest]:
    """Each kind of keyring in turn, new and of the test's own: a keyring file, and KEKs in a
    SoftHSM2 token."""
    if request.param == "file":
        path = tmp_path / "keyring.json"
        LocalKeyring.generate(path)
        yield KeyringUnderTest(FileKeyring(path), {"CUSTODY_KEYRING": str(path)})
        return
    token: Token = request.getfixturevalue("token")
    keyring = Pkcs11Keyring.initialize(token.config)
    try:
        yield KeyringUnderTest(keyring, token.environment())
    finally:
        keyring.close()


def make_upstream(gemini: RunningSimulator, **options: Any) -> Upstream:
    """An Upstream to the simulator. Its circuit breaker opens only after a run of failures no
    single test makes, unless the test asks otherwise: the tests that inject failures one after
    another would otherwise open the session's shared breaker for the tests after them
    (tests/test_upstream_resilience.py tests the breaker on Upstreams of its own)."""
    settings = UpstreamSettings(
        api_key="test-key", base_url=gemini.base_url, use_vertexai=False, project=None, location=None
    )
    return Upstream(settings, **({"breaker_failures": 1_000} | options))


@pytest.fixture(scope="session")
def pepper_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tests' pepper as a file (mode 0600), so that processes accept the keys `make_tenant` issues."""
    path = tmp_path_factory.mktemp("pepper") / "pepper"
    path.write_bytes(TEST_PEPPER)
    path.chmod(0o600)
    return path


def deployment_env(
    database_url: str, keyring: Path | Mapping[str, str], signing_key: Path, pepper: Path, **extra: str
) -> dict[str, str]:
    """The environment of a `custody` process run as a deployment: DATABASE_URL, its key store and
    the three secrets it must name, and the simulator asked for explicitly (no Gemini key in
    tests). The keyring is a file, or the variables of another keyring
    (`KeyringUnderTest.environment`)."""
    keyring_env = {"CUSTODY_KEYRING": str(keyring)} if isinstance(keyring, Path) else dict(keyring)
    return {
        "DATABASE_URL": database_url,
        "CUSTODY_KEY_STORE_URL": key_store_of(database_url),
        **keyring_env,
        "CUSTODY_PEPPER_FILE": str(pepper),
        "CUSTODY_AUDIT_SIGNING_KEY": str(signing_key),
        "CUSTODY_USE_SIMULATOR": "true",
        **extra,
    }


@pytest.fixture(scope="session")
def spans() -> InMemorySpanExporter:
    """Every span the service under test ends (an explicit provider, never the global one)."""
    return InMemorySpanExporter()


@pytest.fixture(scope="session")
def signing_key_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "audit-signing-key.pem"
    AuditSigner.load_or_generate(path)
    return path


@pytest.fixture(scope="session")
async def ctx(
    database_url: str,
    engine: AsyncEngine,
    gemini: RunningSimulator,
    session_keyring: FileKeyring,
    spans: InMemorySpanExporter,
    signing_key_path: Path,
) -> AsyncIterator[ServiceContext]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    upstream = make_upstream(gemini, attempts=3, timeout_seconds=10)
    signer, _ = AuditSigner.load_or_generate(signing_key_path)
    expiry_keys = ExpiryKeyStore.connect(key_store_of(database_url))
    yield ServiceContext(
        sessions=make_sessions(engine),
        keyring=session_keyring,
        policy=load_policy(REPO_ROOT / "ops" / "policy.example.yaml"),
        upstream=upstream,
        auditor=Auditor(provider.get_tracer("custody"), signer),
        pepper=TEST_PEPPER,
        expiry_keys=expiry_keys,
        turn_lease_seconds=30,
    )
    await upstream.aclose()
    await expiry_keys.aclose()


def asgi_transport(app: Litestar, client: tuple[str, int] = ("127.0.0.1", 123)) -> httpx.ASGITransport:
    """httpx's in-process transport to the app, from `client` (httpx's default address)."""
    # httpx types an ASGI app over plain mappings and Litestar its scope and messages as
    # TypedDicts: the same protocol, which mypy cannot match (parameters are contravariant).
    return httpx.ASGITransport(app=cast(Any, app), client=client)


def signer_of(ctx: ServiceContext) -> AuditSigner:
    """The audit signing key of a test context (the service may run without one; tests never do)."""
    signer = ctx.auditor.signer
    assert signer is not None
    return signer


@pytest.fixture
async def api(ctx: ServiceContext, gemini: RunningSimulator) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for the app, in this event loop (the app's engine is bound to it)."""
    gemini.app.reset()
    # A limiter of the test's own: failed authentications of other tests must not count here.
    own = dataclasses.replace(ctx, auth_failures=AuthFailures())
    transport = asgi_transport(create_app(own, max_body_bytes=64_000))
    async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
        yield client


class Tenant:
    """A fresh tenant with one key of each role, as Authorization headers."""

    def __init__(self, name: str, keys: dict[str, str]) -> None:
        self.name = name
        self.keys = keys

    def headers(self, role: str = "backend") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[role]}"}


async def make_tenant(ctx: ServiceContext) -> Tenant:
    """A tenant with one key of each role, in the database `ctx` points at."""
    name = f"tenant-{secrets.token_hex(4)}"
    async with ctx.sessions.begin() as session:
        await create_tenant(ctx.auditor, session, name, operator="test-suite", via="test")
        keys = {
            role: (await issue_key(ctx.auditor, session, ctx.pepper, name, role, operator="test-suite", via="test"))[1]
            for role in ("backend", "auditor", "ops")
        }
    return Tenant(name, keys)


NewTenant = Callable[[], Awaitable[Tenant]]


@pytest.fixture
def new_tenant(ctx: ServiceContext) -> NewTenant:
    """Makes tenants in the session database, for tests that need more than one."""

    async def make() -> Tenant:
        return await make_tenant(ctx)

    return make


@pytest.fixture
async def tenant(new_tenant: NewTenant) -> Tenant:
    return await new_tenant()


@dataclasses.dataclass(frozen=True)
class OwnService:
    """The service on a database of one test's own: the engine, an HTTP client and a tenant."""

    engine: AsyncEngine
    api: httpx.AsyncClient
    tenant: Tenant


@pytest.fixture
async def own_service(ctx: ServiceContext, gemini: RunningSimulator, fresh_database: str) -> AsyncIterator[OwnService]:
    """The service on a database of the test's own, for tests that change the schema (a constraint
    added to a shared table would fail every other test's writes while it is there, and for good if
    the test died before dropping it)."""
    gemini.app.reset()
    engine = make_engine(fresh_database)
    expiry_keys = ExpiryKeyStore.connect(key_store_of(fresh_database))
    own = dataclasses.replace(
        ctx,
        sessions=make_sessions(engine),
        expiry_keys=expiry_keys,
        tasks=BackgroundTasks(),
        auth_failures=AuthFailures(),
    )
    try:
        tenant = await make_tenant(own)
        transport = asgi_transport(create_app(own, max_body_bytes=64_000))
        async with httpx.AsyncClient(transport=transport, base_url="http://custody.test") as client:
            yield OwnService(engine, client, tenant)
        # Work that outlived its request must not outlive the engine it writes with.
        await own.tasks.drain(timeout=10)
    finally:
        await engine.dispose()
        await expiry_keys.aclose()
