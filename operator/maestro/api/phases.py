"""Phases of runs and task attempts, and the transitions each may make.

The transition tables live here (pure data) so the store can enforce them with a
compare-and-set and the engine can reason about them without I/O.
"""

from __future__ import annotations

from enum import StrEnum


class RunPhase(StrEnum):
    """Lifecycle of one WorkflowRun."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    CANCELLED = "Cancelled"

    @property
    def finished(self) -> bool:
        """True for phases a run never leaves."""
        return self in _RUN_TERMINAL


class TaskPhase(StrEnum):
    """Lifecycle of one task attempt (a retry is a new attempt)."""

    PENDING = "Pending"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SKIPPED = "Skipped"
    CANCELLED = "Cancelled"

    @property
    def finished(self) -> bool:
        """True for phases an attempt never leaves."""
        return self in _TASK_TERMINAL


_RUN_TERMINAL = frozenset({RunPhase.SUCCEEDED, RunPhase.FAILED, RunPhase.CANCELLED})
_TASK_TERMINAL = frozenset(
    {TaskPhase.SUCCEEDED, TaskPhase.FAILED, TaskPhase.SKIPPED, TaskPhase.CANCELLED}
)

RUN_TRANSITIONS: dict[RunPhase, frozenset[RunPhase]] = {
    RunPhase.PENDING: frozenset(
        {RunPhase.RUNNING, RunPhase.SUSPENDED, RunPhase.FAILED, RunPhase.CANCELLED}
    ),
    RunPhase.RUNNING: frozenset(
        {RunPhase.SUSPENDED, RunPhase.SUCCEEDED, RunPhase.FAILED, RunPhase.CANCELLED}
    ),
    RunPhase.SUSPENDED: frozenset({RunPhase.RUNNING, RunPhase.FAILED, RunPhase.CANCELLED}),
    RunPhase.SUCCEEDED: frozenset(),
    RunPhase.FAILED: frozenset(),
    RunPhase.CANCELLED: frozenset(),
}

TASK_TRANSITIONS: dict[TaskPhase, frozenset[TaskPhase]] = {
    # Pending -> Failed: the task could not start (its inputs did not render).
    TaskPhase.PENDING: frozenset(
        {TaskPhase.RUNNING, TaskPhase.SKIPPED, TaskPhase.CANCELLED, TaskPhase.FAILED}
    ),
    TaskPhase.RUNNING: frozenset({TaskPhase.SUCCEEDED, TaskPhase.FAILED, TaskPhase.CANCELLED}),
    TaskPhase.SUCCEEDED: frozenset(),
    TaskPhase.FAILED: frozenset(),
    TaskPhase.SKIPPED: frozenset(),
    TaskPhase.CANCELLED: frozenset(),
}


def can_move_run(src: RunPhase, dst: RunPhase) -> bool:
    """Whether a run may go from ``src`` to ``dst``."""
    return dst in RUN_TRANSITIONS[src]


def can_move_task(src: TaskPhase, dst: TaskPhase) -> bool:
    """Whether a task attempt may go from ``src`` to ``dst``."""
    return dst in TASK_TRANSITIONS[src]
