"""Initial schema: runs, task attempts and the event log.

Revision ID: 0001
Revises:
Create Date: 2024-06-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# Written out here rather than imported, so this migration never changes when the
# models do.
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)
EVENT_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the three tables and their indexes."""
    op.create_table(
        "runs",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("namespace", sa.String(253), nullable=False),
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("uid", sa.String(64), nullable=True),
        sa.Column("workflow_name", sa.String(253), nullable=True),
        sa.Column("spec", JSON, nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("controls", JSON, nullable=False),
        sa.Column("generation", sa.BigInteger(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("updated_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.UniqueConstraint("namespace", "uid", name="uq_runs_namespace_uid"),
    )
    op.create_index(
        "ix_runs_unfinished",
        "runs",
        ["namespace", "created_at"],
        postgresql_where=sa.text("finished_at IS NULL"),
        sqlite_where=sa.text("finished_at IS NULL"),
    )
    op.create_index("ix_runs_finished_at", "runs", ["finished_at"])

    op.create_table(
        "task_attempts",
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("task", sa.String(63), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("outputs", JSON, nullable=True),
        sa.Column("job_name", sa.String(63), nullable=True),
        sa.Column("not_before", TS, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("run_id", "task", "attempt", name="pk_task_attempts"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_task_attempts_run_id_runs"),
        sa.CheckConstraint("attempt >= 1", name="ck_task_attempts_attempt_positive"),
    )

    op.create_table(
        "events",
        sa.Column("id", EVENT_ID, autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(36), nullable=False),
        sa.Column("task", sa.String(63), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("from_phase", sa.String(16), nullable=True),
        sa.Column("to_phase", sa.String(16), nullable=True),
        sa.Column("reason", sa.String(64), nullable=True),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column("at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], name="fk_events_run_id_runs"),
    )
    op.create_index("ix_events_run_id_id", "events", ["run_id", "id"])


def downgrade() -> None:
    """Drop everything (all run history is lost)."""
    op.drop_table("events")
    op.drop_table("task_attempts")
    op.drop_index("ix_runs_finished_at", table_name="runs")
    op.drop_index("ix_runs_unfinished", table_name="runs")
    op.drop_table("runs")
