"""generateContent fallback: which surface of the model service answered a turn

- `turns.surface`: `interactions`, or `generate_content` when the route's fallback took the turn
  because the Interactions surface could not (its steps are stored converted to Interactions
  steps, replayed like any other). Earlier turns went through Interactions.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04 09:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("turns", sa.Column("surface", sa.String(32), nullable=False, server_default="interactions"))
    op.create_check_constraint(op.f("ck_turns_surface"), "turns", "surface IN ('interactions', 'generate_content')")


def downgrade() -> None:
    op.drop_constraint(op.f("ck_turns_surface"), "turns", type_="check")
    op.drop_column("turns", "surface")
