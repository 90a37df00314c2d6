"""Every documented DATABASE_URL form parses and connects; anything else is refused with a message."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import secrets
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

import asyncpg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sqlalchemy import text

from service import database
from service.database import check_schema_current, make_engine, migrate
from service.errors import ConfigurationError

from .conftest import ADMIN_URL

# The test server, taken apart so that each form can be written for it.
_ADMIN = urlsplit(ADMIN_URL)
HOST = _ADMIN.hostname or "127.0.0.1"
PORT = _ADMIN.port or 5432
CREDENTIALS = _ADMIN.netloc.rpartition("@")[0] or "postgres"  # user[:password], as written
DBNAME = unquote(_ADMIN.path.lstrip("/")) or "postgres"
SOCKET_DIR = Path("/var/run/postgresql")
SSL_IN_USE = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"


def _url(query: str = "", *, scheme: str = "postgresql", host: str | None = None, port: int | None = None) -> str:
    """A URL for the test server's admin database; `host` "" leaves the host out of the authority."""
    host = HOST if host is None else host
    authority = f"{CREDENTIALS}@{host}:{port or PORT}" if host else f"{CREDENTIALS}@"
    return f"{scheme}://{authority}/{quote(DBNAME, safe='')}" + (f"?{query}" if query else "")


async def _scalar(url: str, sql: str) -> object:
    """Connect with the service's engine and answer one query."""
    engine = make_engine(url)
    try:
        async with engine.connect() as connection:
            return (await connection.execute(text(sql))).scalar()
    finally:
        await engine.dispose()


FORMS = [
    pytest.param(_url(), "SELECT current_database()", DBNAME, id="plain"),
    pytest.param(_url(scheme="postgres"), "SELECT current_database()", DBNAME, id="postgres-scheme"),
    pytest.param(_url(scheme="postgresql+asyncpg"), "SELECT current_database()", DBNAME, id="asyncpg-marker"),
    pytest.param(_url("sslmode=disable"), SSL_IN_USE, False, id="sslmode-disable"),
    pytest.param(_url("sslmode=prefer"), "SELECT current_database()", DBNAME, id="sslmode-prefer"),
    pytest.param(
        _url("application_name=custody-url-test"),
        "SELECT current_setting('application_name')",
        "custody-url-test",
        id="application-name",
    ),
    pytest.param(
        _url("options=-c%20search_path%3Dcustody_probe"),
        "SELECT current_setting('search_path')",
        "custody_probe",
        id="options",
    ),
    pytest.param(
        _url(f"host={HOST}&port={PORT}", host=""), "SELECT current_database()", DBNAME, id="host-and-port-parameters"
    ),
    pytest.param(_url("connect_timeout=10"), "SELECT current_database()", DBNAME, id="connect-timeout"),
    pytest.param(
        _url("target_session_attrs=read-write"), "SELECT pg_is_in_recovery()", False, id="target-session-attrs"
    ),
    pytest.param(
        _url("sslmode=disable&application_name=custody-url-test&connect_timeout=10"),
        "SELECT current_setting('application_name')",
        "custody-url-test",
        id="several-parameters",
    ),
]


@pytest.mark.parametrize(("url", "sql", "expected"), FORMS)
async def test_documented_form_connects(url: str, sql: str, expected: object) -> None:
    """Each documented DATABASE_URL form connects through the service's engine, and its parameters take effect."""
    assert await _scalar(url, sql) == expected


async def test_socket_directory_in_host_connects() -> None:
    """A socket directory given as host= (postgresql://user@/dbname?host=/var/run/postgresql) connects over the unix socket."""
    if HOST not in {"127.0.0.1", "localhost"} or not (SOCKET_DIR / f".s.PGSQL.{PORT}").exists():
        pytest.skip(f"the test server ({HOST}:{PORT}) has no unix socket in {SOCKET_DIR} on this machine")
    url = _url(f"host={quote(str(SOCKET_DIR), safe='/')}&port={PORT}", host="")
    # A unix-socket session has no server address.
    assert await _scalar(url, "SELECT inet_server_addr() IS NULL") is True


