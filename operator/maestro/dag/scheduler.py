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
from maestro.dag import expressions, fanout, templates
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
    NO_ITEMS = "NoItems"
    INSTANCE_FAILED = "InstanceFailed"
    OUTPUT_ERROR = "OutputError"


# Skips that mean "this branch cannot succeed": dependents are skipped in turn.
_PROPAGATING = frozenset(
    {Reason.UPSTREAM_FAILED, Reason.FAIL_FAST, Reason.RUN_CANCELLED, Reason.RUN_TIMED_OUT}
)
# Failures a retry cannot fix: the same inputs fail the same way.
# A fan-out's own failure is its instance's, which retries on its own.
_NOT_RETRIED = frozenset({Reason.INPUT_ERROR, Reason.INVALID_EXPRESSION, Reason.INSTANCE_FAILED})


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
class Expand:
    """Record every instance of a fan-out as a Pending first attempt."""

    task: str
    instances: tuple[str, ...]


@dataclass(frozen=True)
class RunTransition:
    """Move the run to ``phase``."""

    phase: RunPhase
    reason: str
    message: str


Action = Start | Settle | Stop | Retry | Expand


@dataclass
class Decision:
    """What to do now, and when to look again if nothing else happens."""

    actions: list[Action] = field(default_factory=list)
    run: list[RunTransition] = field(default_factory=list)
    wake_at: datetime | None = None
    message: str = ""
    outcome: str | None = None  # what the main DAG ended as, once it has
    outputs: dict[str, Any] | None = None  # the workflow's outputs, when it Succeeded


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
    # Fan-outs whose view entry is the roll-up of their instances (not a record).
    rollups: set[str] = field(default_factory=set)

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
    groups = fanout.instances_of(w.view)
    for task in tasks:
        names: list[str] = [task.name, *groups.get(task.name, ())]
        for name in names:
            cur = w.view.get(name)
            if cur is not None and cur.phase is TaskPhase.FAILED and not retry_left(task, cur):
                return name
    return None


@dataclass
class _Fan:
    """One fan-out's instances in this pass: how many run, against its own concurrency."""

    limit: int | None
    running: int


def _rollup(
    task: Task, members: list[str], view: Mapping[str, TaskState], retrying: bool
) -> TaskState:
    """A fan-out as one task: what its dependents, failFast and the run's outcome read.

    Running until every instance ended (and, while ``retrying``, none will be retried);
    then Failed, Cancelled or Skipped after its first instance that was, else Succeeded
    with each output key as a list in item order.
    """
    states = [view[m] for m in members]
    starts = [s.started_at for s in states if s.started_at is not None]
    started = min(starts) if starts else None
    if any(not s.phase.finished or (retrying and retry_left(task, s)) for s in states):
        return TaskState(1, TaskPhase.RUNNING, started_at=started)
    ends = [s.finished_at for s in states if s.finished_at is not None]
    finished = max(ends) if ends else None
    for phase in (TaskPhase.FAILED, TaskPhase.CANCELLED, TaskPhase.SKIPPED):
        for name, s in zip(members, states, strict=True):
            if s.phase is phase:
                # A failure is the fan-out's own (never retried as a whole); a cancel or
                # a skip keeps its reason, which the run's outcome and dependents read.
                reason = Reason.INSTANCE_FAILED if phase is TaskPhase.FAILED else s.reason
                msg = f"instance {name} {phase.value.lower()}" + (
                    f": {s.message}" if s.message else ""
                )
                return TaskState(1, phase, reason, msg, started, finished)
    outputs = fanout.collect(s.outputs for s in states)
    msg = f"{len(members)} instances succeeded"
    return TaskState(
        1, TaskPhase.SUCCEEDED, Reason.COMPLETED, msg, started, finished, None, outputs
    )


