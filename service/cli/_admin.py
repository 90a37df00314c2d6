"""`custody tenants`, `keys`, `keyring` and `secrets`: administration, audited under the operator."""

from __future__ import annotations

import argparse
from typing import Any

from ..audit import SYSTEM_CHAIN, AuditEntry
from ..config import Settings
from ..crypto import KEK_LABEL_PREFIX, Pkcs11Keyring, ensure_current_sentinel, rewrap_data_keys
from ..errors import ConfigurationError
from ..runtime import Runtime
from ..secret_files import init_secrets, pkcs11_config, stage_secrets
from ..tenants import create_tenant, find_tenant, issue_key, list_keys, list_tenants, revoke_key
from ._common import say, with_runtime

__all__ = ["add_admin_commands"]


def _tenants_create(args: argparse.Namespace) -> int:
    async def work(runtime: Runtime, operator: str) -> int:
        ctx = runtime.ctx
        async with ctx.sessions.begin() as session:
            tenant = await create_tenant(ctx.auditor, session, args.name, operator=operator, via="cli")
        print(tenant.id)
        return 0

    return with_runtime(args, work)


def _tenants_list(args: argparse.Namespace) -> int:
    async def work(runtime: Runtime, operator: str) -> int:
        ctx = runtime.ctx
        async with ctx.sessions.begin() as session:
            tenants = await list_tenants(session)
            await ctx.auditor.append(
                session,
                AuditEntry(
                    "tenant.list",
                    None,
                    resource_type="tenant",
                    chain=SYSTEM_CHAIN,
                    details={"returned": len(tenants), "via": "cli"},
                    operator=operator,
                ),
            )
        for tenant in tenants:
            print(f"{tenant.id}\t{tenant.name}\t{tenant.created_at.isoformat()}")
        return 0

    return with_runtime(args, work)


def _keys_issue(args: argparse.Namespace) -> int:
    async def work(runtime: Runtime, operator: str) -> int:
        ctx = runtime.ctx
        async with ctx.sessions.begin() as session:
            row, key = await issue_key(
                ctx.auditor, session, ctx.pepper, args.tenant, args.role, operator=operator, via="cli"
            )
        say(f"custody: issued {row.id} ({args.role}) for tenant {row.tenant_id}; the key is shown once:")
        print(key)
        return 0

    return with_runtime(args, work)


def _keys_list(args: argparse.Namespace) -> int:
    async def work(runtime: Runtime, operator: str) -> int:
        ctx = runtime.ctx
        async with ctx.sessions.begin() as session:
            keys = await list_keys(session, args.tenant)
            chain = (await find_tenant(session, args.tenant)).id if args.tenant else SYSTEM_CHAIN
            await ctx.auditor.append(
                session,
                AuditEntry(
                    "api_key.list",
                    None,
                    resource_type="api_key",
                    chain=chain,
                    details={"returned": len(keys), "via": "cli"},
                    operator=operator,
                ),
            )
        for key, tenant_name in keys:
            revoked = key.revoked_at.isoformat() if key.revoked_at else "active"
            print(f"{key.id}\t{tenant_name}\t{key.role}\t{key.created_at.isoformat()}\t{revoked}")
        return 0

    return with_runtime(args, work)


def _keys_revoke(args: argparse.Namespace) -> int:
    async def work(runtime: Runtime, operator: str) -> int:
        ctx = runtime.ctx
        async with ctx.sessions.begin() as session:
            await revoke_key(ctx.auditor, session, args.key_id, operator=operator, via="cli")
        say(f"custody: revoked {args.key_id}")
        return 0

    return with_runtime(args, work)


def _keyring_rotate(args: argparse.Namespace) -> int:
    async def work(runtime: Runtime, operator: str) -> int:
        ctx = runtime.ctx
        if not args.rewrap_only:
            version = ctx.keyring.rotate()
            say(f"custody: the keyring now has KEK version {version} as current")
            # The new version's sentinel first: a replica started with a stale keyring file then
            # refuses to start instead of failing on the first rewrapped conversation.
            async with ctx.sessions.begin() as session:
                await ensure_current_sentinel(session, ctx.keyring)
        result = await rewrap_data_keys(ctx.auditor, ctx.sessions, ctx.keyring, ctx.expiry_keys, operator=operator)
        print(f"rewrapped {result.rewrapped} data keys under KEK version {result.version}")
        print(f"rewrapped {result.expiry_keys} expiry keys under KEK version {result.version}")
        return 0

    return with_runtime(args, work)


