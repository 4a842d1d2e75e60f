"""Buckets and replicas: several active operators share the runs.

``buckets``: 32 rows, one per bucket (a run's bucket is a hash of its WorkflowRun uid,
see ``maestro.store.leases.bucket_of``); ``holder`` is the replica that drives its runs
until ``expires_at``, ``epoch`` grows on every claim (the fencing token).

``replicas``: each live operator's heartbeat; the buckets are balanced over the
replicas whose ``expires_at`` has not passed.

Revision ID: 0007_scale_buckets
Revises: 0006_dag_task_cache
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_scale_buckets"
down_revision = "0006_dag_task_cache"
branch_labels = None
depends_on = None

# Written out here rather than imported, so this migration never changes.
BUCKETS = 32


def upgrade() -> None:
    """Create both tables and the free buckets."""
    buckets = op.create_table(
        "buckets",
        sa.Column("bucket", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("holder", sa.String(253), nullable=True),
        sa.Column("epoch", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("bucket", name="pk_buckets"),
    )
    op.bulk_insert(buckets, [{"bucket": b, "epoch": 0} for b in range(BUCKETS)])
    op.create_table(
        "replicas",
        sa.Column("name", sa.String(253), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_replicas"),
    )


def downgrade() -> None:
    """Drop both (ownership is rebuilt by the replicas that run)."""
    op.drop_table("replicas")
    op.drop_table("buckets")
