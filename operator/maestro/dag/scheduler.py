"""Decide a run's next transitions from its current state. Pure and deterministic.

The engine loads the run from the store, calls :func:`decide`, and applies the
actions with compare-and-set writes. Because the decision depends only on the
stored state and the clock, a new process that loads the same state makes the
same decision: that is what makes the engine level-triggered and restartable.

Semantics (documented for users in docs/semantics.md):
- a task starts when every dependency Succeeded or was Skipped by its ``when``;
- a task whose ``when`` is false is Skipped (``WhenFalse``); its dependents still
  run, except those that read its outputs, which are Skipped (``UpstreamSkipped``);
- a task whose dependency failed is Skipped (``UpstreamFailed``), and so on down;
- ``failFast``: after a task fails for good, no new task starts (``FailFast``);
  running tasks finish;
- ``finally`` tasks start when the main DAG has ended, whatever its outcome
  (also after a cancel or a run timeout), and read ``run.outcome``;
- a failed ``finally`` task turns a Succeeded run into a Failed one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from maestro.api.models import Task, WorkflowSpec
from maestro.api.phases import RunPhase, TaskPhase
from maestro.dag import expressions
from maestro.dag.graph import Graph
from maestro.dag.templates import Context
from maestro.dag.validate import Plan


class Reason:
    """Short CamelCase reasons recorded with transitions (users filter on them)."""

    WHEN_FALSE = "WhenFalse"
    UPSTREAM_FAILED = "UpstreamFailed"
    UPSTREAM_SKIPPED = "UpstreamSkipped"
    FAIL_FAST = "FailFast"
    RUN_CANCELLED = "RunCancelled"
    RUN_TIMED_OUT = "RunTimedOut"
    TIMED_OUT = "TimedOut"
    INVALID_EXPRESSION = "InvalidExpression"
    INPUT_ERROR = "InputError"
    INTERRUPTED = "Interrupted"
    ERROR = "Error"
    FINALLY_FAILED = "FinallyFailed"
    TASK_FAILED = "TaskFailed"
    SUSPENDED = "Suspended"
    STARTED = "Started"
    COMPLETED = "Completed"


# Skips that mean "this branch cannot succeed": dependents are skipped in turn.
_PROPAGATING = frozenset(
    {Reason.UPSTREAM_FAILED, Reason.FAIL_FAST, Reason.RUN_CANCELLED, Reason.RUN_TIMED_OUT}
)
# Failures a retry cannot fix: the same inputs fail the same way.
_NOT_RETRIED = frozenset({Reason.INPUT_ERROR, Reason.INVALID_EXPRESSION})


@dataclass(frozen=True)
class TaskState:
    """The latest attempt of one task."""

    attempt: int
    phase: TaskPhase
    reason: str | None = None
    message: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    not_before: datetime | None = None
    outputs: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Controls:
    """What a person asked of the run: from the WorkflowRun spec or the CLI."""

    suspend: bool = False
    cancel: bool = False
    approvals: frozenset[str] = frozenset()
    # Who asked for the cancel (the CLI's user, or the spec edit's field manager).
    cancelled_by: str | None = None


@dataclass(frozen=True)
class RunState:
    """Everything :func:`decide` reads."""

    spec: WorkflowSpec
    plan: Plan
    phase: RunPhase
    started_at: datetime | None
    controls: Controls
    tasks: Mapping[str, TaskState]
    params: Mapping[str, str]
    run_info: Mapping[str, str]


@dataclass(frozen=True)
class Start:
    """Start attempt ``attempt`` of ``task`` (creating its record first when ``create``)."""

    task: str
    attempt: int
    create: bool


@dataclass(frozen=True)
class Settle:
    """Move a not-yet-started attempt straight to a final phase."""

    task: str
    attempt: int
    create: bool
    phase: TaskPhase
    reason: str
    message: str


@dataclass(frozen=True)
class Stop:
    """Stop a running attempt (its executor must stop it) and record ``phase``."""

    task: str
    attempt: int
    phase: TaskPhase
    reason: str
    message: str


@dataclass(frozen=True)
class Retry:
    """Create the next attempt of a failed task, to start no earlier than ``not_before``."""

    task: str
    attempt: int
    not_before: datetime


@dataclass(frozen=True)
class RunTransition:
    """Move the run to ``phase``."""

    phase: RunPhase
    reason: str
    message: str


Action = Start | Settle | Stop | Retry


@dataclass
class Decision:
    """What to do now, and when to look again if nothing else happens."""

    actions: list[Action] = field(default_factory=list)
    run: list[RunTransition] = field(default_factory=list)
    wake_at: datetime | None = None
    message: str = ""
    outcome: str | None = None  # what the main DAG ended as, once it has


def retry_left(task: Task, state: TaskState) -> bool:
    """Whether a Failed attempt may be followed by another."""
    if state.phase is not TaskPhase.FAILED or state.reason in _NOT_RETRIED:
        return False
    return task.retries is not None and state.attempt <= task.retries.limit


def _needs_slot(task: Task) -> bool:
    # Approval gates wait on people, not on compute: they do not count against concurrency.
    return task.kind != "approval"


@dataclass
class _Walk:
    """Mutable bookkeeping of one decision pass."""

    state: RunState
    now: datetime
    view: dict[str, TaskState]
    decision: Decision
    slots_used: int
    wakes: list[datetime] = field(default_factory=list)
    # Suspend holds new starts only while the run goes on: a cancel or a run timeout
    # ends a suspended run (finally tasks included) without waiting for a resume.
    held: bool = False

    def context(self, outcome: str | None) -> Context:
        outputs = {
            n: s.outputs or {} for n, s in self.view.items() if s.phase is TaskPhase.SUCCEEDED
        }
        run = dict(self.state.run_info)
        if outcome is not None:
            run["outcome"] = outcome
        return Context(self.state.params, outputs, run)

    def settle(
        self, task: str, cur: TaskState | None, phase: TaskPhase, reason: str, msg: str
    ) -> None:
        attempt = cur.attempt if cur else 1
        self.decision.actions.append(Settle(task, attempt, cur is None, phase, reason, msg))
        self.view[task] = TaskState(attempt, phase, reason, msg, finished_at=self.now)

    def settle_next(self, task: str, cur: TaskState, stopping: str) -> None:
        """Record the next attempt of a failed task as never started: the run is stopping."""
        why = "the run was cancelled" if stopping == Reason.RUN_CANCELLED else "the run timed out"
        msg = f"retry not started: {why}"
        attempt = cur.attempt + 1
        self.decision.actions.append(
            Settle(task, attempt, True, TaskPhase.CANCELLED, stopping, msg)
        )
        self.view[task] = TaskState(
            attempt, TaskPhase.CANCELLED, stopping, msg, finished_at=self.now
        )


def _first_failure(w: _Walk, tasks: list[Task]) -> str | None:
    for task in tasks:
        cur = w.view.get(task.name)
        if cur is not None and cur.phase is TaskPhase.FAILED and not retry_left(task, cur):
            return task.name
    return None


def _walk(
    w: _Walk,
    tasks: list[Task],
    graph: Graph,
    *,
    stopping: str | None,
    fail_fast: bool,
    outcome: str | None,
) -> None:
    """One pass over a graph in topological order, so skips cascade within the pass."""
    by_name = {t.name: t for t in tasks}
    failed = _first_failure(w, tasks)
    concurrency = w.state.spec.concurrency
    for name in graph.topological_order():
        task = by_name[name]
        cur = w.view.get(name)
        if cur is not None and cur.phase is TaskPhase.RUNNING:
            if stopping is not None:
                msg = (
                    "stopped: the run was cancelled"
                    if stopping == Reason.RUN_CANCELLED
                    else ("stopped: the run exceeded its timeout")
                )
                w.decision.actions.append(
                    Stop(name, cur.attempt, TaskPhase.CANCELLED, stopping, msg)
                )
                # The view records what the Stop records: _outcome reads the stop's
                # reason in this same pass when this was the main DAG's last task.
                w.view[name] = replace(
                    cur,
                    phase=TaskPhase.CANCELLED,
                    reason=stopping,
                    message=msg,
                    finished_at=w.now,
                )
            elif task.timeout_seconds is not None and cur.started_at is not None:
                deadline = cur.started_at + timedelta(seconds=task.timeout_seconds)
                if w.now >= deadline:
                    what = "approval" if task.kind == "approval" else f"attempt {cur.attempt}"
                    msg = f"{what} timed out after {task.timeout_seconds}s"
                    w.decision.actions.append(
                        Stop(name, cur.attempt, TaskPhase.FAILED, Reason.TIMED_OUT, msg)
                    )
                    # The view's message is what the run's own message quotes: the
                    # attempt's start message ("running") would say nothing of the timeout.
                    cur = replace(
                        cur,
                        phase=TaskPhase.FAILED,
                        reason=Reason.TIMED_OUT,
                        message=msg,
                        finished_at=w.now,
                    )
                    w.view[name] = cur
                else:
                    w.wakes.append(deadline)
            if cur.phase is TaskPhase.RUNNING or cur.phase is TaskPhase.CANCELLED:
                continue

        halted = fail_fast and failed is not None
        if cur is not None and cur.phase is TaskPhase.FAILED:
            if retry_left(task, cur) and stopping is None and not halted:
                assert task.retries is not None
                assert cur.finished_at is not None
                not_before = cur.finished_at + timedelta(seconds=task.retries.delay(cur.attempt))
                w.decision.actions.append(Retry(name, cur.attempt + 1, not_before))
                cur = TaskState(cur.attempt + 1, TaskPhase.PENDING, not_before=not_before)
                w.view[name] = cur
            elif retry_left(task, cur) and stopping is not None:
                # The retry a cancel or run timeout cut off is recorded, so the run's
                # outcome can be read from the tasks alone (see _outcome).
                w.settle_next(name, cur, stopping)
                continue
            else:
                failed = failed or name
                continue
        if cur is not None and cur.phase is not TaskPhase.PENDING:
            continue  # Succeeded, Skipped or Cancelled: nothing more to do

        if stopping is not None:
            why = (
                "the run was cancelled"
                if stopping == Reason.RUN_CANCELLED
                else ("the run exceeded its timeout")
            )
            w.settle(name, cur, TaskPhase.CANCELLED, stopping, f"not started: {why}")
            continue

        blocked = False
        broken: str | None = None
        for dep in graph.deps[name]:
            d = w.view.get(dep)
            retrying = d is not None and retry_left(by_name[dep], d) and not halted
            if d is None or retrying or d.phase in (TaskPhase.PENDING, TaskPhase.RUNNING):
                blocked = True
            elif d.phase in (TaskPhase.FAILED, TaskPhase.CANCELLED) or (
                d.phase is TaskPhase.SKIPPED and d.reason in _PROPAGATING
            ):
                broken = broken or dep
        if broken is not None:
            w.settle(
                name,
                cur,
                TaskPhase.SKIPPED,
                Reason.UPSTREAM_FAILED,
                f"not started: upstream task {broken!r} did not succeed",
            )
            continue
        if blocked:
            continue
        if halted:
            w.settle(
                name,
                cur,
                TaskPhase.SKIPPED,
                Reason.FAIL_FAST,
                f"not started: task {failed!r} failed and failFast is on",
            )
            continue
        skipped_reads = sorted(
            t
            for t in w.state.plan.reads.get(name, ())
            if (s := w.view.get(t)) is not None and s.phase is TaskPhase.SKIPPED
        )
        if skipped_reads:
            w.settle(
                name,
                cur,
                TaskPhase.SKIPPED,
                Reason.UPSTREAM_SKIPPED,
                f"not started: reads outputs of skipped task {skipped_reads[0]!r}",
            )
            continue
        if w.held:
            continue
        if cur is not None and cur.not_before is not None and w.now < cur.not_before:
            w.wakes.append(cur.not_before)
            continue
        if task.when is not None:
            phases = {n: s.phase.value for n, s in w.view.items()}
            try:
                go = expressions.evaluate(task.when, w.context(outcome), phases)
            except expressions.ExpressionError as err:
                w.settle(name, cur, TaskPhase.FAILED, Reason.INVALID_EXPRESSION, f"when: {err}")
                failed = failed or name
                continue
            if not go:
                w.settle(
                    name, cur, TaskPhase.SKIPPED, Reason.WHEN_FALSE, f"when is false: {task.when}"
                )
                continue
        if _needs_slot(task):
            if concurrency is not None and w.slots_used >= concurrency:
                continue
            w.slots_used += 1
        attempt = cur.attempt if cur else 1
        w.decision.actions.append(Start(name, attempt, cur is None))
        w.view[name] = TaskState(attempt, TaskPhase.RUNNING, started_at=w.now)


def _done(w: _Walk, tasks: list[Task]) -> bool:
    for task in tasks:
        cur = w.view.get(task.name)
        if cur is None or not cur.phase.finished:
            return False
    return True


def _failure_message(view: Mapping[str, TaskState], name: str) -> str:
    cur = view[name]
    return f"task {name!r} failed: {cur.message}" if cur.message else f"task {name!r} failed"


def _outcome(spec: WorkflowSpec, view: Mapping[str, TaskState]) -> tuple[RunPhase, str, str]:
    """How the main DAG ended: phase, reason and message (once every main task finished).

    It reads only the main tasks' records, never the clock or the controls: finally
    tasks are told ``run.outcome`` when they start, and a run timeout or a cancel that
    comes while they run must not change it. A cancel or run timeout that cut the DAG
    short left its reason on the tasks it stopped or never started.
    """
    latest = [s for t in spec.tasks if (s := view.get(t.name)) is not None]
    if any(s.reason == Reason.RUN_CANCELLED for s in latest):
        return RunPhase.CANCELLED, Reason.RUN_CANCELLED, "cancelled"
    if any(s.reason == Reason.RUN_TIMED_OUT for s in latest):
        return (
            RunPhase.FAILED,
            Reason.RUN_TIMED_OUT,
            f"run exceeded timeoutSeconds={spec.timeout_seconds}",
        )
    for task in spec.tasks:
        cur = view.get(task.name)
        if cur is not None and cur.phase is TaskPhase.FAILED:
            return RunPhase.FAILED, Reason.TASK_FAILED, _failure_message(view, task.name)
    return RunPhase.SUCCEEDED, Reason.COMPLETED, "all tasks completed"


def _timed_out(spec: WorkflowSpec, started_at: datetime | None, now: datetime) -> bool:
    if not spec.timeout_seconds or started_at is None:
        return False
    return now >= started_at + timedelta(seconds=spec.timeout_seconds)


def main_outcome(
    spec: WorkflowSpec,
    tasks: Mapping[str, TaskState],
    controls: Controls,
    started_at: datetime | None,
    now: datetime,
) -> str | None:
    """``run.outcome`` as finally tasks see it; None while the main DAG goes on."""
    timed_out = _timed_out(spec, started_at, now)
    failed_for_good = any(
        (cur := tasks.get(t.name)) is not None
        and cur.phase is TaskPhase.FAILED
        and not retry_left(t, cur)
        for t in spec.tasks
    )
    no_retries = controls.cancel or timed_out or (spec.fail_fast and failed_for_good)
    for task in spec.tasks:
        cur = tasks.get(task.name)
        if cur is None or not cur.phase.finished:
            return None
        if retry_left(task, cur) and not no_retries:
            return None
    return _outcome(spec, tasks)[0].value


def decide(state: RunState, now: datetime) -> Decision:
    """The actions that move ``state`` forward at time ``now``."""
    decision = Decision()
    if state.phase.finished:
        return decision
    spec = state.spec
    slots = sum(
        1
        for t in spec.all_tasks()
        if _needs_slot(t)
        and (s := state.tasks.get(t.name)) is not None
        and s.phase is TaskPhase.RUNNING
    )
    w = _Walk(state, now, dict(state.tasks), decision, slots)

    started = state.started_at or now
    run_deadline = (
        started + timedelta(seconds=spec.timeout_seconds) if spec.timeout_seconds else None
    )
    timed_out = run_deadline is not None and now >= run_deadline
    stopping = (
        Reason.RUN_CANCELLED
        if state.controls.cancel
        else Reason.RUN_TIMED_OUT
        if timed_out
        else None
    )
    w.held = state.controls.suspend and stopping is None
    if state.phase is RunPhase.PENDING:
        decision.run.append(RunTransition(RunPhase.RUNNING, Reason.STARTED, "started"))

    _walk(w, spec.tasks, state.plan.main, stopping=stopping, fail_fast=spec.fail_fast, outcome=None)
    if not _done(w, spec.tasks):
        if run_deadline is not None and not timed_out:
            w.wakes.append(run_deadline)
        _live_status(w, stopping)
        return _finish_decision(w)

    outcome, reason, message = _outcome(spec, w.view)
    if reason == Reason.RUN_CANCELLED and state.controls.cancelled_by:
        message = f"cancelled by {state.controls.cancelled_by}"

    decision.outcome = outcome.value
    _walk(w, spec.finally_, state.plan.final, stopping=None, fail_fast=False, outcome=outcome.value)
    if not _done(w, spec.finally_):
        _live_status(w, None)
        return _finish_decision(w)
    final_failed = _first_failure(w, spec.finally_)
    if outcome is RunPhase.SUCCEEDED and final_failed is not None:
        outcome, reason = RunPhase.FAILED, Reason.FINALLY_FAILED
        message = "finally " + _failure_message(w.view, final_failed)
    if state.phase is RunPhase.SUSPENDED:
        decision.run.append(RunTransition(RunPhase.RUNNING, Reason.STARTED, "resumed"))
    decision.run.append(RunTransition(outcome, reason, message))
    decision.message = message
    return decision


def _live_status(w: _Walk, stopping: str | None) -> None:
    """Suspend/resume transitions and a one-line message while the run goes on."""
    state, decision = w.state, w.decision
    current = decision.run[-1].phase if decision.run else state.phase
    if w.held and current is RunPhase.RUNNING:
        decision.run.append(
            RunTransition(RunPhase.SUSPENDED, Reason.SUSPENDED, "suspended: no new task starts")
        )
    elif not w.held and current is RunPhase.SUSPENDED:
        decision.run.append(RunTransition(RunPhase.RUNNING, Reason.STARTED, "resumed"))
    by_name = {t.name: t for t in state.spec.all_tasks()}
    waiting = sorted(
        n
        for n, s in w.view.items()
        if s.phase is TaskPhase.RUNNING and by_name[n].kind == "approval"
    )
    running = sum(1 for n, s in w.view.items() if s.phase is TaskPhase.RUNNING and n not in waiting)
    parts = []
    if stopping == Reason.RUN_CANCELLED:
        parts.append("cancelling")
    elif stopping == Reason.RUN_TIMED_OUT:
        parts.append("timed out, stopping")
    elif w.held:
        parts.append("suspended")
    if waiting:
        parts.append("waiting for approval of " + ", ".join(waiting))
    if running:
        parts.append(f"{running} running")
    decision.message = "; ".join(parts)


def _finish_decision(w: _Walk) -> Decision:
    if w.wakes:
        w.decision.wake_at = min(w.wakes)
    return w.decision
