"""Cached tasks, workflow outputs and child runs.

``runs.outputs``: a Workflow's declared ``outputs``, computed when the run Succeeded.
``runs.parent_id``: the run whose ``workflow`` task started this one (history links
both ways; the index serves "children of a run").

``task_attempts.cache_key``: a digest of the namespace and the task's rendered
``cache.key``, set on attempts that ran (never on cached copies, so an entry's age is
that of the work). A later attempt with the same digest reuses the newest Succeeded one
within its ``maxAge``; the partial index serves that lookup.

``task_attempts.cached_from``: ``{"runId", "task", "attempt"}`` of the attempt whose
outputs a cached attempt reused.

Revision ID: 0006_dag_task_cache
Revises: 0005_users_event_actor
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0006_dag_task_cache"
down_revision = "0005_users_event_actor"
branch_labels = None
depends_on = None

# Written out here rather than imported, so this migration never changes.
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    """Add the nullable columns and the lookup index (old attempts cache nothing)."""
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("outputs", JSON, nullable=True))
        batch.add_column(sa.Column("parent_id", sa.String(36), nullable=True))
    op.create_index("ix_runs_parent_id", "runs", ["parent_id"])
    with op.batch_alter_table("task_attempts") as batch:
        batch.add_column(sa.Column("cache_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("cached_from", JSON, nullable=True))
    op.create_index(
        "ix_task_attempts_cache",
        "task_attempts",
        ["cache_key", "finished_at"],
        postgresql_where=sa.text("cache_key IS NOT NULL AND phase = 'Succeeded'"),
        sqlite_where=sa.text("cache_key IS NOT NULL AND phase = 'Succeeded'"),
    )


def downgrade() -> None:
    """Drop the index and the columns (cache entries and run outputs are lost)."""
    op.drop_index("ix_task_attempts_cache", table_name="task_attempts")
    with op.batch_alter_table("task_attempts") as batch:
        batch.drop_column("cached_from")
        batch.drop_column("cache_key")
    op.drop_index("ix_runs_parent_id", table_name="runs")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("parent_id")
        batch.drop_column("outputs")
