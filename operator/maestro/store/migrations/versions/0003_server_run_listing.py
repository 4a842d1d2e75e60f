"""Indexes for listing run history newest first, a page at a time (the server's GET /api/runs).

Revision ID: 0003_server_run_listing
Revises: 0002_obs_trace_id
Create Date: 2026-11-24
"""

from __future__ import annotations

from alembic import op

revision = "0003_server_run_listing"
down_revision = "0002_obs_trace_id"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Keyset pagination walks (created_at, id), over all runs or one namespace's."""
    op.create_index("ix_runs_created_at_id", "runs", ["created_at", "id"])
    op.create_index("ix_runs_namespace_created_at_id", "runs", ["namespace", "created_at", "id"])


def downgrade() -> None:
    """Drop the listing indexes."""
    op.drop_index("ix_runs_namespace_created_at_id", table_name="runs")
    op.drop_index("ix_runs_created_at_id", table_name="runs")
