"""Immutable snapshots of store rows, as handed to the engine and the operator."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from maestro.api.phases import RunPhase, TaskPhase
from maestro.store.models import AttemptRow, EventRow, RunRow


@dataclass(frozen=True, slots=True)
class RunRecord:
    """One run as stored. ``controls`` holds ``suspend``, ``cancel`` and ``approvals``."""

    id: str
    namespace: str
    name: str
    uid: str | None
    workflow_name: str | None
    spec: dict[str, Any]
    params: dict[str, Any]
    phase: RunPhase
    reason: str | None
    message: str | None
    controls: dict[str, Any]
    generation: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    trace_id: str | None = None
    outputs: dict[str, Any] | None = None  # the workflow's declared outputs, once Succeeded
    parent_id: str | None = None  # the run whose workflow task started this one

    @classmethod
    def of(cls, row: RunRow | Row[Any]) -> RunRecord:
        """Snapshot a row (an ORM object or a Core row of the same columns)."""
        return cls(
            id=row.id,
            namespace=row.namespace,
            name=row.name,
            uid=row.uid,
            workflow_name=row.workflow_name,
            spec=row.spec,
            params=row.params,
            phase=RunPhase(row.phase),
            reason=row.reason,
            message=row.message,
            controls=row.controls,
            generation=row.generation,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            updated_at=row.updated_at,
            trace_id=row.trace_id,
            outputs=row.outputs,
            parent_id=row.parent_id,
        )


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt of one task as stored."""

    run_id: str
    task: str
    attempt: int
    phase: TaskPhase
    reason: str | None
    message: str | None
    outputs: dict[str, Any] | None
    job_name: str | None
    not_before: datetime | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    launched_at: datetime | None = None  # when its pod was created (container tasks)
    cached_from: dict[str, Any] | None = None  # {"runId", "task", "attempt"} when Cached

    @classmethod
    def of(cls, row: AttemptRow | Row[Any]) -> AttemptRecord:
        """Snapshot a row (an ORM object or a Core row of the same columns)."""
        return cls(
            run_id=row.run_id,
            task=row.task,
            attempt=row.attempt,
            phase=TaskPhase(row.phase),
            reason=row.reason,
            message=row.message,
            outputs=row.outputs,
            job_name=row.job_name,
            not_before=row.not_before,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            launched_at=row.launched_at,
            cached_from=row.cached_from,
        )


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One entry of a run's append-only event log.

    ``kind`` is ``RunPhase``, ``TaskPhase``, ``Controls`` or ``Approved``; the phases
    are run or task phases depending on the kind (``from_phase`` is None on creation).
    """

    id: int
    run_id: str
    task: str | None
    attempt: int | None
    kind: str
    from_phase: str | None
    to_phase: str | None
    reason: str | None
    message: str | None
    at: datetime
    actor: str | None = None

    @classmethod
    def of(cls, row: EventRow | Row[Any]) -> EventRecord:
        """Snapshot a row (an ORM object or a Core row of the same columns)."""
        return cls(
            id=row.id,
            run_id=row.run_id,
            task=row.task,
            attempt=row.attempt,
            kind=row.kind,
            from_phase=row.from_phase,
            to_phase=row.to_phase,
            reason=row.reason,
            message=row.message,
            at=row.at,
            actor=row.actor,
        )
