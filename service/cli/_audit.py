"""`custody audit`: verify the chains (or an export, offline), export a chain, sign checkpoints."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..audit import (
    AuditEntry,
    ChainVerdict,
    Checkpoint,
    ExportUnreadable,
    chains,
    checkpoint_all,
    export_header,
    export_lines,
    export_range,
    header_token,
    header_token_in,
    load_public_key,
    verify_chain,
    verify_export,
)
from ..runtime import Runtime
from ._common import CommandFailed, chain_of, instant, say, with_runtime

__all__ = ["add_audit_commands"]


def _report(verdict: ChainVerdict) -> bool:
    if verdict.ok:
        print(
            f"{verdict.chain}: ok, {verdict.checked} records, head seq {verdict.head_seq}"
            + (f", signed checkpoint at {verdict.checkpoint_seq}" if verdict.checkpoint_seq else "")
        )
    else:
        print(f"{verdict.chain}: FIRST BAD RECORD seq {verdict.first_bad}: {verdict.reason}")
    return verdict.ok


def _audit_verify(args: argparse.Namespace) -> int:
    # Exit 1 means a record or the proof fails; 2 means the input could not be checked at all (a
    # wrong or unreadable file, a missing header): a mistake, reported in one line.
    if args.header is not None and args.header_file is not None:
        raise CommandFailed("give the export header once: --header or --header-file")
    if args.file is None and (args.header is not None or args.header_file is not None):
        raise CommandFailed("--header and --header-file go with --file (a FHIR export to verify offline)")
    if args.file is not None:
        return _verify_file(args)
    kept_outside = _checkpoints_file(args.checkpoints) if args.checkpoints is not None else []

    async def work(runtime: Runtime, operator: str) -> int:
        ctx = runtime.ctx
        results = []
        async with ctx.sessions.begin() as session:
            names = [await chain_of(runtime, args.chain)] if args.chain else list(await chains(session))
            for chain in names:
                verdict = await verify_chain(session, chain, ctx.auditor.signer, extra_checkpoints=kept_outside)
                results.append(_report(verdict))
                await ctx.auditor.append(
                    session,
                    AuditEntry(
                        "audit.verify",
                        None,
                        resource_type="audit_log",
                        resource_id=chain,
                        chain=chain,
                        details={
                            "ok": verdict.ok,
                            "checked": verdict.checked,
                            "first_bad_seq": verdict.first_bad,
                            "via": "cli",
                        },
                        operator=operator,
                    ),
                )
        return 0 if all(results) else 1

    return with_runtime(args, work)


def _verify_file(args: argparse.Namespace) -> int:
    reading: Path = args.file
    try:
        pem = None
        if args.public_key is not None:
            reading = args.public_key
            pem = args.public_key.read_bytes()
        token = args.header
        if args.header_file is not None:
            reading = args.header_file
            token = header_token_in(args.header_file.read_text(encoding="utf-8"))
        reading = args.file
        with args.file.open(encoding="utf-8") as lines:
            verdict, key_source = verify_export(lines, public_key_pem=pem, fhir_header=token)
    except OSError as exc:
        raise CommandFailed(f"cannot read {reading}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CommandFailed(f"{reading} is not UTF-8 text: not an export, header or key") from None
    except ExportUnreadable as exc:
        raise CommandFailed(f"cannot verify {args.file}: {exc}") from None
    say(f"custody: checkpoints checked with {key_source}")
    return 0 if _report(verdict) else 1


def _checkpoints_file(path: Path) -> list[Checkpoint]:
    """Checkpoints kept outside the database, one JSON object a line (`audit checkpoint --out`)."""
    try:
        with path.open(encoding="utf-8") as lines:
            return [Checkpoint(**json.loads(line)) for line in lines if line.strip()]
    except OSError as exc:
        raise CommandFailed(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError):  # not JSON, or not a checkpoint's fields
        raise CommandFailed(f"{path} is not a checkpoints file (`custody audit checkpoint --out`)") from None


def _audit_export(args: argparse.Namespace) -> int:
    async def work(runtime: Runtime, operator: str) -> int:
        ctx = runtime.ctx
        chain = await chain_of(runtime, args.chain)
        async with ctx.sessions.begin() as session:
            span = await export_range(session, chain, args.since, args.until)
            header = await export_header(session, span, ctx.auditor.signer)
            await ctx.auditor.append(
                session,
                AuditEntry(
                    "audit.export",
                    None,
                    resource_type="audit_log",
                    resource_id=chain,
                    chain=chain,
                    details={
                        "format": args.format,
                        "via": "cli",
                        "first_seq": span.first_seq,
                        "last_seq": span.last_seq,
                    },
                    operator=operator,
                ),
            )
            if args.format == "fhir":
                say(f"custody: export header (base64url JSON): {header_token(header)}")
            async for line in export_lines(session, header, fhir=args.format == "fhir"):
                sys.stdout.write(line)
        return 0

    return with_runtime(args, work)


def _audit_checkpoint(args: argparse.Namespace) -> int:
    async def work(runtime: Runtime, operator: str) -> int:
        for checkpoint in await checkpoint_all(runtime.ctx.auditor, runtime.ctx.sessions):
            print(f"{checkpoint.chain}: signed seq {checkpoint.seq} ({checkpoint.head_hash[:16]}...)")
            if args.out is not None:
                # A copy outside the database: whoever can rewrite the tables cannot reach it.
                with args.out.open("a", encoding="utf-8") as out:
                    out.write(json.dumps(checkpoint.as_json(), separators=(",", ":")) + "\n")
        return 0

    return with_runtime(args, work)


def _receipts_verify(args: argparse.Namespace) -> int:
    """A deletion receipt checked offline against the audit public key: exit 0 when it verifies,
    1 when it does not (altered, or signed by another key), 2 when it cannot be read."""
    from ..conversations import receipt_valid

    try:
        document = json.loads(args.file.read_text(encoding="utf-8"))
        key = load_public_key(args.public_key.read_bytes())
    except OSError as exc:
        raise CommandFailed(f"cannot read {exc.filename}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise CommandFailed(
            "the receipt must be the JSON the service answered and the key an Ed25519 public key in PEM"
        ) from None
    if not receipt_valid(document, key):
        print(f"{args.file}: NOT VALID: altered, or not signed by this key")
        return 1
    payload = document["payload"]
    print(
        f"{args.file}: valid receipt {payload['receipt_id']} ({payload['cause']}, issued {payload['issued_at']}): "
        f"{len(payload['destroyed'])} conversation(s) destroyed, {len(payload['kept'])} kept"
    )
    return 0


def add_audit_commands(commands: argparse._SubParsersAction[Any]) -> None:
    receipts = commands.add_parser("receipts", help="check deletion receipts").add_subparsers(
        dest="action", required=True
    )
    check = receipts.add_parser("verify", help="check a deletion receipt offline against the audit public key")
    check.add_argument("file", type=Path, metavar="FILE", help="the receipt as the service answered it (JSON)")
    check.add_argument("--public-key", type=Path, required=True, help="PEM of the audit signing key")
    check.set_defaults(handler=_receipts_verify)

    audit = commands.add_parser("audit", help="verify, export and checkpoint the audit log").add_subparsers(
        dest="action", required=True
    )
    verify = audit.add_parser(
        "verify", help="recompute the hash chains (or an export file) and name the first bad record"
    )
    verify.add_argument("--chain", help="one chain: a tenant's name or id, or `system`; default: all")
    verify.add_argument(
        "--file",
        type=Path,
        help="verify an export offline instead of the database (exit 1: it fails; 2: it cannot be read)",
    )
    verify.add_argument("--public-key", type=Path, help="PEM of the audit signing key to pin (with --file)")
    verify.add_argument(
        "--header",
        metavar="TOKEN",
        help="with --file, for a FHIR export: its header token (X-Custody-Export-Header, or as `audit export` prints)",
    )
    verify.add_argument(
        "--header-file",
        type=Path,
        metavar="FILE",
        help="as --header, read from FILE: the token alone, or the response headers saved by `curl -D FILE`",
    )
    verify.add_argument(
        "--checkpoints", type=Path, help="checkpoints kept outside the database (`audit checkpoint --out`)"
    )
    verify.set_defaults(handler=_audit_verify)
    export = audit.add_parser("export", help="export a chain's records with the proof to verify them")
    export.add_argument("--chain", required=True, help="a tenant's name or id, or `system`")
    export.add_argument("--since", type=instant, help="ISO 8601 with a timezone, e.g. 2026-11-24T00:00:00Z")
    export.add_argument("--until", type=instant, help="ISO 8601 with a timezone")
    export.add_argument("--format", choices=["ndjson", "fhir"], default="ndjson")
    export.set_defaults(handler=_audit_export)
    checkpoint = audit.add_parser("checkpoint", help="sign every chain's head now")
    checkpoint.add_argument("--out", type=Path, help="also append the new checkpoints to this file (keep it elsewhere)")
    checkpoint.set_defaults(handler=_audit_checkpoint)
