"""background turns: a turn the model runs in the background, polled until it ends

- `turns.background_interaction_id`: the provider interaction a background turn waits for (NULL
  for a foreground turn). A turn in progress with one is resumed by a poller after its holder
  dies, never closed as abandoned.
- `turns.pending_input`, `turns.pending_input_key_version`: the turn's input steps, sealed under
  the conversation's data key like an idempotent answer, so that whichever replica stores the
  model's answer can store the input with it. Cleared once the turn ends.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("background_interaction_id", sa.String(200), nullable=True))
    op.add_column("turns", sa.Column("pending_input", sa.LargeBinary(), nullable=True))
    op.add_column("turns", sa.Column("pending_input_key_version", sa.Integer(), nullable=True))
    # The pollers' sweep: background turns still running (few, whatever the size of the table).
    op.create_index(
        "ix_turns_background_running",
        "turns",
        ["conversation_id"],
        postgresql_where=sa.text("status = 'in_progress' AND background_interaction_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_turns_background_running", table_name="turns")
    op.drop_column("turns", "pending_input_key_version")
    op.drop_column("turns", "pending_input")
    op.drop_column("turns", "background_interaction_id")