@dataclass
class _GraphPass:
    """One pass over one graph (main or finally) in topological order."""

    w: _Walk
    by_name: dict[str, Task]
    graph: Graph
    stopping: str | None
    fail_fast: bool
    outcome: str | None
    failed: str | None = None

    @property
    def halted(self) -> bool:
        return self.fail_fast and self.failed is not None

    def run(self) -> None:
        self.failed = _first_failure(self.w, list(self.by_name.values()))
        groups = fanout.instances_of(self.w.view)
        for name in self.graph.topological_order():
            task = self.by_name[name]
            if task.for_each is None or name in self.w.view:
                # A fan-out with its own record ended before it expanded (skipped, or
                # its list could not be read): it is settled like any task.
                self.step(task, name, None)
            else:
                self.fan_out(task, groups.get(name))

    def fan_out(self, task: Task, members: list[str] | None) -> None:
        w, name = self.w, task.name
        if members is None:
            if self.stopping is not None:
                w.settle(
                    name, None, TaskPhase.CANCELLED, self.stopping, _not_started(self.stopping)
                )
                return
            if not self.gate(task, name, None) or w.held or not self.when_ok(task, name, None):
                return
            try:
                found = fanout.items(task, w.context(self.outcome))
            except fanout.FanOutError as err:
                w.settle(name, None, TaskPhase.FAILED, Reason.INPUT_ERROR, str(err))
                self.failed = self.failed or name
                return
            if not found:
                w.settle(name, None, TaskPhase.SKIPPED, Reason.NO_ITEMS, "forEach has no items")
                return
            members = [fanout.instance_name(name, i) for i in range(len(found))]
            # Every instance is recorded at once, so its count is in the store from now
            # on: the fan-out's end and its outputs are read from records alone.
            w.decision.actions.append(Expand(name, tuple(members)))
            for m in members:
                w.view[m] = TaskState(1, TaskPhase.PENDING)
        assert task.for_each is not None
        running = sum(1 for m in members if w.view[m].phase is TaskPhase.RUNNING)
        fan = _Fan(task.for_each.concurrency, running)
        for m in members:
            self.step(task, m, fan)
        w.view[name] = _rollup(task, members, w.view, self.stopping is None and not self.halted)
        w.rollups.add(name)

    def step(self, task: Task, name: str, fan: _Fan | None) -> None:
        """Move one task (``fan`` None) or one instance of a fan-out forward."""
        w = self.w
        stopping = self.stopping
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
                return

        if cur is not None and cur.phase is TaskPhase.FAILED:
            if retry_left(task, cur) and stopping is None and not self.halted:
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
                return
            else:
                self.failed = self.failed or name
                return
        if cur is not None and cur.phase is not TaskPhase.PENDING:
            return  # Succeeded, Skipped or Cancelled: nothing more to do

        if stopping is not None:
            w.settle(name, cur, TaskPhase.CANCELLED, stopping, _not_started(stopping))
            return
        if fan is None:
            if not self.gate(task, name, cur):
                return
        elif self.halted:
            # Instances are tasks for failFast: once one failed for good, no new one starts.
            self.skip_fail_fast(name, cur)
            return
        if w.held:
            return
        if cur is not None and cur.not_before is not None and w.now < cur.not_before:
            w.wakes.append(cur.not_before)
            return
        if fan is None and not self.when_ok(task, name, cur):
            return
        if _needs_slot(task):
            concurrency = w.state.spec.concurrency
            if concurrency is not None and w.slots_used >= concurrency:
                return
            if fan is not None and fan.limit is not None and fan.running >= fan.limit:
                return
            w.slots_used += 1
        if fan is not None:
            fan.running += 1
        attempt = cur.attempt if cur else 1
        w.decision.actions.append(Start(name, attempt, cur is None))
        w.view[name] = TaskState(attempt, TaskPhase.RUNNING, started_at=w.now)

    def skip_fail_fast(self, name: str, cur: TaskState | None) -> None:
        self.w.settle(
            name,
            cur,
            TaskPhase.SKIPPED,
            Reason.FAIL_FAST,
            f"not started: task {self.failed!r} failed and failFast is on",
        )

    def gate(self, task: Task, name: str, cur: TaskState | None) -> bool:
        """Whether the dependencies let ``task`` start now; settles it when they never will."""
        w = self.w
        blocked = False
        broken: str | None = None
        for dep in self.graph.deps[name]:
            d = w.view.get(dep)
            retrying = d is not None and retry_left(self.by_name[dep], d) and not self.halted
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
            return False
        if blocked:
            return False
        if self.halted:
            self.skip_fail_fast(name, cur)
            return False
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
            return False
        return True

    def when_ok(self, task: Task, name: str, cur: TaskState | None) -> bool:
        """Whether ``when`` lets the task run; settles it Skipped or Failed when not."""
        if task.when is None:
            return True
        w = self.w
        phases = {n: s.phase.value for n, s in w.view.items()}
        try:
            go = expressions.evaluate(task.when, w.context(self.outcome), phases)
        except expressions.ExpressionError as err:
            w.settle(name, cur, TaskPhase.FAILED, Reason.INVALID_EXPRESSION, f"when: {err}")
            self.failed = self.failed or name
            return False
        if not go:
            w.settle(name, cur, TaskPhase.SKIPPED, Reason.WHEN_FALSE, f"when is false: {task.when}")
        return bool(go)


def _not_started(stopping: str) -> str:
    why = (
        "the run was cancelled"
        if stopping == Reason.RUN_CANCELLED
        else "the run exceeded its timeout"
    )
    return f"not started: {why}"


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
    _GraphPass(w, {t.name: t for t in tasks}, graph, stopping, fail_fast, outcome).run()


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
    by_name = {t.name: t for t in spec.tasks}
    failed_for_good = any(
        (t := by_name.get(fanout.base(n))) is not None
        and cur.phase is TaskPhase.FAILED
        and not retry_left(t, cur)
        for n, cur in tasks.items()
    )
    no_retries = controls.cancel or timed_out or (spec.fail_fast and failed_for_good)
    groups = fanout.instances_of(tasks)
    view = dict(tasks)
    for task in spec.tasks:
        members = groups.get(task.name)
        if task.name not in view and members:
            view[task.name] = _rollup(task, members, view, not no_retries)
        cur = view.get(task.name)
        if cur is None or not cur.phase.finished:
            return None
        if retry_left(task, cur) and not no_retries:
            return None
    return _outcome(spec, view)[0].value


def decide(state: RunState, now: datetime) -> Decision:
    """The actions that move ``state`` forward at time ``now``."""
    decision = Decision()
    if state.phase.finished:
        return decision
    spec = state.spec
    by_name = {t.name: t for t in spec.all_tasks()}
    slots = sum(
        1
        for n, s in state.tasks.items()
        if s.phase is TaskPhase.RUNNING
        and (t := by_name.get(fanout.base(n))) is not None
        and _needs_slot(t)
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
    if outcome is RunPhase.SUCCEEDED and spec.outputs:
        # A declared output that cannot be computed fails the run: its callers (a parent
        # workflow, a script reading status) would otherwise read something missing.
        ctx = w.context(outcome.value)
        try:
            decision.outputs = {o.name: templates.render_value(o.value, ctx) for o in spec.outputs}
        except templates.TemplateError as err:
            outcome, reason, message = RunPhase.FAILED, Reason.OUTPUT_ERROR, f"outputs: {err}"
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
        if s.phase is TaskPhase.RUNNING and by_name[fanout.base(n)].kind == "approval"
    )
    running = sum(
        1
        for n, s in w.view.items()
        if s.phase is TaskPhase.RUNNING and n not in waiting and n not in w.rollups
    )
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
