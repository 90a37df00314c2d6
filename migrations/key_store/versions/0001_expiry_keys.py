"""key store: one expiry key per UTC day, wrapped under a KEK version

The key store is a database of its own (CUSTODY_KEY_STORE_URL), never the service's: a backup of
the service's database must not hold these keys. `expiry_keys` has one row per day that some
conversation's deadline falls on; the retention runner deletes a row once its day has passed.
The service's role `custody_app` may read, create and delete them (it destroys them as it runs).

Revision ID: ks0001
Revises:
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "ks0001"
down_revision = None
branch_labels = None
depends_on = None

_ROLE = """DO $$ BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'custody_app') THEN
        CREATE ROLE custody_app NOLOGIN;
    END IF;
END $$"""


def upgrade() -> None:
    op.create_table(
        "expiry_keys",
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("day", name=op.f("pk_expiry_keys")),
    )
    op.execute(_ROLE)
    op.execute("REVOKE ALL ON expiry_keys FROM PUBLIC")
    op.execute("GRANT SELECT, INSERT, UPDATE, DELETE ON expiry_keys TO custody_app")
    op.execute("GRANT SELECT ON key_store_alembic_version TO custody_app")


def downgrade() -> None:
    op.drop_table("expiry_keys")
