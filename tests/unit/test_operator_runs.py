"""The run controller on its own: a fake Kubernetes API, the real engine and store, a
clock the tests move.

The engine runs every task on the no-op executor over a real SQLite store, so what is
checked is the operator layer: which status patches, Events and deletions it sends,
and what it records in the store. Time is the injected clock's: a test that waits an
interval or a TTL advances it instead of sleeping.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import pytest

from maestro.api.phases import RunPhase, TaskPhase
from maestro.engine.driver import Waker
from maestro.engine.executor import AttemptContext, Result
from maestro.executors.noop import NoopExecutor, noop_engine
from maestro.k8s.client import RUNS, NotFound, TransientAPIError
from maestro.operator.metrics import Metrics
from maestro.operator.publishing import StatusWriter, announced, k8s_event
from maestro.operator.runs import Clock, RunController, Settings, event_name
from maestro.operator.starting import WORKFLOW_RETRY_SECONDS
from maestro.operator.supervisor import Stopped
from maestro.operator.tracing import RunTracer
from maestro.store import EventRecord, Store

NS = "team"
# Hang guard only: each run here ends in well under a second when it works.
GUARD = 30.0


class FakeClock(Clock):
    """Time that moves only when told to (or when a fake wait passes)."""

    def __init__(self) -> None:
        self.wall = datetime.now(UTC)
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


@dataclass
class FakeKube:
    """The few calls the run controller makes on ``Kube``, recorded in order."""

    clock: FakeClock
    workflows: dict[str, dict[str, Any]] = field(default_factory=dict)
    patches: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) posted
    event_attempts: int = 0
    failing_posts: set[int] = field(default_factory=set)  # these attempts (1-based) fail
    deleted: list[tuple[str, str, datetime]] = field(default_factory=list)  # with the time
    terminating: set[str] = field(default_factory=set)

    async def patch_status(
        self, resource: str, namespace: str, name: str, status: dict[str, Any]
    ) -> None:
        assert (resource, namespace) == (RUNS, NS)
        self.patches.append(status)

    async def get_workflow(self, namespace: str, name: str) -> dict[str, Any]:
        if name not in self.workflows:
            raise NotFound("workflow", f"{name} not found")
        return self.workflows[name]

    async def emit_event(
        self, involved: dict[str, Any], *, reason: str, message: str, warning: bool, name: str
    ) -> None:
        self.event_attempts += 1
        if self.event_attempts in self.failing_posts:
            raise TransientAPIError("event", "connection refused")
        self.events.append((name, reason))

    async def delete_run(self, namespace: str, name: str) -> None:
        self.deleted.append((namespace, name, self.clock.now()))

    async def namespace_terminating(self, namespace: str) -> bool:
        return namespace in self.terminating


class FakeStopped(Stopped):
    """The supervisor's stop flag, where a timed wait passes on the fake clock at once.

    ``budget`` timed waits may pass; the next one stops the driver (a test that only
    wants a first wait ends there). An untimed wait blocks until stopped, as the real one.
    """

    def __init__(self, clock: FakeClock, budget: int = 1000) -> None:
        super().__init__()
        self.clock, self.budget = clock, budget
        self.waits: list[float] = []

    async def wait(self, seconds: float | None = None) -> bool:
        if seconds is None:
            return await super().wait()
        self.waits.append(seconds)
        if len(self.waits) > self.budget:
            self.set()
        else:
            self.clock.advance(seconds)
        await asyncio.sleep(0)
        return bool(self)


class FailingNoop(NoopExecutor):
    """The no-op executor, but tasks named ``fail*`` fail when polled."""

    async def poll(self, ctx: AttemptContext) -> Result | None:
        if ctx.task.name.startswith("fail"):
            return Result.failed("exit status 1")
        return await super().poll(ctx)


@dataclass
class Rig:
    """A RunController over the fakes, the real engine and a SQLite store."""

    store: Store
    waker: Waker
    clock: FakeClock
    kube: FakeKube
    metrics: Metrics
    runs: RunController

    async def daemon(self, body: dict[str, Any], stopped: FakeStopped | None = None) -> None:
        """Drive ``body`` until the daemon returns."""
        flag = stopped if stopped is not None else FakeStopped(self.clock)
        await asyncio.wait_for(self.runs.daemon(body, flag), GUARD)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = await Store.open(f"sqlite:///{tmp_path / 'maestro.db'}", migrate=True)
    engine, _, waker = noop_engine(store)
    engine.announced = announced  # as the operator wires it
    failing = FailingNoop(waker)
    engine.executors = {**engine.executors, "container": failing}
    clock = FakeClock()
    kube = FakeKube(clock)
    metrics = Metrics(store, api_writes=lambda: 0.0, watching=lambda: True)
    settings = Settings(status_interval=1.0, clock=clock)
    runs = RunController(engine, cast(Any, kube), waker, metrics, settings, RunTracer(None))
    try:
        yield Rig(store, waker, clock, kube, metrics, runs)
    finally:
        await store.close()


def chain(n: int) -> dict[str, Any]:
    """An inline workflow of ``n`` tasks in a row."""
    tasks: list[dict[str, Any]] = []
    for i in range(n):
        task: dict[str, Any] = {"name": f"t{i}", "container": {"image": "busybox"}}
        if i:
            task["dependsOn"] = [f"t{i - 1}"]
        tasks.append(task)
    return {"tasks": tasks}


def body_of(spec: dict[str, Any], *, name: str = "run", uid: str = "uid-1") -> dict[str, Any]:
    """A WorkflowRun as the watch hands it to the controller."""
    return {
        "metadata": {"namespace": NS, "name": name, "uid": uid, "generation": 1},
        "spec": spec,
    }


def patches_counted(rig: Rig) -> float | None:
    """maestro_status_patches_total, as /metrics shows it."""
    return rig.metrics.registry.get_sample_value("maestro_status_patches_total")


# Status patches ------------------------------------------------------------------------


async def test_status_patches_within_an_interval_are_coalesced(rig: Rig) -> None:
    writer = StatusWriter(cast(Any, rig.kube), rig.metrics, NS, "run", 1.0, rig.clock)
    built: list[str] = []

    def status(progress: str, **more: str) -> Any:
        def build() -> dict[str, Any]:
            built.append(progress)
            return {
                "phase": "Succeeded" if progress == "3/3" else "Running",
                "progress": progress,
                **more,
            }

        return build

    await writer.offer(status("0/3"))
    assert [p["progress"] for p in rig.kube.patches] == ["0/3"]  # the first goes at once
    for progress in ("1/3", "2/3"):
        rig.clock.advance(0.25)  # binary fractions: the sums are exact
        await writer.offer(status(progress))
    assert len(rig.kube.patches) == 1  # held back: the interval has not passed
    assert writer.due_in() == 0.5
    await writer.offer(status("2/3", duration="1s"))
    assert writer.pending is not None
    rig.clock.advance(0.5)
    assert writer.due_in() == 0.0
    await writer.flush()
    assert [p["progress"] for p in rig.kube.patches] == ["0/3", "2/3"]  # only the newest
    assert rig.kube.patches[-1]["duration"] == "1s"
    assert built == ["0/3", "2/3"]  # those held back and replaced were never built
    assert writer.due_in() is None
    await writer.offer(status("3/3"), final=True)
    assert rig.kube.patches[-1] == {"phase": "Succeeded", "progress": "3/3"}  # no wait
    rig.clock.advance(1.0)
    await writer.offer(status("3/3", duration="2s"))
    assert len(rig.kube.patches) == 3  # a duration tick alone is no reason to write
    assert writer.due_in() is None
    assert patches_counted(rig) == 3


async def test_a_run_of_many_passes_in_one_interval_patches_its_start_and_its_end(
    rig: Rig,
) -> None:
    body = body_of({"workflowSpec": chain(6)})
    await rig.daemon(body)  # the clock stands still: every pass is in the first interval
    run = await rig.store.find_run(NS, "uid-1")
    assert run is not None
    assert run.phase is RunPhase.SUCCEEDED
    assert len(rig.kube.patches) == 2
    first, final = rig.kube.patches
    assert first["phase"] in ("Pending", "Running")
    assert (final["phase"], final["progress"]) == ("Succeeded", "6/6")
    assert final["runId"] == run.id


# Kubernetes Events ---------------------------------------------------------------------


async def test_each_store_event_is_one_kubernetes_event_also_after_a_failed_post(
    rig: Rig,
) -> None:
    # The task's failure and the run's are one pass's Events: the second post fails,
    # after the first went out, and the pass is retried.
    spec = {"tasks": [{"name": "fail", "container": {"image": "busybox"}}]}
    rig.kube.failing_posts = {3}
    stopped = FakeStopped(rig.clock)
    await rig.daemon(body_of({"workflowSpec": spec}), stopped)
    run = await rig.store.find_run(NS, "uid-1")
    assert run is not None
    assert run.phase is RunPhase.FAILED
    wanted = [
        (event_name(run, e.id), found[0])
        for e in await rig.store.events(run.id)
        if (found := k8s_event(e)) is not None
    ]
    assert [reason for _, reason in wanted] == ["RunStarted", "TaskFailed", "RunFailed"]
    assert rig.kube.events == wanted  # each once, in order, under its deterministic name
    assert max(Counter(name for name, _ in rig.kube.events).values()) == 1
    assert rig.kube.event_attempts == len(wanted) + 1  # the failed one, then each once
    assert stopped.waits[:1] == [0.5]  # the retry backoff, on the fake clock
    assert await rig.store.unposted_events(run.id) == []


def test_the_outbox_filter_is_exactly_the_events_that_become_kubernetes_events() -> None:
    phases = [None, *RunPhase, *TaskPhase]
    for kind in ("RunPhase", "TaskPhase", "Approved", "Controls"):
        for before in phases:
            for after in phases:
                e = EventRecord(1, "r", "t", 1, kind, before, after, None, None, datetime.now(UTC))
                assert announced(kind, before, after) == (k8s_event(e) is not None), e


async def test_only_events_that_become_kubernetes_events_are_marked_after_a_pass(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    marked: list[list[int]] = []
    mark = rig.store.mark_posted

    async def recorded(ids: Any) -> None:
        marked.append(list(ids))
        await mark(ids)

    monkeypatch.setattr(rig.store, "mark_posted", recorded)
    await rig.daemon(body_of({"workflowSpec": chain(3)}))
    run = await rig.store.find_run(NS, "uid-1")
    assert run is not None
    assert run.phase is RunPhase.SUCCEEDED
    events = await rig.store.events(run.id)
    posted = {e.id for e in events if k8s_event(e) is not None}
    assert [reason for _, reason in rig.kube.events] == ["RunStarted", "RunSucceeded"]
    # The run's creation and the task phase changes of the passes (most of the log) were
    # written out of the outbox at once. Marked afterwards: the two Events' ids only, and
    # the outbox is empty.
    created = events[0]
    assert (created.kind, created.to_phase, created.reason) == ("RunPhase", "Pending", "Created")
    assert created.id not in posted
    assert sorted(i for ids in marked for i in ids) == sorted(posted)
    assert await rig.store.unposted_events(run.id) == []


# Starting ------------------------------------------------------------------------------


async def test_a_missing_workflow_leaves_the_run_pending_with_the_reason(rig: Rig) -> None:
    stopped = FakeStopped(rig.clock, budget=0)  # the first wait stops the daemon
    await rig.daemon(body_of({"workflowRef": {"name": "build"}}), stopped)
    assert stopped.waits == [WORKFLOW_RETRY_SECONDS]  # it would look again later
    assert await rig.store.find_run(NS, "uid-1") is None
    [status] = rig.kube.patches
    assert status["phase"] == "Pending"
    assert "WorkflowNotFound" in {c["reason"] for c in status["conditions"]}
    assert status["message"].startswith("spec.workflowRef.name: Workflow 'build' does not exist")
    assert status["observedGeneration"] == 1


async def test_the_run_starts_once_its_workflow_appears(rig: Rig) -> None:
    stopped = FakeStopped(rig.clock)
    body = body_of({"workflowRef": {"name": "build"}})
    daemon = asyncio.create_task(rig.runs.daemon(body, stopped))
    async with asyncio.timeout(GUARD):
        while not rig.kube.patches:
            await asyncio.sleep(0.01)
    rig.kube.workflows["build"] = {"spec": chain(1)}
    await asyncio.wait_for(daemon, GUARD)
    run = await rig.store.find_run(NS, "uid-1")
    assert run is not None
    assert (run.phase, run.workflow_name) == (RunPhase.SUCCEEDED, "build")
    assert rig.kube.patches[-1]["phase"] == "Succeeded"


# Spec edits ----------------------------------------------------------------------------


def cancelled_by(body: dict[str, Any], *managers: tuple[str, str]) -> dict[str, Any]:
    """``body`` with spec.cancel set, and ``managers`` (name, time) owning the field."""
    meta = {
        **body["metadata"],
        "generation": 2,
        "managedFields": [
            {"manager": m, "time": t, "fieldsV1": {"f:spec": {"f:cancel": {}}}} for m, t in managers
        ],
    }
    return {**body, "metadata": meta, "spec": {**body["spec"], "cancel": True}}


async def test_a_cancel_edit_records_who_cancelled_and_wakes_the_run(rig: Rig) -> None:
    body = body_of({"workflowSpec": chain(2)})
    run = await rig.runs.ensure_run(body)
    assert rig.waker.woken([run.id]) == 0
    edited = cancelled_by(
        body, ("kubectl-patch", "2024-01-01T00:00:00Z"), ("alice", "2024-01-02T00:00:00Z")
    )
    await rig.runs.sync_controls(edited)
    stored = await rig.store.get_run(run.id)
    assert stored.controls["cancel"] is True
    assert stored.controls["cancelledBy"] == "alice"  # the newest manager of spec.cancel
    assert rig.waker.woken([run.id]) == 1
    assert rig.kube.patches == []  # the driver writes the status, not the edit


async def test_an_event_of_our_own_status_patch_writes_nothing(rig: Rig) -> None:
    body = body_of({"workflowSpec": chain(2)})
    run = await rig.runs.ensure_run(body)
    await rig.runs.sync_controls(body)  # as the driver does first: the generation is seen
    await rig.waker.wait(run.id, 0)  # the driver took that wake-up
    before = await rig.store.get_run(run.id)
    events = await rig.store.events(run.id)
    await rig.runs.sync_controls({**body, "status": {"phase": "Pending", "progress": "0/2"}})
    after = await rig.store.get_run(run.id)
    assert (after.controls, after.updated_at) == (before.controls, before.updated_at)
    assert await rig.store.events(run.id) == events
    assert rig.kube.patches == []
    assert rig.waker.woken([run.id]) == 0


# TTL -----------------------------------------------------------------------------------


async def test_ttl_after_finished_deletes_the_run_once_the_clock_passes_it(rig: Rig) -> None:
    stopped = FakeStopped(rig.clock)
    await rig.daemon(body_of({"workflowSpec": chain(1), "ttlSecondsAfterFinished": 60}), stopped)
    run = await rig.store.find_run(NS, "uid-1")
    assert run is not None
    assert run.finished_at is not None
    [(namespace, name, at)] = rig.kube.deleted
    assert (namespace, name) == (NS, "run")
    assert at >= run.finished_at + timedelta(seconds=60)  # not a moment before the TTL
    assert stopped.waits[-1] == pytest.approx(60, abs=5)  # waited on the clock, once
    assert await rig.store.get_run(run.id) == run  # the history stays


async def test_a_driver_stopped_during_the_ttl_deletes_nothing(rig: Rig) -> None:
    stopped = FakeStopped(rig.clock, budget=0)  # the TTL wait is the first: it stops
    await rig.daemon(body_of({"workflowSpec": chain(1), "ttlSecondsAfterFinished": 60}), stopped)
    assert len(stopped.waits) == 1
    assert rig.kube.deleted == []


async def test_a_run_waiting_out_its_ttl_or_its_workflow_holds_no_admission_slot(
    rig: Rig,
) -> None:
    one = RunController(
        rig.runs.engine,
        cast(Any, rig.kube),
        rig.waker,
        rig.metrics,
        replace(rig.runs.settings, admissions=1),
        RunTracer(None),
    )
    finished, waiting = Stopped(), Stopped()  # real waits: they last until set
    ttl = asyncio.create_task(
        one.daemon(
            # Cancelled from the start: it ends in its first pass, which holds the slot.
            body_of({"workflowSpec": chain(1), "cancel": True, "ttlSecondsAfterFinished": 3600}),
            finished,
        )
    )
    missing = asyncio.create_task(
        one.daemon(body_of({"workflowRef": {"name": "absent"}}, name="w", uid="uid-w"), waiting)
    )
    try:
        # Both wait (one for its TTL, one for its Workflow); the one slot is free.
        await asyncio.wait_for(
            one.daemon(body_of({"workflowSpec": chain(2)}, name="next", uid="uid-2"), Stopped()),
            GUARD,
        )
        run = await rig.store.find_run(NS, "uid-2")
        assert run is not None
        assert run.phase is RunPhase.SUCCEEDED
        assert not ttl.done()
        assert not missing.done()
    finally:
        finished.set()
        waiting.set()
        await asyncio.wait_for(asyncio.gather(ttl, missing), GUARD)
    assert rig.kube.deleted == []  # stopped during its TTL


# Deletion ------------------------------------------------------------------------------


async def test_deleting_a_running_run_cancels_it_in_the_store(rig: Rig) -> None:
    body = body_of({"workflowSpec": chain(3)})
    run = await rig.runs.ensure_run(body)
    step = await rig.runs.engine.reconcile(run.id)
    assert step.run.phase is RunPhase.RUNNING
    await rig.runs.on_delete(body)
    stored = await rig.store.get_run(run.id)
    assert stored.phase is RunPhase.CANCELLED
    assert stored.message == "the WorkflowRun was deleted"
    assert "uid-1" not in rig.runs.known.ids


async def test_a_run_deleted_with_its_namespace_says_so(rig: Rig) -> None:
    rig.kube.terminating.add(NS)
    body = body_of({"workflowSpec": chain(3)})
    run = await rig.runs.ensure_run(body)
    await rig.runs.engine.reconcile(run.id)
    await rig.runs.on_delete(body)
    stored = await rig.store.get_run(run.id)
    assert stored.phase is RunPhase.CANCELLED
    assert stored.message == f"cancelled: namespace {NS} is being deleted"
