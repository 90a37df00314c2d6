"""audit trail: hash-chained, append-only audit records, chain heads and signed checkpoints

Append-only is enforced twice. Grants: the service runs as a member of the `custody_app` role,
which may SELECT and INSERT audit records but never UPDATE or DELETE them. Triggers: any UPDATE,
DELETE or TRUNCATE of audit records or checkpoints raises, for every role, and the triggers are
ENABLE ALWAYS so that `session_replication_role = replica` cannot mute them. An owner or
superuser can still disable a trigger and rewrite rows; the signed checkpoints, whose key is not
in the database, are what catch that.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 10:27:07.498403
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


# One statement per entry: asyncpg prepares each statement, and a prepared statement may not
# hold several commands.
_APPEND_ONLY = [
    """CREATE FUNCTION custody_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'custody: % on % is not allowed: audit records are append-only',
            TG_OP, TG_TABLE_NAME USING ERRCODE = 'insufficient_privilege';
    END $$""",
    *(
        statement
        for table in ("audit_events", "audit_checkpoints")
        for statement in (
            f"""CREATE TRIGGER {table}_no_change BEFORE UPDATE OR DELETE ON {table}
                FOR EACH ROW EXECUTE FUNCTION custody_audit_append_only()""",
            f"""CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table}
                FOR EACH STATEMENT EXECUTE FUNCTION custody_audit_append_only()""",
            f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_change",
            f"ALTER TABLE {table} ENABLE ALWAYS TRIGGER {table}_no_truncate",
        )
    ),
]

# Roles are cluster-wide, so the role may already exist (another database on the same server).
_ROLE = [
    """DO $$ BEGIN
        IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'custody_app') THEN
            CREATE ROLE custody_app NOLOGIN;
        END IF;
    END $$""",
    "REVOKE ALL ON audit_events, audit_checkpoints, audit_chain_heads FROM PUBLIC",
    """GRANT SELECT, INSERT, UPDATE, DELETE ON tenants, api_keys, conversations, data_keys, turns,
        steps, idempotency_records, upstream_interactions TO custody_app""",
    "GRANT SELECT, INSERT ON audit_events, audit_checkpoints TO custody_app",
    "GRANT SELECT, INSERT, UPDATE ON audit_chain_heads TO custody_app",
    "GRANT SELECT ON alembic_version TO custody_app",
]


def upgrade() -> None:
    op.create_table(
        "audit_chain_heads",
        sa.Column("chain", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("chain", name=op.f("pk_audit_chain_heads")),
    )
    op.create_table(
        "audit_checkpoints",
        sa.Column("chain", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("head_hash", sa.String(length=64), nullable=False),
        sa.Column("signed_at", sa.String(length=40), nullable=False),
        sa.Column("key_id", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=200), nullable=False),
        sa.PrimaryKeyConstraint("chain", "seq", name=op.f("pk_audit_checkpoints")),
    )
    op.create_table(
        "audit_events",
        sa.Column("chain", sa.String(length=40), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("record", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.PrimaryKeyConstraint("chain", "seq", name=op.f("pk_audit_events")),
    )
    op.create_index(
        "ix_audit_events_record",
        "audit_events",
        ["record"],
        unique=False,
        postgresql_using="gin",
        postgresql_ops={"record": "jsonb_path_ops"},
    )
    for statement in (*_APPEND_ONLY, *_ROLE):
        op.execute(statement)


def downgrade() -> None:
    op.execute("DROP FUNCTION IF EXISTS custody_audit_append_only() CASCADE")
    op.drop_index(
        "ix_audit_events_record",
        table_name="audit_events",
        postgresql_using="gin",
        postgresql_ops={"record": "jsonb_path_ops"},
    )
    op.drop_table("audit_events")
    op.drop_table("audit_checkpoints")
    op.drop_table("audit_chain_heads")
