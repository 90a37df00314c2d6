"""`custody audit`: verify the chains (or an export, offline), export a chain, sign checkpoints,
rotate the signing key; `custody receipts verify`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm

from ..audit import (
    AuditEntry,
    AuditSigner,
    ChainVerdict,
    Checkpoint,
    ExportUnreadable,
    TrustedKey,
    TrustedKeys,
    UntrustedKey,
    chains,
    checkpoint_all,
    export_header,
    export_lines,
    export_range,
    header_token,
    header_token_in,
    iso_now,
    read_public_keys,
    rotate_signing_key,
    verify_chain,
    verify_export,
    write_retired_key,
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
                verdict = await verify_chain(session, chain, ctx.auditor.trusted_keys, extra_checkpoints=kept_outside)
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


def _public_keys(paths: list[Path]) -> TrustedKeys:
    """The keys given with `--public-key` (each a PEM file of one key or several, or a directory of
    them): the key in use and the retired ones, so that what each signed verifies."""
    try:
        return TrustedKeys(key for path in paths for key in read_public_keys(path))
    except ValueError as exc:
        raise CommandFailed(f"--public-key: {exc}") from None


def _verify_file(args: argparse.Namespace) -> int:
    pinned = _public_keys(args.public_key) if args.public_key else None
    reading: Path = args.file
    try:
        token = args.header
        if args.header_file is not None:
            reading = args.header_file
            token = header_token_in(args.header_file.read_text(encoding="utf-8"))
        reading = args.file
        with args.file.open(encoding="utf-8") as lines:
            verdict, key_source = verify_export(lines, pinned_keys=pinned, fhir_header=token)
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
    """A deletion receipt checked offline against the audit public keys: exit 0 when it verifies,
    1 when it does not (altered, or signed by a key not given or past its limit), 2 when it
    cannot be read."""
    from ..conversations import receipt_valid

    keys = _public_keys(args.public_key)
    try:
        document = json.loads(args.file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CommandFailed(f"cannot read {args.file}: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError):
        raise CommandFailed(f"{args.file} is not JSON: give the receipt as the service answered it") from None
    payload = document.get("payload") if isinstance(document, dict) else None
    if not isinstance(payload, dict):
        print(f"{args.file}: NOT VALID: not a deletion receipt")
        return 1
    try:
        # The receipt names its key; a retired key's limit is checked against when it was issued.
        key = keys.key_for(document.get("key_id"), payload.get("issued_at"))
    except UntrustedKey as exc:
        print(f"{args.file}: NOT VALID: {exc}")
        return 1
    if not receipt_valid(document, key.public_key):
        print(f"{args.file}: NOT VALID: altered, or not signed by key {key.key_id}")
        return 1
    print(
        f"{args.file}: valid receipt {payload['receipt_id']} ({payload['cause']}, issued {payload['issued_at']}): "
        f"{len(payload['destroyed'])} conversation(s) destroyed, {len(payload['kept'])} kept"
    )
    return 0


def _audit_rotate_signing_key(args: argparse.Namespace) -> int:
    new_path: Path = args.new_key.absolute()
    if args.generate and os.path.lexists(new_path):
        raise CommandFailed(f"{new_path} exists: --generate writes a new key and never overwrites a file")
    if not args.generate and not new_path.is_file():
        raise CommandFailed(f"{new_path} does not exist: give the new key's file, or add --generate to create it")

    async def work(runtime: Runtime, operator: str) -> int:
        auditor = runtime.ctx.auditor
        old = auditor.signer
        if old is None:  # every runtime has one; a context built without it cannot rotate
            raise CommandFailed("no audit signing key in use to rotate (CUSTODY_AUDIT_SIGNING_KEY)")
        try:
            new, generated = AuditSigner.load_or_generate(new_path)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise CommandFailed(f"the new key {new_path}: {exc}") from None
        if generated:
            say(f"custody: generated the new audit signing key {new_path} (mode 0600, key id {new.key_id})")
        if new.key_id == old.key_id:
            raise CommandFailed(f"{new_path} is the key in use ({old.key_id}): rotate to another key")
        if new.key_id in auditor.retired_keys:
            raise CommandFailed(f"{new_path} is a retired key ({new.key_id}): a retired key never signs again")
        trusted_until = iso_now() if args.compromised else None
        target = (
            args.retired_keys
            or runtime.settings.audit_retired_public_keys_path
            or new_path.parent / "audit-retired-public-keys.pem"
        ).absolute()
        note = f"retired by `custody audit rotate-signing-key` at {iso_now()}" + (
            " as compromised" if args.compromised else ""
        )
        try:
            # The old public key first: if the rest fails, running the command again finds it
            # there and replaces it, and the database has not changed yet.
            written = write_retired_key(target, TrustedKey(old.public_key, trusted_until), note)
        except (OSError, ValueError) as exc:
            raise CommandFailed(f"cannot add the old public key to {target}: {exc}") from None
        say(f"custody: added the public key of {old.key_id} to {written}")
        rotation = await rotate_signing_key(
            auditor, runtime.ctx.sessions, new, trusted_until=trusted_until, operator=operator
        )
        if args.out is not None:
            with args.out.open("a", encoding="utf-8") as out:
                for checkpoint in rotation.checkpoints:
                    out.write(json.dumps(checkpoint.as_json(), separators=(",", ":")) + "\n")
        trust = (
            f"it stays trusted for what it signed up to {trusted_until}, and nothing after"
            if trusted_until
            else "it stays trusted for everything it signed"
        )
        say(
            f"custody: audit signing key {old.key_id} retired ({trust}); new key {new.key_id}; "
            f"the handover is recorded in {len(rotation.checkpoints)} chain(s), each signed with {rotation.signed_with}"
        )
        say("custody: set these for every replica, then restart them all (docs/operations.md):")
        print(f"CUSTODY_AUDIT_SIGNING_KEY={new_path}")
        print(f"CUSTODY_AUDIT_RETIRED_PUBLIC_KEYS={target}")
        return 0

    return with_runtime(args, work)


def add_audit_commands(commands: argparse._SubParsersAction[Any]) -> None:
    receipts = commands.add_parser("receipts", help="check deletion receipts").add_subparsers(
        dest="action", required=True
    )
    check = receipts.add_parser("verify", help="check a deletion receipt offline against the audit public key")
    check.add_argument("file", type=Path, metavar="FILE", help="the receipt as the service answered it (JSON)")
    check.add_argument(
        "--public-key",
        type=Path,
        action="append",
        metavar="PEM",
        required=True,
        help="the audit public keys (PEM; a file of one or more, or a directory); repeat it for retired keys",
    )
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
    verify.add_argument(
        "--public-key",
        type=Path,
        action="append",
        metavar="PEM",
        help="with --file: the audit public keys to pin (PEM; a file of one or more, or a directory); "
        "repeat it for retired keys",
    )
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
    rotate = audit.add_parser(
        "rotate-signing-key",
        help="hand over to a new audit signing key: record it in every chain, keep the old public key as retired",
    )
    rotate.add_argument("--new-key", type=Path, required=True, metavar="FILE", help="the new key (Ed25519, PEM)")
    rotate.add_argument("--generate", action="store_true", help="create the new key at FILE (mode 0600)")
    rotate.add_argument(
        "--retired-keys",
        type=Path,
        metavar="PATH",
        help="where the old public key goes: a PEM file (added to) or a directory; default: "
        "CUSTODY_AUDIT_RETIRED_PUBLIC_KEYS, else audit-retired-public-keys.pem beside the new key",
    )
    rotate.add_argument(
        "--compromised",
        action="store_true",
        help="the old key may be stolen: trust it only for what it signed up to now, and sign the handover "
        "with the new key",
    )
    rotate.add_argument(
        "--out", type=Path, metavar="FILE", help="also append the handover checkpoints to this file (keep it elsewhere)"
    )
    rotate.set_defaults(handler=_audit_rotate_signing_key)
