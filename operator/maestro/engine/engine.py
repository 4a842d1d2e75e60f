"""Drive runs from the store: collect executor results, decide, apply with CAS writes.

Every pass starts from what is stored, so the process may die at any instruction:
the next pass (in this process or a new one) sees the same state and goes on.
Starting an attempt is ``create (idempotent) -> CAS Pending->Running -> start``;
only the writer that wins the CAS starts it, and executors' ``start`` is itself
idempotent for the crash between the CAS and the start.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
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
from maestro.store import AttemptRecord, InvalidOutputs, OutputsTooLarge, RunRecord, Store

log = logging.getLogger(__name__)


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


class Engine:
    """Moves runs forward. The store is required; executors are keyed by task kind."""

    def __init__(
        self,
        store: Store,
        executors: Mapping[str, Executor],
        *,
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        """Wire the engine to its store and executors (``container``, ``http``, ``approval``)."""
        self.store = store
        self.executors = executors
        self.clock = clock
        self._plans: dict[str, tuple[WorkflowSpec, Plan]] = {}
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
            cached = (spec, plan(spec))
            self._plans[run.id] = cached
        return cached

    def forget(self, run_id: str) -> None:
        """Drop cached data of a finished or deleted run."""
        self._plans.pop(run_id, None)
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
        self, run: RunRecord, task: Task, att: AttemptRecord, latest: Mapping[str, AttemptRecord]
    ) -> AttemptContext:
        """The context of a started attempt, rendered again: an executor that lost its
        in-memory state (a restart) may need the full task to re-attach or start it."""
        spec, the_plan = self.spec_of(run)
        run_info = _run_info(run)
        if task.name in the_plan.final.deps:
            states = {n: _state(a) for n, a in latest.items()}
            outcome = main_outcome(spec, states, controls_of(run), run.started_at, self.clock())
            if outcome is not None:
                run_info["outcome"] = outcome
        ctx_values, inputs = self._context(run, task, att.task, latest, run_info)
        try:
            rendered = _render_task(task, ctx_values, att.task)
        except templates.TemplateError:
            # It rendered when it started; inputs cannot have changed since.
            rendered = _named(task, att.task)
        return AttemptContext(
            run=run,
            task=rendered,
            attempt=att.attempt,
            handle=att.job_name,
            inputs=inputs,
            controls=controls_of(run),
            started_at=att.started_at,
        )

    async def reconcile(self, run_id: str) -> Pass:
        """One level-triggered pass over a run."""
        run, latest = await self.store.snapshot(run_id)
        if run.phase.finished:
            self.forget(run_id)
            return Pass(run, Decision(), False, latest)
        spec, the_plan = self.spec_of(run)
        tasks = {t.name: t for t in spec.all_tasks()}
        progressed = False

        for name, att in list(latest.items()):
            if att.phase is not TaskPhase.RUNNING:
                continue
            task = tasks[fanout.base(name)]
            ctx = self._running_context(run, task, att, latest)
            executor = self.executors[task.kind]
            if att.job_name is not None and att.launched_at is None:
                # Recorded Running, but its Job was never created (the process stopped in
                # between, or the API refused): create it now, once. Errors other than a
                # rejection leave this pass; the caller retries it.
                progressed |= await self._launch(run_id, executor, ctx)
                continue
            result = await executor.poll(ctx)
            if result is not None:
                progressed |= await self._record_result(run_id, name, att.attempt, result)
        if progressed:
            latest = await self.store.latest_attempts(run_id)

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
        # Off the event loop: `when` expressions run inside, and although their budgets
        # bound them (time, integer size, length), the probes and other runs never wait.
        decision = await asyncio.to_thread(decide, state, self.clock())
        starts = [a for a in decision.actions if isinstance(a, Start)]
        for action in decision.actions:
            if not isinstance(action, Start):
                progressed |= await self._apply(run, tasks, latest, action, decision)
        # Ready tasks are independent of each other: start them together, so the last of
        # a wide fan-out does not wait for every Job before it to be created.
        started = await asyncio.gather(
            *(self._apply(run, tasks, latest, a, decision) for a in starts)
        )
        progressed |= any(started)
        phase = run.phase
        for move in decision.run:
            outputs = decision.outputs if move.phase is RunPhase.SUCCEEDED else None
            if await self.store.set_run_phase(
                run_id,
                move.phase,
                expected=phase,
                message=move.message,
                reason=move.reason,
                outputs=outputs,
            ):
                phase = move.phase
                progressed = True
        if progressed:
            run, latest = await self.store.snapshot(run_id)
        return Pass(run, decision, progressed, latest)

    async def _record_result(self, run_id: str, task: str, attempt: int, result: Result) -> bool:
        try:
            return await self._finish(run_id, task, attempt, result)
        except (OutputsTooLarge, InvalidOutputs) as err:
            return await self._finish(run_id, task, attempt, Result.failed(str(err)))

    async def _finish(self, run_id: str, task: str, attempt: int, result: Result) -> bool:
        return await self.store.transition_attempt(
            run_id,
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

    async def _apply(
        self,
        run: RunRecord,
        tasks: Mapping[str, Task],
        latest: Mapping[str, AttemptRecord],
        action: Start | Settle | Stop | Retry | Expand,
        decision: Decision,
    ) -> bool:
        store = self.store
        if isinstance(action, Expand):
            return await store.create_attempts(run.id, action.instances) > 0
        if isinstance(action, Retry):
            created = await store.create_attempt(
                run.id, action.task, action.attempt, not_before=action.not_before
            )
            return created is not None
        if isinstance(action, Settle):
            return await self._settle(run.id, action)
        task = tasks[fanout.base(action.task)]
        executor = self.executors[task.kind]
        if isinstance(action, Stop):
            await executor.stop(self._running_context(run, task, latest[action.task], latest))
            return await store.transition_attempt(
                run.id,
                action.task,
                action.attempt,
                action.phase,
                expected=TaskPhase.RUNNING,
                reason=action.reason,
                message=action.message,
            )
        return await self._start(run, task, latest, action, executor, decision)

    async def _settle(self, run_id: str, action: Settle) -> bool:
        """Move a not-started attempt (created first when needed) to its final phase."""
        if action.create:
            await self.store.create_attempt(run_id, action.task, action.attempt)
        return await self.store.transition_attempt(
            run_id,
            action.task,
            action.attempt,
            action.phase,
            expected=TaskPhase.PENDING,
            reason=action.reason,
            message=action.message,
        )

    async def _start(
        self,
        run: RunRecord,
        task: Task,
        latest: Mapping[str, AttemptRecord],
        action: Start,
        executor: Executor,
        decision: Decision,
    ) -> bool:
        store = self.store
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
            failed = Settle(
                name,
                action.attempt,
                action.create,
                TaskPhase.FAILED,
                Reason.INPUT_ERROR,
                f"task {name!r} cannot start: {err}",
            )
            return await self._settle(run.id, failed)
        if cache_key is not None and task.cache is not None and not run.controls.get("noCache"):
            since = self.clock() - timedelta(seconds=duration_seconds(task.cache.max_age))
            hit = await store.find_cached(run.namespace, cache_key, since=since)
            if hit is not None:
                source = await store.get_run(hit.run_id)
                message = (
                    f"cached: outputs of run {source.name} ({hit.run_id}), "
                    f"task {hit.task} attempt {hit.attempt}"
                )
                return await store.reuse_cached(
                    run.id, name, action.attempt, create=action.create, source=hit, message=message
                )
        ctx = AttemptContext(
            run=run,
            task=rendered,
            attempt=action.attempt,
            handle=None,
            inputs=inputs,
            controls=controls_of(run),
        )
        handle = executor.handle(ctx)
        won = await store.start_attempt(
            run.id,
            name,
            action.attempt,
            create=action.create,
            reason=Reason.STARTED,
            message=_start_message(rendered),
            job_name=handle,
            cache_key=cache_key,
        )
        if not won:
            return False  # another writer started it (or it moved on): never start twice
        try:
            await self._launch(run.id, executor, replace(ctx, handle=handle))
        except Exception as err:  # any trouble: retried
            # The attempt stays Running and unlaunched; the next pass creates it again
            # (start is idempotent) and its caller backs off while the trouble lasts.
            log.warning(
                "starting %s/%s attempt %d failed, retried: %s",
                run.name, name, action.attempt, err,
                extra={"task": name, "attempt": action.attempt},
            )  # fmt: skip
        return True

    async def _launch(self, run_id: str, executor: Executor, ctx: AttemptContext) -> bool:
        """Start an attempt's executor and record that its object exists.

        True when the attempt was failed instead (the start was refused for good).
        """
        try:
            await executor.start(ctx)
        except StartRejected as err:
            result = Result.failed(err.message, err.reason)
            return await self._finish(run_id, ctx.task.name, ctx.attempt, result)
        if ctx.handle is not None:
            await self.store.mark_launched(run_id, ctx.task.name, ctx.attempt)
        return False

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
