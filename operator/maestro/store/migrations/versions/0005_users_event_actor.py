"""Who did it: an ``actor`` on events (the approver of an approval, who cancelled).

Revision ID: 0005_users_event_actor
Revises: 0004_ends_outbox
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_users_event_actor"
down_revision = "0004_ends_outbox"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add the nullable column: old events have no recorded actor."""
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("actor", sa.String(253), nullable=True))


def downgrade() -> None:
    """Drop the column (the actors recorded are lost)."""
    with op.batch_alter_table("events") as batch:
        batch.drop_column("actor")
