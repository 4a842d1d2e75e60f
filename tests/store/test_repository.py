"""The repository API on both backends: records, transitions, events, controls, retention."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest

from maestro.api.phases import RunPhase, TaskPhase
from maestro.store import (
    AttemptNotFound,
    InvalidOutputs,
    OutputsTooLarge,
    RunNotFound,
    RunRecord,
    Store,
)

MakeRun = Callable[..., Awaitable[RunRecord]]


async def test_run_reloads_exactly_as_created(store: Store, make_run: MakeRun) -> None:
    run = await make_run(uid="uid-1", generation=4, controls={"suspend": True})

    assert run.phase is RunPhase.PENDING
    assert run.controls == {"suspend": True, "cancel": False, "approvals": []}
    assert run.spec["tasks"][1] == {"name": "test", "dependsOn": ["build"]}
    assert run.created_at.tzinfo is UTC
    assert await store.get_run(run.id) == run
    assert await store.find_run("team-a", "uid-1") == run
    assert await store.find_run("team-b", "uid-1") is None


async def test_full_lifecycle_reloads_and_logs_every_transition_in_order(
    store: Store, make_run: MakeRun
) -> None:
    run = await make_run()
    assert await store.set_run_phase(run.id, RunPhase.RUNNING, expected=RunPhase.PENDING)
    build = await store.create_attempt(run.id, "build", 1)
    assert build is not None
    assert build.phase is TaskPhase.PENDING
    assert await store.transition_attempt(
        run.id, "build", 1, TaskPhase.RUNNING, job_name="nightly-1-build-1"
    )
    assert await store.transition_attempt(
        run.id, "build", 1, TaskPhase.SUCCEEDED, outputs={"version": "1.2.3"}
    )
    assert await store.create_attempt(run.id, "test", 1) is not None
    assert await store.transition_attempt(
        run.id, "test", 1, TaskPhase.SKIPPED, reason="WhenFalse", message="env == 'dev' is false"
    )
    assert await store.set_run_phase(run.id, RunPhase.SUCCEEDED, message="2/2 tasks done")

    done = await store.get_run(run.id)
    assert done.phase is RunPhase.SUCCEEDED
    assert done.message == "2/2 tasks done"
    assert done.started_at is not None
    assert done.finished_at is not None
    assert done.started_at <= done.finished_at
    assert [r for r in await store.list_runs() if r.id == run.id] == [done]

    attempts = await store.attempts(run.id)
    assert [(a.task, a.attempt, a.phase) for a in attempts] == [
        ("build", 1, TaskPhase.SUCCEEDED),
        ("test", 1, TaskPhase.SKIPPED),
    ]
    built = attempts[0]
    assert built.outputs == {"version": "1.2.3"}
    assert built.job_name == "nightly-1-build-1"
    assert built.started_at is not None
    assert built.finished_at is not None
    assert built.started_at.tzinfo is UTC
    assert attempts[1].reason == "WhenFalse"
    assert attempts[1].started_at is None

    events = await store.events(run.id)
    assert [(e.kind, e.task, e.from_phase, e.to_phase) for e in events] == [
        ("RunPhase", None, None, "Pending"),
        ("RunPhase", None, "Pending", "Running"),
        ("TaskPhase", "build", None, "Pending"),
        ("TaskPhase", "build", "Pending", "Running"),
        ("TaskPhase", "build", "Running", "Succeeded"),
        ("TaskPhase", "test", None, "Pending"),
        ("TaskPhase", "test", "Pending", "Skipped"),
        ("RunPhase", None, "Running", "Succeeded"),
    ]
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert all(e.at.tzinfo is UTC for e in events)
    assert events[6].reason == "WhenFalse"


async def test_illegal_run_transitions_are_refused(store: Store, make_run: MakeRun) -> None:
    run = await make_run()
    # Pending -> Succeeded is not in RUN_TRANSITIONS.
    assert not await store.set_run_phase(run.id, RunPhase.SUCCEEDED)
    # Legal move, but the caller expected another phase: the compare-and-set loses.
    assert not await store.set_run_phase(run.id, RunPhase.SUSPENDED, expected=RunPhase.RUNNING)
    assert await store.set_run_phase(run.id, RunPhase.CANCELLED, message="cancelled by user")
    # Terminal phases are never left.
    for phase in RunPhase:
        assert not await store.set_run_phase(run.id, phase)
    reloaded = await store.get_run(run.id)
    assert reloaded.phase is RunPhase.CANCELLED
    assert reloaded.started_at is None
    assert [e.to_phase for e in await store.events(run.id)] == ["Pending", "Cancelled"]


async def test_run_phase_accepts_a_set_of_expected_phases(store: Store, make_run: MakeRun) -> None:
    run = await make_run()
    assert await store.set_run_phase(run.id, RunPhase.RUNNING)
    first_start = (await store.get_run(run.id)).started_at
    assert await store.set_run_phase(
        run.id, RunPhase.SUSPENDED, expected={RunPhase.PENDING, RunPhase.RUNNING}
    )
    assert await store.set_run_phase(run.id, RunPhase.RUNNING, expected=[RunPhase.SUSPENDED])
    # Resuming keeps the first start time.
    assert (await store.get_run(run.id)).started_at == first_start
    assert (await store.list_runs(unfinished=True))[0].id == run.id


async def test_illegal_task_transitions_are_refused(store: Store, make_run: MakeRun) -> None:
    run = await make_run()
    await store.create_attempt(run.id, "build", 1)
    # Pending -> Succeeded skips Running.
    assert not await store.transition_attempt(run.id, "build", 1, TaskPhase.SUCCEEDED)
    assert not await store.transition_attempt(
        run.id, "build", 1, TaskPhase.CANCELLED, expected=TaskPhase.RUNNING
    )
    assert await store.transition_attempt(run.id, "build", 1, TaskPhase.RUNNING)
    # A replayed start does not start it twice.
    assert not await store.transition_attempt(run.id, "build", 1, TaskPhase.RUNNING)
    assert await store.transition_attempt(run.id, "build", 1, TaskPhase.FAILED, reason="Error")
    # A finished attempt is never resurrected.
    for phase in TaskPhase:
        assert not await store.transition_attempt(run.id, "build", 1, phase)
    attempt = (await store.attempts(run.id))[0]
    assert attempt.phase is TaskPhase.FAILED
    assert attempt.reason == "Error"
    task_events = [e for e in await store.events(run.id) if e.kind == "TaskPhase"]
    assert [e.to_phase for e in task_events] == ["Pending", "Running", "Failed"]


async def test_replayed_create_returns_the_existing_run(store: Store, make_run: MakeRun) -> None:
    first = await make_run(uid="k8s-uid-7")
    again = await make_run(uid="k8s-uid-7", name="other", params={"changed": True})
    assert again == first
    # Same uid in another namespace is another object; no uid never collides.
    other_ns = await make_run(uid="k8s-uid-7", namespace="team-b")
    local_1 = await make_run()
    local_2 = await make_run()
    assert len({first.id, other_ns.id, local_1.id, local_2.id}) == 4
    assert len(await store.list_runs()) == 4
    assert len(await store.list_runs(namespace="team-a")) == 3
    assert len(await store.list_runs(limit=2)) == 2
    assert len(await store.events(first.id)) == 1


async def test_create_attempt_twice_returns_none(store: Store, make_run: MakeRun) -> None:
    run = await make_run()
    later = datetime.now(UTC) + timedelta(seconds=30)
    created = await store.create_attempt(run.id, "build", 2, not_before=later)
    assert created is not None
    assert created.not_before == later
    assert await store.create_attempt(run.id, "build", 2) is None
    assert await store.create_attempt(run.id, "build", 1) is not None
    assert await store.create_attempt(run.id, "test", 1) is not None
    latest = await store.latest_attempts(run.id)
    assert {task: a.attempt for task, a in latest.items()} == {"build": 2, "test": 1}
    assert latest["build"] == created
    with pytest.raises(ValueError, match="start at 1"):
        await store.create_attempt(run.id, "build", 0)


async def test_missing_run_and_attempt(store: Store, make_run: MakeRun) -> None:
    with pytest.raises(RunNotFound, match="nope"):
        await store.get_run("nope")
    with pytest.raises(RunNotFound):
        await store.set_run_phase("nope", RunPhase.RUNNING)
    with pytest.raises(RunNotFound):
        await store.create_attempt("nope", "build", 1)
    run = await make_run()
    with pytest.raises(AttemptNotFound, match="build"):
        await store.transition_attempt(run.id, "build", 1, TaskPhase.RUNNING)


async def test_outputs_over_the_cap_write_nothing(store: Store, make_run: MakeRun) -> None:
    run = await make_run()
    await store.create_attempt(run.id, "build", 1)
    await store.transition_attempt(run.id, "build", 1, TaskPhase.RUNNING)
    before = await store.events(run.id)

    with pytest.raises(OutputsTooLarge, match=r"'build'.*2011 bytes.*1024") as caught:
        await store.transition_attempt(
            run.id, "build", 1, TaskPhase.SUCCEEDED, outputs={"blob": "x" * 2000}
        )
    assert (caught.value.task, caught.value.size, caught.value.cap) == ("build", 2011, 1024)
    assert (await store.attempts(run.id))[0].phase is TaskPhase.RUNNING
    assert (await store.attempts(run.id))[0].outputs is None
    assert await store.events(run.id) == before

    with pytest.raises(InvalidOutputs):
        await store.transition_attempt(
            run.id, "build", 1, TaskPhase.SUCCEEDED, outputs={"when": datetime.now(UTC)}
        )
    # Exactly at the cap is fine: {"blob":"..."} is 11 bytes of framing.
    assert await store.transition_attempt(
        run.id, "build", 1, TaskPhase.SUCCEEDED, outputs={"blob": "x" * 1013}
    )


async def test_controls_merge_and_approvals_are_idempotent(store: Store, make_run: MakeRun) -> None:
    run = await make_run()
    updated = await store.update_controls(run.id, suspend=True, generation=2)
    assert updated.controls == {"suspend": True, "cancel": False, "approvals": []}
    assert updated.generation == 2
    # Replaying the same change writes nothing.
    assert await store.update_controls(run.id, suspend=True) == updated

    assert await store.approve(run.id, "deploy-gate", actor="alice")
    assert not await store.approve(run.id, "deploy-gate", actor="bob")
    assert await store.approve(run.id, "second-gate", actor="bob")
    reloaded = await store.get_run(run.id)
    assert reloaded.controls["approvals"] == ["deploy-gate", "second-gate"]
    assert reloaded.controls["suspend"] is True

    events = await store.events(run.id)
    assert [(e.kind, e.task) for e in events] == [
        ("RunPhase", None),
        ("Controls", None),
        ("Approved", "deploy-gate"),
        ("Approved", "second-gate"),
    ]
    assert (events[2].actor, events[2].message) == ("alice", None)  # no comment given
    with pytest.raises(TypeError, match="suspnd"):
        await store.update_controls(run.id, suspnd=True)


async def test_prune_removes_only_old_finished_runs(store: Store, make_run: MakeRun) -> None:
    finished = await make_run(name="done")
    await store.create_attempt(finished.id, "build", 1)
    await store.set_run_phase(finished.id, RunPhase.FAILED)
    running = await make_run(name="running")
    await store.set_run_phase(running.id, RunPhase.RUNNING)

    assert await store.prune(older_than=timedelta(days=1)) == 0
    assert await store.prune(older_than=timedelta(0)) == 1

    with pytest.raises(RunNotFound):
        await store.get_run(finished.id)
    assert await store.attempts(finished.id) == []
    assert await store.events(finished.id) == []
    assert [r.id for r in await store.list_runs()] == [running.id]
    assert [r.id for r in await store.list_runs(unfinished=True)] == [running.id]
