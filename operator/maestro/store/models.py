"""Tables of the context store (SQLAlchemy 2.x typed declarative models).

The schema itself is created by the Alembic migrations in ``migrations/versions``;
these models must describe exactly the same tables (a test compares them).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from maestro.store.types import JSONType, SafeText, UTCDateTime

# Deterministic constraint names, so migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

JSONDict = dict[str, Any]


class Base(DeclarativeBase):
    """Declarative base carrying the shared metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class RunRow(Base):
    """One WorkflowRun: its snapshot, parameters, phase and user controls."""

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    namespace: Mapped[str] = mapped_column(String(253))
    name: Mapped[str] = mapped_column(String(253))
    uid: Mapped[str | None] = mapped_column(String(64))
    workflow_name: Mapped[str | None] = mapped_column(String(253))
    spec: Mapped[JSONDict] = mapped_column(JSONType)
    params: Mapped[JSONDict] = mapped_column(JSONType)
    phase: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(SafeText)
    controls: Mapped[JSONDict] = mapped_column(JSONType)
    generation: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime)
    # OpenTelemetry trace id (32 hex digits) when the operator exports traces.
    trace_id: Mapped[str | None] = mapped_column(String(32))
    # The workflow's declared outputs, once the run Succeeded (migration 0006).
    outputs: Mapped[JSONDict | None] = mapped_column(JSONType)
    # The run whose `workflow` task started this one (migration 0006). Not a foreign key:
    # pruning a parent's history keeps its children's.
    parent_id: Mapped[str | None] = mapped_column(String(36))

    __table_args__ = (
        # NULL uids (local runs) never collide: NULLs are distinct in a unique constraint.
        UniqueConstraint("namespace", "uid"),
        Index(
            "ix_runs_unfinished",
            "namespace",
            "created_at",
            postgresql_where="finished_at IS NULL",
            sqlite_where="finished_at IS NULL",
        ),
        Index("ix_runs_finished_at", "finished_at"),
        # History pages newest first (keyset pagination over created_at, id).
        Index("ix_runs_created_at_id", "created_at", "id"),
        Index("ix_runs_namespace_created_at_id", "namespace", "created_at", "id"),
        Index("ix_runs_parent_id", "parent_id"),
    )


class AttemptRow(Base):
    """One attempt of one task in a run (a retry is a new attempt)."""

    __tablename__ = "task_attempts"

    # The primary key (run_id, task, attempt) also serves "attempts by run".
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    task: Mapped[str] = mapped_column(String(63), primary_key=True)
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True)
    phase: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(SafeText)
    outputs: Mapped[JSONDict | None] = mapped_column(JSONType)
    job_name: Mapped[str | None] = mapped_column(String(63))
    not_before: Mapped[datetime | None] = mapped_column(UTCDateTime)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # When the executor's object (a pod) was created; see migration 0004_ends_outbox.
    launched_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Cached tasks (migration 0006): the digest of the rendered cache key, on attempts
    # that ran; and on a cached attempt, the attempt whose outputs it reused.
    cache_key: Mapped[str | None] = mapped_column(String(64))
    cached_from: Mapped[JSONDict | None] = mapped_column(JSONType)

    __table_args__ = (
        CheckConstraint("attempt >= 1", name="attempt_positive"),
        Index(
            "ix_task_attempts_cache",
            "cache_key",
            "finished_at",
            postgresql_where="cache_key IS NOT NULL AND phase = 'Succeeded'",
            sqlite_where="cache_key IS NOT NULL AND phase = 'Succeeded'",
        ),
    )


class EventRow(Base):
    """An append-only audit record of one change to a run or an attempt."""

    __tablename__ = "events"

    # INTEGER PRIMARY KEY is SQLite's rowid alias; BIGINT identity on PostgreSQL.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"))
    task: Mapped[str | None] = mapped_column(String(63))
    attempt: Mapped[int | None] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    from_phase: Mapped[str | None] = mapped_column(String(16))
    to_phase: Mapped[str | None] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))
    message: Mapped[str | None] = mapped_column(SafeText)
    at: Mapped[datetime] = mapped_column(UTCDateTime)
    # The outbox mark: when the operator handled it (posted its Kubernetes Event). NULL: not yet.
    posted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Who caused it, when known: an approver, whoever cancelled (migration 0005).
    actor: Mapped[str | None] = mapped_column(String(253))

    __table_args__ = (
        Index("ix_events_run_id_id", "run_id", "id"),
        Index(
            "ix_events_unposted",
            "run_id",
            "id",
            postgresql_where="posted_at IS NULL",
            sqlite_where="posted_at IS NULL",
        ),
    )


class BucketRow(Base):
    """One of the fixed buckets the runs are split into, and the replica that holds it.

    ``epoch`` grows on every claim: a write carries the epoch its driver was started
    under, so a replica that lost the bucket (and maybe got it back) cannot write with
    an old one. ``expires_at`` is by the database's clock (migration 0007).
    """

    __tablename__ = "buckets"

    bucket: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    holder: Mapped[str | None] = mapped_column(String(253))
    epoch: Mapped[int] = mapped_column(BigInteger)
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    changed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ReplicaRow(Base):
    """A live operator replica (its heartbeat): the buckets are shared among these."""

    __tablename__ = "replicas"

    name: Mapped[str] = mapped_column(String(253), primary_key=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)
