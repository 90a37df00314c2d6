"""expiry layer: data keys sealed under the expiry key of their deadline's day

- `data_keys.expiry_day`: the UTC day whose expiry key (kept in the key store, a database of its
  own) seals this data key; NULL for a conversation without a deadline, whose data key stays
  under the KEK alone. A partial index lets the retention runner find the data keys still under
  a day it is about to destroy.
- The data keys written before this migration have no expiry layer. Every conversation's
  `retention_policy_version` is cleared, so the first recompute after the upgrade (at startup, or
  the next retention run) derives its deadlines again and seals its data key under its deadline's
  day; until then those data keys stay readable with the keyring alone, as before.

The downgrade refuses while any data key is sealed: without the key store it could not unseal
them, and dropping the column would lose every such conversation.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("data_keys", sa.Column("expiry_day", sa.Date(), nullable=True))
    op.create_index(
        "ix_data_keys_expiry_day", "data_keys", ["expiry_day"], postgresql_where=sa.text("expiry_day IS NOT NULL")
    )
    op.execute("UPDATE conversations SET retention_policy_version = '' WHERE retention_policy_version <> ''")


def downgrade() -> None:
    sealed = op.get_bind().scalar(sa.text("SELECT count(*) FROM data_keys WHERE expiry_day IS NOT NULL"))
    if sealed:
        raise RuntimeError(
            f"{sealed} data keys are sealed under expiry keys; this version cannot read them back without "
            "the key store, so it cannot be downgraded to"
        )
    op.drop_index("ix_data_keys_expiry_day", table_name="data_keys")
    op.drop_column("data_keys", "expiry_day")