def _keyring_init(args: argparse.Namespace) -> int:
    """The PKCS#11 keyring's first KEK: generated inside the token, where it stays. (The file
    keyring's first KEK comes with `custody secrets init`.)"""
    settings = Settings.from_env()
    settings.check()
    config = pkcs11_config(settings)
    if config is None:
        raise ConfigurationError(
            "`custody keyring init` creates the first KEK in an HSM: set CUSTODY_PKCS11_MODULE, "
            "CUSTODY_PKCS11_TOKEN_LABEL and CUSTODY_PKCS11_PIN_FILE (a keyring file comes from `custody secrets init`)"
        )
    # A KeyringError (the token already holds a KEK, a wrong PIN) ends in one line, exit 1.
    Pkcs11Keyring.initialize(config).close()
    say(f"custody: created KEK version 1 ({KEK_LABEL_PREFIX}1) in {config.source}; it cannot be read out of the token")
    return 0


def _secrets_init(args: argparse.Namespace) -> int:
    created = init_secrets(args.directory)
    say(f"custody: created the keyring, the pepper and the audit signing key in {args.directory} (mode 0600)")
    say("custody: set these variables for every replica and keep a copy of the files apart from database backups:")
    for line in created.as_environment():
        print(line)
    return 0


def _secrets_stage(args: argparse.Namespace) -> int:
    staged = stage_secrets(args.source, args.target)
    say(f"custody: staged {', '.join(path.name for path in staged)} into {args.target} (mode 0600)")
    return 0


def add_admin_commands(commands: argparse._SubParsersAction[Any]) -> None:
    from pathlib import Path

    tenants = commands.add_parser("tenants", help="manage tenants").add_subparsers(dest="action", required=True)
    create = tenants.add_parser("create", help="create a tenant (prints its id)")
    create.add_argument("name", help="1 to 100 letters, digits, `.`, `_` or `-`")
    create.set_defaults(handler=_tenants_create)
    tenants.add_parser("list", help="list tenants: id, name, created").set_defaults(handler=_tenants_list)

    keys = commands.add_parser("keys", help="manage API keys").add_subparsers(dest="action", required=True)
    issue = keys.add_parser("issue", help="issue an API key (printed once)")
    issue.add_argument("--tenant", required=True, help="the tenant's name or id")
    issue.add_argument("--role", required=True, choices=["backend", "auditor", "ops"])
    issue.set_defaults(handler=_keys_issue)
    listing = keys.add_parser("list", help="list API keys (never their secrets): id, tenant, role, created, revoked")
    listing.add_argument("--tenant", help="only this tenant's (name or id)")
    listing.set_defaults(handler=_keys_list)
    revoke = keys.add_parser("revoke", help="revoke an API key by id")
    revoke.add_argument("key_id")
    revoke.set_defaults(handler=_keys_revoke)

    secrets = commands.add_parser("secrets", help="create the secrets a deployment needs").add_subparsers(
        dest="action", required=True
    )
    init = secrets.add_parser(
        "init", help="create the keyring, pepper and audit signing key in DIR and print the variables to set"
    )
    init.add_argument("directory", type=Path, metavar="DIR")
    init.set_defaults(handler=_secrets_init)
    stage = secrets.add_parser(
        "stage",
        help="copy every file of SOURCE (a mounted Kubernetes Secret) into TARGET, mode 0600, owned by this user",
    )
    stage.add_argument("source", type=Path)
    stage.add_argument("target", type=Path)
    stage.set_defaults(handler=_secrets_stage)

    keyring = commands.add_parser("keyring", help="create or rotate the key-encryption key").add_subparsers(
        dest="action", required=True
    )
    keyring.add_parser(
        "init", help="create KEK version 1 in the HSM named by the CUSTODY_PKCS11_* settings (an empty token only)"
    ).set_defaults(handler=_keyring_init)
    rotate = keyring.add_parser("rotate", help="add a new KEK version and rewrap every data key under it")
    rotate.add_argument("--rewrap-only", action="store_true", help="finish an interrupted rewrap; add no version")
    rotate.set_defaults(handler=_keyring_rotate)
