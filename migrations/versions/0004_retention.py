"""retention: deadlines on conversations, legal holds, retention runs, deletion receipts

- `conversations` carry the retention rule that governs them (the strictest of their route's
  and classes' rules, as ISO 8601 durations) and the deadlines it gives: `keep_until` (created +
  keep_at_least: no deletion before) and `purge_at` (the later of last activity + delete_after and
  keep_until: the runner purges from then on). `retention_policy_version` says which policy the
  rule came from, so a policy change is found and recomputed in batches. Rows from before this
  migration have none and are computed by the first service or runner that starts.
- `legal_holds`: a hold on a tenant, a conversation or a data subject (by the keyed subject
  digest); an active hold blocks purge and deletion.
- `retention_runs`: one row per run of the runner (progress, counts, who started it).
- `deletion_receipts`: the signed receipts of deletions and purges, kept for whoever must prove
  them later; a row without its signed receipt yet is one still owed (`receipt_items` holds what
  it will cover), held by the process deleting (`held_until`), which a retention run issues once
  that hold lapses (the process stopped).
- an index on `steps.turn_id`, which deleting a conversation's turns needs.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 08:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("delete_after", sa.String(length=40), nullable=True))
    op.add_column("conversations", sa.Column("keep_at_least", sa.String(length=40), nullable=True))
    op.add_column("conversations", sa.Column("keep_until", sa.DateTime(timezone=True), nullable=True))
    op.add_column("conversations", sa.Column("purge_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "conversations",
        sa.Column("retention_policy_version", sa.String(length=80), server_default="", nullable=False),
    )
    op.create_index(
        "ix_conversations_purge_at", "conversations", ["purge_at"], postgresql_where=sa.text("purge_at IS NOT NULL")
    )
    op.create_index("ix_conversations_retention_policy_version", "conversations", ["retention_policy_version"])
    op.create_table(
        "legal_holds",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("scope", sa.String(length=16), nullable=False),
        sa.Column("conversation_id", sa.String(length=40), nullable=True),
        sa.Column("subject_digest", sa.LargeBinary(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("created_by", sa.String(length=80), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("released_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("released_by", sa.String(length=80), nullable=True),
        sa.CheckConstraint("scope IN ('tenant', 'conversation', 'subject')", name=op.f("ck_legal_holds_scope")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_legal_holds_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_legal_holds")),
    )
    op.create_index(
        "ix_legal_holds_active", "legal_holds", ["tenant_id"], postgresql_where=sa.text("released_at IS NULL")
    )
    op.create_table(
        "retention_runs",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=True),
        sa.Column("dry_run", sa.Boolean(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("started_by", sa.String(length=80), nullable=False),
        sa.Column("policy_version", sa.String(length=80), nullable=False),
        sa.Column("counts", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint("status IN ('running', 'completed', 'failed')", name=op.f("ck_retention_runs_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retention_runs")),
    )
    op.create_table(
        "deletion_receipts",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("chain", sa.String(length=40), nullable=False),
        sa.Column("cause", sa.String(length=40), nullable=False),
        sa.Column("receipt", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("held_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_deletion_receipts")),
    )
    op.create_index("ix_deletion_receipts_tenant_id", "deletion_receipts", ["tenant_id"])
    op.create_index(
        "ix_deletion_receipts_owed", "deletion_receipts", ["held_until"], postgresql_where=sa.text("receipt IS NULL")
    )
    op.create_table(
        "receipt_items",
        sa.Column("receipt_id", sa.String(length=40), nullable=False),
        sa.Column("conversation_id", sa.String(length=40), nullable=False),
        sa.Column("item", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["receipt_id"],
            ["deletion_receipts.id"],
            name=op.f("fk_receipt_items_receipt_id_deletion_receipts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("receipt_id", "conversation_id", name=op.f("pk_receipt_items")),
    )
    # Deleting a conversation's turns makes Postgres find their steps through this foreign key:
    # without the index, that is a scan of the whole steps table per turn.
    op.create_index("ix_steps_turn_id", "steps", ["turn_id"])
    op.execute(
        "GRANT SELECT, INSERT, UPDATE, DELETE ON legal_holds, retention_runs, deletion_receipts, receipt_items"
        " TO custody_app"
    )


def downgrade() -> None:
    op.drop_index("ix_steps_turn_id", table_name="steps")
    op.drop_table("receipt_items")
    op.drop_index("ix_deletion_receipts_owed", table_name="deletion_receipts")
    op.drop_index("ix_deletion_receipts_tenant_id", table_name="deletion_receipts")
    op.drop_table("deletion_receipts")
    op.drop_table("retention_runs")
    op.drop_index("ix_legal_holds_active", table_name="legal_holds")
    op.drop_table("legal_holds")
    op.drop_index("ix_conversations_retention_policy_version", table_name="conversations")
    op.drop_index("ix_conversations_purge_at", table_name="conversations")
    for column in ("retention_policy_version", "purge_at", "keep_until", "keep_at_least", "delete_after"):
        op.drop_column("conversations", column)