async def test_migrate_accepts_libpq_parameters() -> None:
    """`custody migrate` and the schema check work on a URL carrying libpq parameters, not only the engine."""
    name = f"custody_url_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(ADMIN_URL)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        url = f"postgresql://{CREDENTIALS}@{HOST}:{PORT}/{name}?sslmode=disable&application_name=custody-migrate"
        await asyncio.to_thread(migrate, url)
        engine = make_engine(url)
        try:
            await check_schema_current(engine, url)
        finally:
            await engine.dispose()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_sslmode_require_reaches_the_test_server() -> None:
    """sslmode=require against the test server encrypts the session if the server has SSL on, and is refused (never ignored) if it has not."""
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        server_ssl = await admin.fetchval("SHOW ssl") == "on"
    finally:
        await admin.close()
    url = _url("sslmode=require")
    if server_ssl:
        assert await _scalar(url, SSL_IN_USE) is True
    else:
        # A server without SSL: asyncpg asks for TLS and gives up rather than carry on in the
        # clear. The TLS front below covers the encrypted forms on any server.
        with pytest.raises(ConnectionError, match="rejected SSL upgrade"):
            await _scalar(url, "SELECT 1")


# --- TLS and passwords, through a front that relays to the test server ----------------------------

SSL_REQUEST = 80877103  # the code of the SSLRequest message (protocol 3.0)


@dataclass(frozen=True)
class Arrival:
    """What one client sent the front before the session was relayed."""

    tls: bool
    startup: dict[str, str]
    password: str | None
    client_certificate: str | None  # the common name of a verified client certificate


class PostgresFront:
    """A stand-in server on 127.0.0.1: it answers the client's SSLRequest itself (with TLS when given
    a context), may ask for a cleartext password, records what arrived, then relays the session to
    the test server, so that every connection through it is real end to end."""

    def __init__(self, tls: ssl.SSLContext | None = None, *, ask_password: bool = False) -> None:
        self.tls = tls
        self.ask_password = ask_password
        self.arrivals: list[Arrival] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> PostgresFront:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            tls = code == SSL_REQUEST and self.tls is not None
            if code == SSL_REQUEST:
                writer.write(b"S" if tls else b"N")
                await writer.drain()
                if self.tls is not None:
                    await writer.start_tls(self.tls)
                length, code = struct.unpack("!ii", await reader.readexactly(8))
            body = await reader.readexactly(length - 8)
            fields = [field.decode() for field in body.rstrip(b"\0").split(b"\0")]
            password = None
            if self.ask_password:
                writer.write(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
                await writer.drain()
                await reader.readexactly(1)  # 'p', the PasswordMessage
                (size,) = struct.unpack("!i", await reader.readexactly(4))
                password = (await reader.readexactly(size - 4)).rstrip(b"\0").decode()
            peer = writer.get_extra_info("peercert")
            names = [value for rdn in peer["subject"] for key, value in rdn if key == "commonName"] if peer else []
            self.arrivals.append(
                Arrival(tls, dict(zip(fields[::2], fields[1::2], strict=True)), password, names[0] if names else None)
            )
            upstream_reader, upstream = await asyncio.open_connection(HOST, PORT)
            upstream.write(struct.pack("!ii", length, code) + body)
            await asyncio.gather(_relay(reader, upstream), _relay(upstream_reader, writer))
        except (OSError, asyncio.IncompleteReadError):
            pass  # a client that gave up, such as one that refused our certificate: nothing to relay
        finally:
            writer.close()
            if upstream is not None:
                upstream.close()


async def _relay(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            target.write(data)
            await target.drain()
    except OSError:
        pass  # the other side went away; closing below ends the session for both
    finally:
        target.close()


@dataclass(frozen=True)
class Certificates:
    """A test CA, a server certificate it issued (localhost, 127.0.0.1), a client certificate it
    issued, and an unrelated CA; PEM files in one directory."""

    ca: Path
    other_ca: Path
    server: Path
    server_key: Path
    client: Path
    client_key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    *,
    server: bool = False,
) -> x509.Certificate:
    """A certificate for `key`, signed by `issuer` (a CA when there is none: self-signed)."""
    issuer_name, issuer_key = issuer or (subject, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    if issuer is None:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)  # cert and CRL signing
        builder = builder.add_extension(usage, critical=True)
    else:
        purpose = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([purpose]), critical=False)
    if server:
        alternative = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(alternative), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    directory = tmp_path_factory.mktemp("tls")

    def write(name: str, item: x509.Certificate | ec.EllipticCurvePrivateKey) -> Path:
        path = directory / name
        if isinstance(item, x509.Certificate):
            path.write_bytes(item.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(
                item.private_bytes(
                    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
                )
            )
            path.chmod(0o600)  # libpq refuses a key others may read
        return path

    ca_key, other_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(4))
    ca = ("Custody test CA", ca_key)
    return Certificates(
        ca=write("ca.pem", _issue("Custody test CA", ca_key)),
        other_ca=write("other-ca.pem", _issue("Somebody else's CA", other_key)),
        server=write("server.pem", _issue("localhost", server_key, ca, server=True)),
        server_key=write("server.key", server_key),
        client=write("client.pem", _issue("custody-client", client_key, ca)),
        client_key=write("client.key", client_key),
    )


