"""runs.trace_id: the OpenTelemetry trace id of a run, when traces are exported.

Revision ID: 0002_obs_trace_id
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_obs_trace_id"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """A nullable column: existing runs simply have no trace."""
    op.add_column("runs", sa.Column("trace_id", sa.String(32), nullable=True))


def downgrade() -> None:
    """Drop the column (batch mode: SQLite cannot drop columns in place)."""
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("trace_id")
