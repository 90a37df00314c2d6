"""`custody audit`: checkpoint, verify the database, export, and verify an export offline."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.audit import header_token_in
from service.cli import main
from service.context import ServiceContext

from .api.helpers import open_conversation, take_turn
from .conftest import TEST_PEPPER, Tenant, deployment_env, signer_of


def _custody(
    *args: str, database_url: str, key: Path, keyring: Path, data_dir: Path
) -> subprocess.CompletedProcess[str]:
    # The CLI runs as a deployment (DATABASE_URL set), which names all its secrets.
    pepper = data_dir / "pepper"
    if not pepper.exists():
        pepper.write_bytes(TEST_PEPPER)
        pepper.chmod(0o600)
    env = os.environ | deployment_env(database_url, keyring, key, pepper, CUSTODY_DATA_DIR=str(data_dir))
    return subprocess.run(
        [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, timeout=120
    )


async def test_checkpoint_export_and_offline_verify(
    api: httpx.AsyncClient,
    tenant: Tenant,
    database_url: str,
    signing_key_path: Path,
    keyring_path: Path,
    tmp_path: Path,
    ctx: ServiceContext,
) -> None:
    """Checkpoints are signed, every chain verifies, and an export verifies offline until a line is edited."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    kept = tmp_path / "checkpoints.ndjson"
    signed = _custody(
        "audit",
        "checkpoint",
        "--out",
        str(kept),
        database_url=database_url,
        key=signing_key_path,
        keyring=keyring_path,
        data_dir=tmp_path,
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
        keyring=keyring_path,
        data_dir=tmp_path,
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "FIRST BAD" not in verified.stdout

    chain = (await api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()["chain"]
    exported = _custody(
        "audit",
        "export",
        "--chain",
        chain,
        database_url=database_url,
        key=signing_key_path,
        keyring=keyring_path,
        data_dir=tmp_path,
    )
    assert exported.returncode == 0, exported.stderr
    export = tmp_path / "export.ndjson"
    export.write_text(exported.stdout)
    public = tmp_path / "audit.pub.pem"
    public.write_text(signer_of(ctx).public_pem())

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
            keyring=keyring_path,
            data_dir=tmp_path,
        )

    offline = verify_offline()
    assert offline.returncode == 0, offline.stdout + offline.stderr
    assert ": ok," in offline.stdout, offline.stdout + offline.stderr

    lines = export.read_text().splitlines()
    record = json.loads(lines[2])
    record["action"] = "conversation.read"
    lines[2] = json.dumps(record)
    export.write_text("\n".join(lines) + "\n")
    tampered = verify_offline()
    assert tampered.returncode == 1
    assert f"FIRST BAD RECORD seq {record['seq']}" in tampered.stdout


async def test_fhir_export_verifies_offline_from_the_cli(
    api: httpx.AsyncClient,
    tenant: Tenant,
    database_url: str,
    signing_key_path: Path,
    keyring_path: Path,
    tmp_path: Path,
    ctx: ServiceContext,
) -> None:
    """`audit verify --file` with the header given by `--header` or `--header-file` checks a FHIR export, and names an edited event or refuses a restated header."""
    conversation = await open_conversation(api, tenant.headers())
    await take_turn(api, tenant.headers(), conversation, "hello")
    chain = (await api.get("/v1/audit/verify", headers=tenant.headers("auditor"))).json()["chain"]
    exported = _custody(
        "audit",
        "export",
        "--chain",
        chain,
        "--format",
        "fhir",
        database_url=database_url,
        key=signing_key_path,
        keyring=keyring_path,
        data_dir=tmp_path,
    )
    assert exported.returncode == 0, exported.stderr
    [token] = [line.rsplit(" ", 1)[1] for line in exported.stderr.splitlines() if "export header" in line]
    export = tmp_path / "export.fhir.ndjson"
    export.write_text(exported.stdout)
    public = tmp_path / "audit.pub.pem"
    public.write_text(signer_of(ctx).public_pem())
    dump = tmp_path / "response-headers.txt"
    dump.write_text(
        f"HTTP/1.1 200 OK\r\ncontent-type: application/fhir+ndjson\r\nx-custody-export-header: {token}\r\n\r\n"
    )

    def verify_offline(*header: str) -> subprocess.CompletedProcess[str]:
        return _custody(
            "audit",
            "verify",
            "--file",
            str(export),
            *header,
            "--public-key",
            str(public),
            database_url="postgresql://nobody@127.0.0.1:1/none",
            key=signing_key_path,
            keyring=keyring_path,
            data_dir=tmp_path,
        )

    for header in (("--header", token), ("--header-file", str(dump))):
        offline = verify_offline(*header)
        assert offline.returncode == 0, offline.stdout + offline.stderr
        assert f"{chain}: ok," in offline.stdout, offline.stdout + offline.stderr

    restated = json.loads(base64.urlsafe_b64decode(token))
    restated["range_head_hash"] = "0" * 64
    forged = verify_offline("--header", base64.urlsafe_b64encode(json.dumps(restated).encode()).decode())
    assert forged.returncode == 1, forged.stdout + forged.stderr
    assert "FIRST BAD RECORD" in forged.stdout, forged.stdout + forged.stderr

    lines = export.read_text().splitlines()
    event = json.loads(lines[1])
    event["outcome"] = "8"
    lines[1] = json.dumps(event)
    export.write_text("\n".join(lines) + "\n")
    tampered = verify_offline("--header", token)
    assert tampered.returncode == 1, tampered.stdout + tampered.stderr
    assert f"FIRST BAD RECORD seq {event['id'].rsplit('-', 1)[1]}" in tampered.stdout


@pytest.fixture
async def exports(api: httpx.AsyncClient, tenant: Tenant, tmp_path: Path, ctx: ServiceContext) -> dict[str, str]:
    """A native export, a FHIR export with its header token, and a few files that are not exports."""
    await open_conversation(api, tenant.headers())
    auditor = tenant.headers("auditor")
    native = await api.get("/v1/audit/export", headers=auditor)
    fhir = await api.get("/v1/audit/export", params={"format": "fhir"}, headers=auditor)
    files = {
        "native": native.text,
        "fhir": fhir.text,
        "pem": signer_of(ctx).public_pem(),
        "empty": "",
        "other-json": '{"hello": 1}\n',
        "headers-without-token": "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\n",
    }
    paths = {name: str(tmp_path / name) for name in files}
    for name, content in files.items():
        Path(paths[name]).write_text(content)  # noqa: ASYNC240 - a few small files before anything runs
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00garbage\n")
    other_header = base64.urlsafe_b64encode(b'{"format": "something-else"}').decode()
    return paths | {
        "binary": str(tmp_path / "binary"),
        "dir": str(tmp_path),
        "missing": str(tmp_path / "missing"),
        "token": fhir.headers["x-custody-export-header"],
        "other-token": other_header,
    }


MISTAKES = {
    "missing file": ["--file", "{missing}"],
    "a directory": ["--file", "{dir}"],
    "not JSON": ["--file", "{pem}"],
    "not text": ["--file", "{binary}"],
    "an empty file": ["--file", "{empty}"],
    "JSON that is not an export": ["--file", "{other-json}"],
    "a FHIR export without its header": ["--file", "{fhir}"],
    "a native export given a header": ["--file", "{native}", "--header", "{token}"],
    "a header that is not base64 JSON": ["--file", "{fhir}", "--header", "not*a*token"],
    "a header of another format": ["--file", "{fhir}", "--header", "{other-token}"],
    "a missing header file": ["--file", "{fhir}", "--header-file", "{missing}"],
    "a header file without the header": ["--file", "{fhir}", "--header-file", "{headers-without-token}"],
    "a public key that is not one": ["--file", "{native}", "--public-key", "{native}"],
    "a missing public key": ["--file", "{native}", "--public-key", "{missing}"],
    "a header without a file": ["--header", "{token}"],
}


@pytest.mark.parametrize("mistake", sorted(MISTAKES))
def test_ordinary_mistakes_end_in_one_line_and_a_nonzero_exit(
    mistake: str, exports: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Each ordinary mistake in an offline verification ends in one `custody:` line on stderr and exit code 2, never a traceback."""
    argv = ["audit", "verify", *(arg.format_map(exports) for arg in MISTAKES[mistake])]
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, (code, out, err)
    assert out == "", (code, out, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("custody: "), err


def test_the_header_token_is_found_in_saved_response_headers() -> None:
    """`--header-file` takes the token alone or saved response headers with CRLF line ends, the export's being the last."""
    assert header_token_in("  eyJtoken\n") == "eyJtoken"
    saved = "HTTP/1.1 302 Found\r\nX-Custody-Export-Header: eyJold\r\n\r\nHTTP/1.1 200 OK\r\n"
    assert header_token_in(saved + "x-custody-export-header: eyJnew \r\ncontent-type: text/plain\r\n\r\n") == "eyJnew"
