"""Drive runs from the store: collect executor results, decide, apply with CAS writes.

A run's state is loaded from the store when a process starts driving it and then held
in memory, kept current from what its own writes return (one transaction per pass).
Every write is a compare-and-set and commits before anything it implies happens, so
the process may die at any instruction: the next process loads the same state from the
store and goes on; a writer that lost a compare-and-set reloads.
Starting an attempt is ``create (idempotent) -> CAS Pending->Running -> start``;
only the writer that wins the CAS starts it, and executors' ``start`` is itself
idempotent for the crash between the CAS and the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from maestro.api.models import Task, WorkflowSpec, duration_seconds
from maestro.api.parse import describe
from maestro.api.phases import RunPhase, TaskPhase
from maestro.dag import fanout, templates
from maestro.dag.scheduler import (
    Controls,
    Decision,
    Expand,
    Reason,
    Retry,
    RunState,
    Settle,
    Start,
    Stop,
    TaskState,
    decide,
    main_outcome,
)
from maestro.dag.validate import Plan, field_problems, plan, resolve_params, validate
from maestro.engine.executor import AttemptContext, Executor, Result, StartRejected
from maestro.engine.launches import LaunchMarks
from maestro.store import (
    Announced,
    AttemptRecord,
    Batch,
    EventRecord,
    InvalidOutputs,
    OutputsTooLarge,
    RunRecord,
    Starting,
    Store,
)

log = logging.getLogger(__name__)


# A workflow of at most this many tasks and no expression to evaluate (no ``when``, no
# ``forEach``, no workflow outputs) is decided on the event loop: a few microseconds of
# work, where handing it to a thread cost more than the decision (see reconcile).
INLINE_DECIDE_TASKS = 64


def _decided_inline(spec: WorkflowSpec) -> bool:
    tasks = spec.all_tasks()
    return (
        len(tasks) <= INLINE_DECIDE_TASKS
        and not spec.outputs
        and all(t.when is None and t.for_each is None for t in tasks)
    )


def utcnow() -> datetime:
    """The engine's clock."""
    return datetime.now(UTC)


class InvalidRun(ValueError):
    """A run that cannot start: its spec or params are wrong; one problem per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class Pass:
    """What one reconcile pass did."""

    run: RunRecord
    decision: Decision
    progressed: bool
    latest: Mapping[str, AttemptRecord]  # each task's latest attempt after the pass
    # Whether a pass at once may move the run further without news from outside: False
    # when all it did was take in results and start what they let start (its decision
    # already saw the results, and started attempts move only when they end, which wakes
    # the run). The operator's driver looks again at once only then.
    again: bool = False


def controls_of(run: RunRecord) -> Controls:
    """The run's controls as the scheduler reads them."""
    c = run.controls
    return Controls(
        suspend=bool(c.get("suspend", False)),
        cancel=bool(c.get("cancel", False)),
        approvals=frozenset(c.get("approvals", ())),
        cancelled_by=c.get("cancelledBy") or None,
    )


def _state(a: AttemptRecord) -> TaskState:
    return TaskState(
        attempt=a.attempt,
        phase=a.phase,
        reason=a.reason,
        message=a.message,
        started_at=a.started_at,
        finished_at=a.finished_at,
        not_before=a.not_before,
        outputs=a.outputs,
    )


# (task, attempt) -> a started attempt's rendered task and its inputs.
Rendered = dict[tuple[str, int], tuple[Task, Mapping[str, Any]]]


@dataclass
class _Held:
    """One run as this process drives it (like Kopf's per-object memory: recalled on
    first use, forgotten when the run finishes or goes, or its driver stops)."""

    run: RunRecord
    latest: dict[str, AttemptRecord]  # each task's newest attempt
    outbox: list[EventRecord]  # store events whose Kubernetes Events are not posted yet
    # Outbox events written already marked in the store (see Store.batch): only logged,
    # measured and traced from here, never marked again.
    handled: set[int] = field(default_factory=set)
    # The running attempts': they cannot change while one runs, and every pass polls every
    # running attempt (see _running_context).
    rendered: Rendered = field(default_factory=dict)


