"""provider chain: a turn may chain onto the provider's copy instead of replaying the history

- `conversations.provider_chain_id`: the provider interaction that holds the conversation's whole
  history, when provider storage is permitted and the last stored turn went with it; a turn may
  then send only its new input with `previous_interaction_id`. NULL otherwise.
- `turns.history_sent`: how the turn's history reached the model (`replayed`, `chained`, or
  `replayed_after_chain_lost` when the provider no longer had the chain). Earlier turns replayed.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("conversations", sa.Column("provider_chain_id", sa.String(200), nullable=True))
    op.add_column("turns", sa.Column("history_sent", sa.String(32), nullable=False, server_default="replayed"))
    op.create_check_constraint(
        op.f("ck_turns_history_sent"), "turns", "history_sent IN ('replayed', 'chained', 'replayed_after_chain_lost')"
    )


def downgrade() -> None:
    op.drop_constraint(op.f("ck_turns_history_sent"), "turns", type_="check")
    op.drop_column("turns", "history_sent")
    op.drop_column("conversations", "provider_chain_id")
