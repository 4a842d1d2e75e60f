"""Every run ends: refused starts, starts retried until they happen once, render errors.

The executor with a handle (a Job name) is an in-process stand-in for the container
executor: a fake API for one layer, the engine and the store under it are real.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from kit import Harness, sh, spec_of

from maestro.api.phases import RunPhase, TaskPhase
from maestro.engine.executor import AttemptContext, Result, StartRejected
from maestro.k8s.client import TransientAPIError
from maestro.operator.metrics import Metrics
from maestro.operator.runs import RunController, Settings
from maestro.operator.tracing import RunTracer
from maestro.store import Store


@dataclass
class FakeJobs:
    """Creates named objects; ``fail_with`` makes the next creates raise."""

    fail_with: list[Exception] = field(default_factory=list)
    created: list[str] = field(default_factory=list)
    existing: set[str] = field(default_factory=set)
    starts: int = 0

    def handle(self, ctx: AttemptContext) -> str | None:
        return f"{ctx.run.name}-{ctx.task.name}-{ctx.attempt}"

    async def start(self, ctx: AttemptContext) -> None:
        self.starts += 1
        if self.fail_with:
            raise self.fail_with.pop(0)
        assert ctx.handle is not None
        if ctx.handle not in self.existing:
            self.created.append(ctx.handle)
            self.existing.add(ctx.handle)

    async def poll(self, ctx: AttemptContext) -> Result | None:
        assert ctx.handle is not None
        if ctx.handle not in self.existing:
            return Result.failed(f"job {ctx.handle} was deleted", "Deleted")
        return None

    async def stop(self, ctx: AttemptContext) -> None:
        self.existing.discard(ctx.handle or "")


def with_jobs(h: Harness, jobs: FakeJobs) -> None:
    h.engine.executors = {**h.engine.executors, "container": jobs}


@dataclass
class EndingJobs(FakeJobs):
    """FakeJobs whose objects in ``ended`` have succeeded."""

    ended: set[str] = field(default_factory=set)

    async def poll(self, ctx: AttemptContext) -> Result | None:
        if ctx.handle in self.ended:
            return Result.succeeded({})
        return await super().poll(ctx)


async def test_a_pass_asks_to_look_again_only_when_it_can_move_without_news(h: Harness) -> None:
    # Pass.again: the operator's driver passes again at once only then; otherwise it waits
    # for a pod to end (which wakes the run) or the decision's own wake time.
    jobs = EndingJobs()
    with_jobs(h, jobs)
    spec = spec_of([sh("a", "true"), sh("b", "true", dependsOn=["a"], retries={"limit": 1})])
    run = await h.create(spec)
    first = await h.engine.reconcile(run.id)
    assert jobs.created == ["run-a-1"]
    assert first.progressed  # the run moved to Running
    assert first.again
    idle = await h.engine.reconcile(run.id)
    assert not idle.progressed
    assert not idle.again
    jobs.ended.add("run-a-1")
    ended = await h.engine.reconcile(run.id)  # a's result, and b started on it
    assert jobs.created == ["run-a-1", "run-b-1"]
    assert ended.progressed
    assert not ended.again  # its decision already saw the result
    jobs.existing.discard("run-b-1")
    failed = await h.engine.reconcile(run.id)  # b's pod vanished: failed, retried
    assert failed.progressed
    assert failed.again
    b = (await h.latest(run.id))["b"]
    assert (b.attempt, b.phase) == (2, TaskPhase.PENDING)
    backoff = await h.engine.reconcile(run.id)  # the retry waits out its backoff
    assert not backoff.again
    assert backoff.decision.wake_at is not None


async def test_a_refused_start_fails_the_task_with_the_api_message(h: Harness) -> None:
    jobs = FakeJobs(fail_with=[StartRejected("cannot create job run-a-1: spec invalid", "X")])
    with_jobs(h, jobs)
    run = await h.run(spec_of([sh("a", "true", retries={"limit": 0})]))
    assert run.phase is RunPhase.FAILED
    att = (await h.latest(run.id))["a"]
    assert (att.phase, att.reason) == (TaskPhase.FAILED, "X")
    assert att.message == "cannot create job run-a-1: spec invalid"
    assert att.launched_at is None


async def test_a_start_that_failed_is_retried_until_it_happened_once(h: Harness) -> None:
    jobs = FakeJobs(fail_with=[ConnectionError("apiserver down")] * 2)
    with_jobs(h, jobs)
    run = await h.create(spec_of([sh("a", "true")]))
    await h.engine.reconcile(run.id)  # the start fails inside the pass: logged, kept
    att = (await h.latest(run.id))["a"]
    assert (att.phase, att.job_name, att.launched_at) == (TaskPhase.RUNNING, "run-a-1", None)
    with pytest.raises(ConnectionError):
        await h.engine.reconcile(run.id)  # the retry fails too: the caller backs off
    await h.engine.reconcile(run.id)
    att = (await h.latest(run.id))["a"]
    assert att.launched_at is not None
    assert jobs.created == ["run-a-1"]
    for _ in range(3):
        await h.engine.reconcile(run.id)
    assert jobs.starts == 3  # never started again once it was created


async def test_a_vanished_job_is_a_failed_attempt_and_the_retry_is_a_new_one(h: Harness) -> None:
    jobs = FakeJobs()
    with_jobs(h, jobs)
    policy = {"limit": 1, "backoffSeconds": 0}
    run = await h.create(spec_of([sh("a", "true", retries=policy)]))
    await h.engine.reconcile(run.id)
    jobs.existing.clear()  # deleted behind the operator's back
    for _ in range(3):
        await h.engine.reconcile(run.id)
    attempts = await h.store.attempts(run.id)
    assert [(a.attempt, a.phase, a.reason) for a in attempts] == [
        (1, TaskPhase.FAILED, "Deleted"),
        (2, TaskPhase.RUNNING, "Started"),
    ]
    assert jobs.created == ["run-a-1", "run-a-2"]


@pytest.mark.parametrize(
    ("task", "field"),
    [
        ({"name": "t", "container": {"image": "{{ params.v }}", "command": ["true"]}}, "image"),
        ({"name": "t", "http": {"url": "{{ params.v }}"}}, "http.url"),
        ({"name": "t", "http": {"url": "http://[::1{{ params.v }}"}}, "http.url"),
        (
            {
                "name": "t",
                "http": {
                    "url": "http://h/",
                    "headers": [{"name": "A", "value": "{{ params.v }}é"}],
                },
            },
            "http.headers['A']",
        ),
    ],
)
async def test_render_errors_fail_the_task_naming_task_and_field(
    h: Harness, task: dict[str, object], field: str
) -> None:
    spec = spec_of([task], params=[{"name": "v", "default": ""}])
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    att = (await h.latest(run.id))["t"]
    assert att.phase is TaskPhase.FAILED
    assert att.reason == "InputError"
    assert att.message is not None
    assert "task 't' cannot start" in att.message
    assert field in att.message


async def test_the_event_outbox_hands_out_each_event_until_marked(h: Harness) -> None:
    store: Store = h.store
    run = await h.run(spec_of([sh("a", "true")]))
    pending = await store.unposted_events(run.id)
    assert [e.id for e in pending] == [e.id for e in await store.events(run.id)]
    await store.mark_posted([e.id for e in pending[:2]])
    assert [e.id for e in await store.unposted_events(run.id)] == [e.id for e in pending[2:]]
    await store.mark_posted([e.id for e in pending])
    assert await store.unposted_events(run.id) == []


class FakeEventsApi:
    """Stands in for ``Kube.emit_event``: Events by name; ``down`` posts fail as transient."""

    def __init__(self) -> None:
        self.posted: dict[str, str] = {}
        self.calls = 0
        self.fail_after: int | None = None

    async def emit_event(
        self, involved: dict[str, Any], *, reason: str, message: str, warning: bool, name: str
    ) -> None:
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise TransientAPIError("event", "connection refused")
        self.posted.setdefault(name, reason)  # a second create of a name is a 409: no-op


async def test_events_are_posted_once_even_when_a_post_fails_midway(h: Harness) -> None:
    policy = {"limit": 2, "backoffSeconds": 0}
    run = await h.run(spec_of([sh("a", "exit 1", retries=policy)]))
    api = FakeEventsApi()
    metrics = Metrics(h.engine.store, api_writes=lambda: 0.0, watching=lambda: True)
    controller = RunController(
        h.engine, cast(Any, api), h.waker, metrics, Settings(), RunTracer(None)
    )
    body = {"metadata": {"name": "run", "namespace": "test", "uid": "u"}}
    spec = h.engine.spec_of(run)[0]
    latest = await h.latest(run.id)
    api.fail_after = 2  # the API goes away after two Events
    with pytest.raises(TransientAPIError):
        await controller.publisher.post_events(run, body, latest, spec)
    api.fail_after = None
    await controller.publisher.post_events(run, body, latest, spec)
    await controller.publisher.post_events(run, body, latest, spec)  # nothing left: posts nothing
    reasons = sorted(api.posted.values())
    assert reasons == ["RunFailed", "RunStarted", "TaskFailed", "TaskFailed", "TaskFailed"]
    assert api.calls == 6  # 5 Events + the one refused once; none posted before was re-sent
    assert await h.store.unposted_events(run.id) == []


@dataclass
class SeeingJobs(EndingJobs):
    """EndingJobs that keep the task each poll was given, by attempt."""

    polled: dict[str, list[object]] = field(default_factory=dict)

    async def poll(self, ctx: AttemptContext) -> Result | None:
        self.polled.setdefault(ctx.handle or "", []).append(ctx.task)
        return await super().poll(ctx)


async def test_a_running_attempt_is_rendered_once_however_many_passes_poll_it(
    h: Harness,
) -> None:
    # Every pass polls every running attempt; its templates cannot change while it runs,
    # so the held run keeps the rendered task instead of rendering it on each pass.
    jobs = SeeingJobs()
    with_jobs(h, jobs)
    spec = spec_of(
        [
            sh("a", "echo {{ params.word }}"),
            sh("b", "true"),
            sh("c", "true", dependsOn=["b"]),
        ],
        params=[{"name": "word"}],
    )
    run = await h.create(spec, {"word": "hi"})
    await h.engine.reconcile(run.id)
    await h.engine.reconcile(run.id)
    jobs.ended.add("run-b-1")
    await h.engine.reconcile(run.id)  # b's result, c started
    await h.engine.reconcile(run.id)
    polled = jobs.polled["run-a-1"]
    assert len(polled) == 3
    assert all(task is polled[0] for task in polled)
    assert cast(Any, polled[0]).container.command == ["sh", "-c", "echo hi"]
    # A restarted process renders it again, from the store.
    h.engine.forget(run.id)
    await h.engine.reconcile(run.id)
    again = jobs.polled["run-a-1"][-1]
    assert again is not polled[0]
    assert again == polled[0]