@dataclass(frozen=True)
class _CacheHit:
    """A Start answered from the cache: the attempt succeeds with ``source``'s outputs."""

    task: str
    attempt: int
    create: bool
    source: AttemptRecord
    message: str


class Engine:
    """Moves runs forward. The store is required; executors are keyed by task kind."""

    def __init__(
        self,
        store: Store,
        executors: Mapping[str, Executor],
        *,
        clock: Callable[[], datetime] = utcnow,
        announced: Announced | None = None,
    ) -> None:
        """Wire the engine to its store and executors (``container``, ``http``, ``approval``).

        ``announced`` says which events of its passes need the store's outbox (the
        operator's: those that become Kubernetes Events); without it, all do.
        """
        self.store = store
        self.executors = executors
        self.clock = clock
        self.announced = announced
        # Run id -> its spec, plan and whether it is decided on the loop (_decided_inline).
        self._plans: dict[str, tuple[WorkflowSpec, Plan, bool]] = {}
        self._held: dict[str, _Held] = {}  # run id -> the run while this process drives it
        self._marks = LaunchMarks(store)
        # Fan-out items by (run id, task): the same inputs always give the same items.
        self._items: dict[tuple[str, str], list[Any]] = {}

    async def create_run(
        self,
        *,
        namespace: str,
        name: str,
        spec: WorkflowSpec,
        params: Mapping[str, str],
        workflow_name: str | None = None,
        uid: str | None = None,
        generation: int = 1,
        controls: Mapping[str, Any] | None = None,
        parent_id: str | None = None,
    ) -> RunRecord:
        """Validate, snapshot the spec and params, and record a Pending run.

        Idempotent on ``(namespace, uid)``. Raises :class:`InvalidRun` naming every
        problem; nothing is stored then.
        """
        problems = [str(p) for p in validate(spec)]
        values, param_problems = resolve_params(spec, params)
        problems += param_problems
        if problems:
            raise InvalidRun(problems)
        return await self.store.create_run(
            namespace=namespace,
            name=name,
            workflow_name=workflow_name,
            spec=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
            params=values,
            uid=uid,
            generation=generation,
            controls=dict(controls or {}),
            parent_id=parent_id,
            announced=self.announced,
        )

    async def seed_from(self, run_id: str, source_id: str) -> list[str]:
        """Copy the succeeded tasks of run ``source_id`` into a new run (``maestro retry``).

        The copies are recorded as Succeeded attempts with the same outputs (reason
        ``Reused``), so only the tasks that did not succeed run again. Idempotent.
        Returns the reused task names.
        """
        run = await self.store.get_run(run_id)
        spec, _ = self.spec_of(run)
        # Finally tasks always run again: cleanup and notify belong to this run.
        names = {t.name for t in spec.tasks}
        source = await self.store.latest_attempts(source_id)
        # A fan-out is reused whole or not at all: its instances are recorded together,
        # so a new run's fan-out either has all of them or expands afresh.
        for task, members in fanout.instances_of(source).items():
            if task in names and all(source[m].phase is TaskPhase.SUCCEEDED for m in members):
                names.update(members)
        reused = []
        for name, att in source.items():
            if name not in names or att.phase is not TaskPhase.SUCCEEDED:
                continue
            await self.store.create_attempt(run_id, name, 1)
            await self.store.transition_attempt(
                run_id, name, 1, TaskPhase.RUNNING, expected=TaskPhase.PENDING, reason="Reused"
            )
            await self.store.transition_attempt(
                run_id,
                name,
                1,
                TaskPhase.SUCCEEDED,
                expected=TaskPhase.RUNNING,
                reason="Reused",
                message=f"reused from run {source_id}",
                outputs=dict(att.outputs or {}),
                job_name=att.job_name,
            )
            reused.append(name)
        return reused

    def spec_of(self, run: RunRecord) -> tuple[WorkflowSpec, Plan]:
        """The run's snapshotted spec and its plan (cached: a snapshot never changes)."""
        cached = self._plans.get(run.id)
        if cached is None:
            spec = WorkflowSpec.model_validate(run.spec)
            cached = self._plans[run.id] = (spec, plan(spec), _decided_inline(spec))
        return cached[0], cached[1]

    def forget(self, run_id: str) -> None:
        """Drop what is held of a run: it finished, was deleted, or its driver stopped."""
        self._plans.pop(run_id, None)
        self._held.pop(run_id, None)
        for key in [k for k in self._items if k[0] == run_id]:
            del self._items[key]

    def _item(
        self, run: RunRecord, task: Task, name: str, latest: Mapping[str, AttemptRecord]
    ) -> Any:
        """The item of instance ``name`` of fan-out ``task`` (NO_ITEM for a plain task)."""
        index = fanout.split(name)[1]
        if index is None:
            return templates.NO_ITEM
        key = (run.id, task.name)
        found = self._items.get(key)
        if found is None:
            ctx = templates.Context(run.params, self._inputs(run, task, latest), _run_info(run))
            found = self._items[key] = fanout.items(task, ctx)
        return found[index]

    def _context(
        self,
        run: RunRecord,
        task: Task,
        name: str,
        latest: Mapping[str, AttemptRecord],
        run_info: dict[str, str],
    ) -> tuple[templates.Context, dict[str, Any]]:
        """What the templates of ``name`` (a task or an instance) read, and its inputs."""
        outputs = self._inputs(run, task, latest)
        item = self._item(run, task, name, latest)
        inputs: dict[str, Any] = {"params": dict(run.params), "tasks": outputs, "run": run_info}
        if item is not templates.NO_ITEM:
            inputs["item"] = item
        return templates.Context(run.params, outputs, run_info, item), inputs

    def _running_context(
        self,
        run: RunRecord,
        task: Task,
        att: AttemptRecord,
        latest: Mapping[str, AttemptRecord],
        memo: Rendered | None = None,
    ) -> AttemptContext:
        """The context of a started attempt, rendered again: an executor that lost its
        in-memory state (a restart) may need the full task to re-attach or start it.
        Rendered once per attempt with a ``memo`` (the held run's)."""
        found = None if memo is None else memo.get((att.task, att.attempt))
        if found is None:
            found = self._rendered_again(run, task, att, latest)
            if memo is not None:
                memo[(att.task, att.attempt)] = found
        rendered, inputs = found
        return AttemptContext(
            run=run,
            task=rendered,
            attempt=att.attempt,
            handle=att.job_name,
            inputs=inputs,
            controls=controls_of(run),
            started_at=att.started_at,
        )

    def _rendered_again(
        self, run: RunRecord, task: Task, att: AttemptRecord, latest: Mapping[str, AttemptRecord]
    ) -> tuple[Task, Mapping[str, Any]]:
        spec, the_plan = self.spec_of(run)
        run_info = _run_info(run)
        if task.name in the_plan.final.deps:
            states = {n: _state(a) for n, a in latest.items()}
            outcome = main_outcome(spec, states, controls_of(run), run.started_at, self.clock())
            if outcome is not None:
                run_info["outcome"] = outcome
        ctx_values, inputs = self._context(run, task, att.task, latest, run_info)
        try:
            return _render_task(task, ctx_values, att.task), inputs
        except templates.TemplateError:
            # It rendered when it started; inputs cannot have changed since.
            return _named(task, att.task), inputs

    async def _recall(self, run_id: str) -> _Held:
        """The run as this process holds it, loaded from the store on first use."""
        held = self._held.get(run_id)
        if held is None:
            run, latest, outbox = await self.store.snapshot(run_id)
            held = self._held[run_id] = _Held(run, dict(latest), outbox)
        return held

    @asynccontextmanager
    async def _writes(self, held: _Held) -> AsyncIterator[Batch]:
        """One transaction; the held copy takes in what it wrote (or is dropped on a lost
        compare-and-set, or on any error, so the next look starts from the store again:
        a pass may have taken in writes before the block, which then rolled back)."""
        try:
            async with self.store.batch(held.run.id, announced=self.announced) as writes:
                yield writes
        except BaseException:
            self._held.pop(held.run.id, None)
            raise
        if writes.lost:
            self._held.pop(held.run.id, None)
            return
        self._take_in(held, writes)
        held.handled |= writes.handled
        held.outbox.extend(writes.events)

    @staticmethod
    def _take_in(held: _Held, writes: Batch) -> None:
        """The rows the batch wrote so far, into the held copy (again and again is fine)."""
        held.run = writes.run or held.run
        Engine._take_attempts(held, writes.attempts.values())

    @staticmethod
    def _take_attempts(held: _Held, attempts: Iterable[AttemptRecord]) -> None:
        for att in attempts:
            if att.task not in held.latest or held.latest[att.task].attempt <= att.attempt:
                held.latest[att.task] = att

    async def pending_events(self, run_id: str) -> list[EventRecord]:
        """The run's store events not yet marked posted, oldest first (the outbox): from
        memory while the run is held, else from the store."""
        held = self._held.get(run_id)
        if held is None:
            return await self.store.unposted_events(run_id)
        return list(held.outbox)

    async def mark_posted(self, run_id: str, event_ids: Collection[int]) -> None:
        """Take events out of the outbox, in the store and in memory."""
        held = self._held.get(run_id)
        if held is None:
            await self.store.mark_posted(event_ids)
            return
        done = set(event_ids)
        await self.store.mark_posted(sorted(done - held.handled))
        held.outbox = [e for e in held.outbox if e.id not in done]
        held.handled -= done

    async def update_controls(self, run_id: str, **changes: Any) -> RunRecord:
        """Change a run's controls (suspend, cancel, approvals; see Store.update_controls).

        Writes the store and lets the next pass load the run again: what a person changes
        reaches the held copy only through here.
        """
        run = await self.store.update_controls(run_id, **changes)
        self._held.pop(run_id, None)
        return run

    async def observe(self, run_id: str) -> None:
        """Let go of the held copy when another process changed the run's controls or phase
        (``maestro approve|cancel --local`` beside a local run): the next pass loads it
        from the store. One read of the run row; the operator, whose controls arrive as
        spec edits through :meth:`update_controls`, does not need it."""
        held = self._held.get(run_id)
        if held is None:
            return
        run = await self.store.get_run(run_id)
        if run.controls != held.run.controls or run.phase is not held.run.phase:
            self._held.pop(run_id, None)

    async def approve(
        self, run_id: str, task: str, *, actor: str, comment: str | None = None
    ) -> bool:
        """Approve a gate (see Store.approve); the next pass loads the run again."""
        approved = await self.store.approve(run_id, task, actor=actor, comment=comment)
        self._held.pop(run_id, None)
        return approved

    async def reconcile(self, run_id: str) -> Pass:
        """One level-triggered pass over a run.

        The run's state is read from the store once and then held: each pass polls the
        running attempts, decides on the held state, writes the results and every
        transition they lead to in one transaction (none when nothing changed) and only
        then creates what it started (a pod exists only for an attempt whose move to
        Running committed), marking those in a second one.
        """
        held = await self._recall(run_id)
        run = held.run
        if run.phase.finished:
            return Pass(run, Decision(), False, dict(held.latest))
        spec, the_plan = self.spec_of(run)
        tasks = {t.name: t for t in spec.all_tasks()}
        progressed = False

        results: list[tuple[str, int, Result]] = []
        unlaunched: list[tuple[Executor, AttemptContext]] = []
        for name, att in list(held.latest.items()):
            if att.phase is not TaskPhase.RUNNING:
                continue
            task = tasks[fanout.base(name)]
            ctx = self._running_context(run, task, att, held.latest, held.rendered)
            executor = self.executors[task.kind]
            if att.job_name is not None and att.launched_at is None:
                # Recorded Running, but its pod was never created (the process stopped in
                # between, or the API refused): create it now, once. Errors other than a
                # rejection leave this pass; the caller retries it.
                unlaunched.append((executor, ctx))
                continue
            result = await executor.poll(ctx)
            if result is not None:
                results.append((name, att.attempt, result))
                held.rendered.pop((name, att.attempt), None)  # it ends in this pass
        again = False  # see Pass.again
        if unlaunched:
            again = await self._launch(held, unlaunched, raise_errors=True)
            progressed |= again
            if run_id not in self._held:
                return await self._lost(run_id)
        launch: list[tuple[Executor, AttemptContext]] = []
        async with contextlib.AsyncExitStack() as stack:
            # The results and what they let start share one transaction (a pass that moves
            # the run costs one commit, not two); it is committed early only when requests
            # or reads must come before the rest (stops, cached tasks).
            writes: Batch | None = None
            if results:
                writes = await stack.enter_async_context(self._writes(held))
                for name, attempt, result in results:
                    progressed |= await self._record_result(writes, name, attempt, result)
                if writes.lost:
                    await stack.aclose()
                    return await self._lost(run_id)
                self._take_in(held, writes)  # the decision below sees the results
            latest = held.latest
            state = RunState(
                spec=spec,
                plan=the_plan,
                phase=run.phase,
                started_at=run.started_at,
                controls=controls_of(run),
                tasks={n: _state(a) for n, a in latest.items()},
                params=run.params,
                run_info=_run_info(run),
            )
            # Off the event loop when it evaluates expressions (`when`, `forEach`, outputs)
            # or walks a large DAG: although budgets bound expressions (time, integer size,
            # length), the probes and other runs never wait for them.
            if (planned := self._plans.get(run_id)) is not None and planned[2]:
                decision = decide(state, self.clock())
            else:
                decision = await asyncio.to_thread(decide, state, self.clock())
            stops = [a for a in decision.actions if isinstance(a, Stop)]
            cached = any(
                tasks[fanout.base(a.task)].cache is not None
                for a in decision.actions
                if isinstance(a, Start)
            )
            if writes is not None and (stops or cached):
                # No row stays locked over a request, and the cache is read on another
                # connection (SQLite's write lock would keep it waiting).
                await stack.aclose()
                writes = None
                if run_id not in self._held:
                    return await self._lost(run_id, decision)
            for stop in stops:
                task = tasks[fanout.base(stop.task)]
                ctx = self._running_context(run, task, latest[stop.task], latest, held.rendered)
                await self.executors[task.kind].stop(ctx)
            starts = [
                await self._prepare(run, tasks[fanout.base(a.task)], latest, a, decision)
                for a in decision.actions
                if isinstance(a, Start)
            ]
            if not decision.actions and not decision.run:
                # Nothing (more) to write: a pod event that changed no task costs no
                # transaction at all.
                await stack.aclose()
                return await self._passed(run_id, held, decision, progressed, again)
            # What the decision moves besides fresh starts can let it move again at once
            # (a retry to start, instances to start, a settled or cached task's dependents).
            again |= bool(decision.run) or any(not isinstance(a, Start) for a in decision.actions)
            again |= any(isinstance(s, Settle | _CacheHit) for s in starts)
            if writes is None:
                writes = await stack.enter_async_context(self._writes(held))
            for action in decision.actions:
                if not isinstance(action, Start):
                    progressed |= await self._apply(writes, action)
            starting: list[tuple[Executor, AttemptContext, Starting]] = []
            for start in starts:
                if isinstance(start, Settle):  # it cannot start (a template failed)
                    progressed |= await self._settle(writes, start)
                    continue
                if isinstance(start, _CacheHit):
                    progressed |= await writes.reuse_cached(
                        start.task,
                        start.attempt,
                        create=start.create,
                        source=start.source,
                        message=start.message,
                    )
                    continue
                executor, ctx, create, cache_key = start
                starting.append(
                    (
                        executor,
                        ctx,
                        Starting(
                            ctx.task.name,
                            ctx.attempt,
                            create,
                            reason=Reason.STARTED,
                            message=_start_message(ctx.task),
                            job_name=ctx.handle,
                            cache_key=cache_key,
                        ),
                    )
                )
            # Ready tasks start together: one statement for the new attempts of the pass.
            won = await writes.start_attempts([s for _, _, s in starting])
            for (executor, ctx, _), started in zip(starting, won, strict=True):
                if started:  # else another writer started it (or it moved on): never twice
                    progressed = True
                    launch.append((executor, ctx))
            phase = run.phase
            for move in decision.run:
                outputs = decision.outputs if move.phase is RunPhase.SUCCEEDED else None
                if await writes.set_run_phase(
                    move.phase,
                    expected=phase,
                    message=move.message,
                    reason=move.reason,
                    outputs=outputs,
                ):
                    phase = move.phase
                    progressed = True
        if launch:
            # Ready tasks are independent of each other: created together, so the last of
            # a wide fan-out does not wait for every pod before it.
            # A failed attempt the decision has not seen, or one to create again.
            again |= await self._launch(self._held.get(run_id) or held, launch, raise_errors=False)
        return await self._passed(run_id, held, decision, progressed, again)

    async def _passed(
        self, run_id: str, held: _Held, decision: Decision, progressed: bool, again: bool
    ) -> Pass:
        """What the pass did, or, when a write of it lost a compare-and-set, the run as
        the store has it now."""
        if run_id not in self._held:
            return await self._lost(run_id, decision)
        return Pass(held.run, decision, progressed, dict(held.latest), again and progressed)

    async def _lost(self, run_id: str, decision: Decision | None = None) -> Pass:
        """Another writer moved the run: start again from the store."""
        held = await self._recall(run_id)
        return Pass(held.run, decision or Decision(), True, dict(held.latest), again=True)

    async def _record_result(self, writes: Batch, task: str, attempt: int, result: Result) -> bool:
        try:
            return await self._finish(writes, task, attempt, result)
        except (OutputsTooLarge, InvalidOutputs) as err:
            # Refused before anything was written: the batch goes on.
            return await self._finish(writes, task, attempt, Result.failed(str(err)))

    @staticmethod
    async def _finish(writes: Batch, task: str, attempt: int, result: Result) -> bool:
        return await writes.transition_attempt(
            task,
            attempt,
            result.phase,
            expected=TaskPhase.RUNNING,
            reason=result.reason,
            message=result.message,
            outputs=result.outputs,
        )

    def _inputs(self, run: RunRecord, task: Task, latest: Mapping[str, AttemptRecord]) -> Any:
        """Outputs of the tasks ``task`` depends on or reads, as its inputs (a fan-out's
        as lists in item order, once all its instances succeeded)."""
        spec, the_plan = self.spec_of(run)
        wanted = set(task.depends_on) | set(the_plan.reads.get(task.name, ()))
        found = {
            n: dict(a.outputs or {})
            for n, a in latest.items()
            if n in wanted and a.phase is TaskPhase.SUCCEEDED
        }
        fans = {t.name for t in spec.all_tasks() if t.for_each is not None} & wanted
        if fans - set(found):
            for name, members in fanout.instances_of(latest).items():
                if name in fans and all(latest[m].phase is TaskPhase.SUCCEEDED for m in members):
                    found[name] = fanout.collect(latest[m].outputs for m in members)
        return found

    async def _apply(self, writes: Batch, action: Settle | Stop | Retry | Expand) -> bool:
        if isinstance(action, Expand):
            return await writes.create_attempts(action.instances) > 0
        if isinstance(action, Retry):
            created = await writes.create_attempt(
                action.task, action.attempt, not_before=action.not_before
            )
            return created is not None
        if isinstance(action, Settle):
            return await self._settle(writes, action)
        return await writes.transition_attempt(  # a Stop: its executor was stopped first
            action.task,
            action.attempt,
            action.phase,
            expected=TaskPhase.RUNNING,
            reason=action.reason,
            message=action.message,
        )

    @staticmethod
    async def _settle(writes: Batch, action: Settle) -> bool:
        """Move a not-started attempt (created first when needed) to its final phase."""
        if action.create:
            await writes.create_attempt(action.task, action.attempt)
        return await writes.transition_attempt(
            action.task,
            action.attempt,
            action.phase,
            expected=TaskPhase.PENDING,
            reason=action.reason,
            message=action.message,
        )

    async def _prepare(
        self,
        run: RunRecord,
        task: Task,
        latest: Mapping[str, AttemptRecord],
        action: Start,
        decision: Decision,
    ) -> tuple[Executor, AttemptContext, bool, str | None] | Settle | _CacheHit:
        """The rendered context of an attempt to start (with its cache key), the cache hit
        that stands in for it, or the Settle that fails it."""
        executor = self.executors[task.kind]
        run_info = _run_info(run)
        if decision.outcome is not None:
            run_info["outcome"] = decision.outcome  # only finally tasks start once it is known
        name = action.task
        try:
            ctx_values, inputs = self._context(run, task, name, latest, run_info)
            rendered = _render_task(task, ctx_values, name)
            cache_key = (
                None
                if task.cache is None
                else cache_digest(run.namespace, templates.render(task.cache.key, ctx_values))
            )
        except (templates.TemplateError, fanout.FanOutError) as err:
            return Settle(
                name,
                action.attempt,
                action.create,
                TaskPhase.FAILED,
                Reason.INPUT_ERROR,
                f"task {name!r} cannot start: {err}",
            )
        if cache_key is not None and task.cache is not None and not run.controls.get("noCache"):
            since = self.clock() - timedelta(seconds=duration_seconds(task.cache.max_age))
            hit = await self.store.find_cached(run.namespace, cache_key, since=since)
            if hit is not None:
                source = await self.store.get_run(hit.run_id)
                message = (
                    f"cached: outputs of run {source.name} ({hit.run_id}), "
                    f"task {hit.task} attempt {hit.attempt}"
                )
                return _CacheHit(name, action.attempt, action.create, hit, message)
        ctx = AttemptContext(
            run=run,
            task=rendered,
            attempt=action.attempt,
            handle=None,
            inputs=inputs,
            controls=controls_of(run),
        )
        return executor, replace(ctx, handle=executor.handle(ctx)), action.create, cache_key

    async def _launch(
        self,
        held: _Held,
        items: list[tuple[Executor, AttemptContext]],
        *,
        raise_errors: bool,
    ) -> bool:
        """Start the attempts' executors together and record which starts were refused
        for good (failed attempts, one transaction) and which objects now exist (marks
        shared with other runs' passes: :class:`LaunchMarks`).

        Any other trouble leaves an attempt Running and unlaunched: the next pass creates
        it again (start is idempotent). With ``raise_errors`` the first such error is
        raised after the rest is recorded, so the caller backs off while it lasts.
        True when an attempt was failed or left unlaunched: the run has to be looked at
        again (see Pass.again).
        """

        async def start(executor: Executor, ctx: AttemptContext) -> Result | None:
            try:
                await executor.start(ctx)
            except StartRejected as err:
                return Result.failed(err.message, err.reason)
            return None

        outcomes = await asyncio.gather(*(start(e, c) for e, c in items), return_exceptions=True)
        trouble: Exception | None = None
        progressed = False
        refused: list[tuple[str, int, Result]] = []
        launched: list[tuple[str, int]] = []
        for (_, ctx), outcome in zip(items, outcomes, strict=True):
            name = ctx.task.name
            if isinstance(outcome, Result):
                refused.append((name, ctx.attempt, outcome))
            elif isinstance(outcome, Exception):
                log.warning(
                    "starting %s/%s attempt %d failed, retried: %s",
                    ctx.run.name, name, ctx.attempt, outcome,
                    extra={"task": name, "attempt": ctx.attempt},
                )  # fmt: skip
                trouble = trouble or outcome
            elif isinstance(outcome, BaseException):
                raise outcome
            elif ctx.handle is not None:
                launched.append((name, ctx.attempt))
        if refused:
            async with self._writes(held) as writes:
                for name, attempt, result in refused:
                    progressed |= await self._finish(writes, name, attempt, result)
        if launched:
            try:
                marked = await self._marks.mark(held.run.id, launched)
            except BaseException:
                self._held.pop(held.run.id, None)  # as for any failed write (see _writes)
                raise
            self._take_attempts(held, marked)
        if trouble is not None and raise_errors:
            raise trouble
        return progressed or trouble is not None

    async def abort(self, run_id: str, message: str) -> RunRecord:
        """Stop every running attempt and cancel the run now, without finally tasks.

        For a WorkflowRun being deleted: its resources are going, so nothing more runs.
        """
        run = await self.store.get_run(run_id)
        if run.phase.finished:
            return run
        spec, _ = self.spec_of(run)
        tasks = {t.name: t for t in spec.all_tasks()}
        latest = await self.store.latest_attempts(run_id)
        for name, att in latest.items():
            task = tasks[fanout.base(name)]
            if att.phase is TaskPhase.RUNNING:
                ctx = self._running_context(run, task, att, latest)
                await self.executors[task.kind].stop(ctx)
            if not att.phase.finished:
                await self.store.transition_attempt(
                    run_id,
                    name,
                    att.attempt,
                    TaskPhase.CANCELLED,
                    reason=Reason.RUN_CANCELLED,
                    message=message,
                )
        await self.store.set_run_phase(
            run_id, RunPhase.CANCELLED, reason=Reason.RUN_CANCELLED, message=message
        )
        self.forget(run_id)
        return await self.store.get_run(run_id)


