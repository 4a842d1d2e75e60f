"""Event outbox and launch marks: Events posted exactly once, vanished Jobs never re-created.

``events.posted_at``: when the event was handled by the operator (its Kubernetes Event
posted, if it maps to one). NULL means not yet: the operator posts it, also after a crash.
Events that exist at upgrade time count as handled, so an upgrade posts nothing old.

``task_attempts.launched_at``: when the executor's object (a Job) was created. A Running
attempt whose Job is missing was launched (the Job vanished: a failed attempt) or not
(the operator stopped between recording the start and creating it: create it now).

Revision ID: 0004_ends_outbox
Revises: 0003_server_run_listing
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_ends_outbox"
down_revision = "0003_server_run_listing"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Add the two columns; mark every existing event as handled."""
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("posted_at", TS, nullable=True))
    op.execute("UPDATE events SET posted_at = at")
    op.create_index(
        "ix_events_unposted",
        "events",
        ["run_id", "id"],
        postgresql_where=sa.text("posted_at IS NULL"),
        sqlite_where=sa.text("posted_at IS NULL"),
    )
    with op.batch_alter_table("task_attempts") as batch:
        batch.add_column(sa.Column("launched_at", TS, nullable=True))
    # Attempts started before the upgrade: assume their Job was created, so a missing one
    # counts as vanished (never run twice) rather than as still to be created.
    op.execute("UPDATE task_attempts SET launched_at = started_at WHERE job_name IS NOT NULL")


def downgrade() -> None:
    """Drop the two columns."""
    with op.batch_alter_table("task_attempts") as batch:
        batch.drop_column("launched_at")
    op.drop_index("ix_events_unposted", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("posted_at")