@pytest.fixture
def server_tls(certificates: Certificates) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(certificates.server, certificates.server_key)
    # Ask for a client certificate, and verify one that is sent, without requiring it.
    context.load_verify_locations(certificates.ca)
    context.verify_mode = ssl.CERT_OPTIONAL
    return context


def _front_url(front: PostgresFront, query: str, *, host: str = "127.0.0.1", credentials: str = CREDENTIALS) -> str:
    return f"postgresql://{credentials}@{host}:{front.port}/{quote(DBNAME, safe='')}" + (f"?{query}" if query else "")


async def test_sslmode_require_encrypts(server_tls: ssl.SSLContext) -> None:
    """sslmode=require connects over TLS to a server that offers it."""
    async with PostgresFront(server_tls) as front:
        assert await _scalar(_front_url(front, "sslmode=require"), "SELECT current_database()") == DBNAME
    assert [arrival.tls for arrival in front.arrivals] == [True]


async def test_sslmode_disable_stays_plain(server_tls: ssl.SSLContext) -> None:
    """sslmode=disable never asks for TLS, even from a server that offers it."""
    async with PostgresFront(server_tls) as front:
        assert await _scalar(_front_url(front, "sslmode=disable"), "SELECT current_database()") == DBNAME
    assert [arrival.tls for arrival in front.arrivals] == [False]


async def test_verify_ca_checks_sslrootcert(certificates: Certificates, server_tls: ssl.SSLContext) -> None:
    """sslmode=verify-ca with sslrootcert connects to a server whose certificate that CA issued, and refuses one it did not."""
    async with PostgresFront(server_tls) as front:
        trusted = _front_url(front, f"sslmode=verify-ca&sslrootcert={quote(str(certificates.ca))}")
        assert await _scalar(trusted, "SELECT current_database()") == DBNAME
        stranger = _front_url(front, f"sslmode=verify-ca&sslrootcert={quote(str(certificates.other_ca))}")
        with pytest.raises(ssl.SSLCertVerificationError):
            await _scalar(stranger, "SELECT 1")
    assert [arrival.tls for arrival in front.arrivals] == [True]


async def test_verify_full_checks_the_host_name(certificates: Certificates, server_tls: ssl.SSLContext) -> None:
    """sslmode=verify-full connects when the certificate names the host in the URL."""
    async with PostgresFront(server_tls) as front:
        url = _front_url(front, f"sslmode=verify-full&sslrootcert={quote(str(certificates.ca))}", host="localhost")
        assert await _scalar(url, "SELECT current_database()") == DBNAME
    assert [arrival.tls for arrival in front.arrivals] == [True]


async def test_client_certificate_from_sslcert_and_sslkey(
    certificates: Certificates, server_tls: ssl.SSLContext
) -> None:
    """sslcert and sslkey present a client certificate to the server."""
    query = (
        f"sslmode=verify-ca&sslrootcert={quote(str(certificates.ca))}"
        f"&sslcert={quote(str(certificates.client))}&sslkey={quote(str(certificates.client_key))}"
    )
    async with PostgresFront(server_tls) as front:
        assert await _scalar(_front_url(front, query), "SELECT current_database()") == DBNAME
    assert [arrival.client_certificate for arrival in front.arrivals] == ["custody-client"]