def cache_digest(namespace: str, key: str) -> str:
    """The stored form of a rendered cache key: scoped to the namespace, fixed length (and
    the key's text, which may hold params, is not kept)."""
    return hashlib.sha256(f"{namespace}\0{key}".encode()).hexdigest()


def _run_info(run: RunRecord) -> dict[str, str]:
    """``run.*`` as templates and expressions read it (``outcome`` is added for finally)."""
    return {"id": run.id, "name": run.name, "namespace": run.namespace}


def _named(task: Task, name: str) -> Task:
    """``task`` as instance ``name`` of its fan-out (itself for a plain task): executors
    name pods, directories and messages after ``task.name``."""
    return task if name == task.name else task.model_copy(update={"name": name})


def _render_task(task: Task, ctx: templates.Context, name: str) -> Task:
    """Task (or instance) ``name`` with its templates expanded; ``TemplateError`` names
    each bad field."""
    executor = getattr(task, task.kind)
    raw = executor.model_dump(by_alias=True, exclude_none=True)
    rendered = templates.render_all(raw, ctx)
    try:
        result = _named(task, name).model_copy(
            update={task.kind: type(executor).model_validate(rendered)}
        )
    except ValidationError as err:
        lines = [f"{task.kind}.{line}" for line in describe(err)]
        raise templates.TemplateError("after templating, " + "; ".join(lines)) from None
    problems = field_problems(result, rendered=True)
    if problems:
        raise templates.TemplateError("after templating, " + "; ".join(problems))
    return result


def _start_message(task: Task) -> str:
    if task.approval is not None:
        # The rendered approval.message is what the approver is asked: status, `maestro
        # get`/`watch` and the local TTY all show the attempt's message.
        asked = task.approval.message
        return f"waiting for approval: {asked}" if asked else "waiting for approval"
    return "running"
