"""fault tolerance: keyring sentinels, turn holders, keyed idempotency records, lease reaping

- `keyring_sentinels`: one random key per KEK version, wrapped under it. Startup and /readyz
  unwrap them, so a service given the wrong keyring refuses to start (or reports not ready)
  instead of answering 500 for every existing conversation.
- `turns.key_id`: the API key that started a turn, so that whoever closes an abandoned turn can
  record its outcome against the actor who started it.
- `idempotency_records`: keys and fingerprints become HMACs keyed with a secret outside the
  database. The unkeyed fingerprints stored so far let a card number be recovered by brute force,
  and the old rows cannot be re-keyed here (the secret is not in the database), so they are
  deleted: a client retrying a turn it sent before the upgrade runs it once more.
- a partial index on leased conversations, for the reaper that closes abandoned turns.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 07:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "keyring_sentinels",
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("kek_version", name=op.f("pk_keyring_sentinels")),
    )
    op.execute("GRANT SELECT, INSERT ON keyring_sentinels TO custody_app")
    op.add_column("turns", sa.Column("key_id", sa.String(length=40), nullable=True))
    op.execute("DELETE FROM idempotency_records")
    op.create_index(
        "ix_conversations_leased",
        "conversations",
        ["lease_expires_at"],
        postgresql_where=sa.text("lease_token IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_conversations_leased", table_name="conversations")
    op.drop_column("turns", "key_id")
    op.drop_table("keyring_sentinels")