async def test_percent_encoded_password_arrives_decoded() -> None:
    """A password with URL-reserved characters, percent-encoded in the URL, reaches the server exactly."""
    password = "p@ss:w/rd?#&%= é"  # noqa: S105 - the test's own, for a throwaway server
    user = unquote(_ADMIN.username or "postgres")
    async with PostgresFront(ask_password=True) as front:
        url = _front_url(front, "", credentials=f"{quote(user, safe='')}:{quote(password, safe='')}")
        assert await _scalar(url, "SELECT current_user") == user
    assert [(arrival.startup["user"], arrival.password) for arrival in front.arrivals] == [(user, password)]


# --- timeouts, and the URLs that are refused -------------------------------------------------------


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A port whose kernel accepts connections that nobody ever answers (a hung database)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield int(listener.getsockname()[1])


async def test_connect_timeout_in_the_url_bounds_the_wait(silent_server: int) -> None:
    """A server that accepts but never answers fails the connection with a timeout set by connect_timeout."""
    url = f"postgresql://{CREDENTIALS}@127.0.0.1:{silent_server}/{DBNAME}?connect_timeout=2"
    with pytest.raises(TimeoutError):
        await _scalar(url, "SELECT 1")


@pytest.mark.parametrize(
    ("query", "seconds"),
    [("", 5.0), ("connect_timeout=12", 12.0), ("connect_timeout=1", 2.0), ("sslmode=disable&connect_timeout=0", None)],
)
def test_connect_timeout_defaults_to_five_seconds(query: str, seconds: float | None) -> None:
    """Without connect_timeout a connection waits 5 s; with it, libpq's rule applies (whole seconds, at least 2, 0 for no limit)."""
    assert database.parse_database_url(_url(query)).timeout == seconds


def test_connect_timeout_is_not_sent_to_the_server() -> None:
    """connect_timeout is taken out of the DSN (asyncpg would send it as a server setting); every other parameter stays."""
    dsn = database.parse_database_url(_url("sslmode=disable&connect_timeout=3&application_name=a%20b")).dsn
    assert dsn.endswith("?sslmode=disable&application_name=a%20b")
    assert dsn.startswith("postgresql://")


@pytest.mark.parametrize(
    "url",
    [
        "mysql://root:s3cret@127.0.0.1/custody",
        "postgresql+psycopg://postgres:s3cret@127.0.0.1/custody",
        "host=127.0.0.1 user=postgres password=s3cret dbname=custody",
        "s3cret",
        "postgresql://postgres:s3cret@127.0.0.1/custody?connect_timeout=soon",
    ],
)
def test_url_that_is_not_postgres_is_refused_with_a_message(url: str) -> None:
    """A DATABASE_URL that is not a Postgres URL is a ConfigurationError saying what is expected, without the password."""
    with pytest.raises(ConfigurationError, match=r"DATABASE_URL") as caught:
        make_engine(url)
    assert "s3cret" not in str(caught.value)
    assert "postgresql://" in str(caught.value) or "connect_timeout" in str(caught.value)


def test_cli_refuses_a_bad_url_without_a_traceback(tmp_path: Path) -> None:
    """`custody migrate` with a non-Postgres DATABASE_URL exits 2 with one line naming the expected form, no traceback, no password."""
    env = os.environ | {"DATABASE_URL": "mysql://root:s3cret@127.0.0.1/custody", "CUSTODY_DATA_DIR": str(tmp_path)}
    result = subprocess.run(
        [sys.executable, "-m", "service", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "cannot start: DATABASE_URL must be a postgresql://" in result.stderr
    assert "Traceback" not in result.stderr
    assert "s3cret" not in result.stderr


def test_a_key_store_url_that_is_not_postgres_is_refused_naming_its_variable(tmp_path: Path) -> None:
    """`custody migrate` with a non-Postgres CUSTODY_KEY_STORE_URL exits 2 with one line naming that variable (not DATABASE_URL), no password."""
    env = os.environ | {
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/custody",
        "CUSTODY_KEY_STORE_URL": "mysql://root:s3cret@127.0.0.1/keys",
        "CUSTODY_DATA_DIR": str(tmp_path),
    }
    result = subprocess.run(
        [sys.executable, "-m", "service", "migrate"], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "custody: cannot start: CUSTODY_KEY_STORE_URL must be a postgresql:// (or postgres://) URL in libpq's form, "
        "e.g. postgresql://user:password@host:5432/dbname?sslmode=require, not mysql://"
    ]
