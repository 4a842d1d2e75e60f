"""Workflows calling workflows: a child run per attempt, its outputs as the task's, linked
to the parent, cancelled with it, bounded in depth. Both backends."""

from __future__ import annotations

import asyncio

from kit import Harness, lines, mark, outputs, sh, spec_of

from maestro.api.models import MAX_CALL_DEPTH
from maestro.api.phases import RunPhase, TaskPhase


def _child(h: Harness, script: str = "") -> None:
    h.children.workflows = {
        "child": spec_of(
            [
                sh(
                    "work",
                    mark(h.counter, "child-{{ params.x }}")
                    + "; "
                    + (script or outputs({"v": "{{ params.x }}"})),
                )
            ],
            params=[{"name": "x"}],
            outputs=[{"name": "result", "value": "{{ tasks.work.outputs.v }}"}],
        )
    }


async def test_a_workflow_task_runs_a_child_and_exposes_its_outputs(h: Harness) -> None:
    _child(h)
    spec = spec_of(
        [
            sh("prep", outputs({"x": "42"})),
            {
                "name": "call",
                "dependsOn": ["prep"],
                "workflow": {"name": "child", "params": {"x": "{{ tasks.prep.outputs.x }}"}},
            },
            sh(
                "after",
                "echo {{ tasks.call.outputs.result }} >> " + str(h.root / "seen"),
                dependsOn=["call"],
            ),
        ]
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED, run.message
    assert lines(h.root / "seen") == ["42"]
    att = (await h.latest(run.id))["call"]
    assert att.outputs == {"result": "42"}
    children = await h.store.children(run.id)
    assert [c.workflow_name for c in children] == ["child"]
    child = children[0]
    assert child.parent_id == run.id
    assert child.phase is RunPhase.SUCCEEDED
    assert att.job_name == child.name  # status shows the child run's name
    assert att.message == f"child run {child.name} succeeded"


async def test_a_failed_child_fails_the_task(h: Harness) -> None:
    _child(h, "echo broken >&2; exit 4")
    spec = spec_of([{"name": "call", "workflow": {"name": "child", "params": {"x": "1"}}}])
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    att = (await h.latest(run.id))["call"]
    assert (att.phase, att.reason) == (TaskPhase.FAILED, "ChildFailed")
    assert att.message is not None
    assert att.message.startswith(f"child run {att.job_name} failed: task 'work' failed")


async def test_cancelling_the_parent_cancels_the_child(h: Harness) -> None:
    go = h.root / "go"
    _child(h, f"while [ ! -e {go} ]; do sleep 0.05; done")
    spec = spec_of([{"name": "call", "workflow": {"name": "child", "params": {"x": "1"}}}])
    run = await h.create(spec)
    drive = h.drive(run.id)
    await h.wait_file(h.counter)
    await h.control(run.id, cancel=True)
    done = await drive
    assert done.phase is RunPhase.CANCELLED
    (child,) = await h.store.children(run.id)
    async with asyncio.timeout(30):
        while not (child := await h.store.get_run(child.id)).phase.finished:
            await asyncio.sleep(0.05)
    assert child.phase is RunPhase.CANCELLED


async def test_a_workflow_calling_itself_stops_at_the_depth_limit(h: Harness) -> None:
    me = spec_of([{"name": "again", "workflow": {"name": "me"}}, sh("mark", mark(h.counter, "m"))])
    h.children.workflows = {"me": me}
    run = await h.run(me)
    assert run.phase is RunPhase.FAILED
    # The root and MAX_CALL_DEPTH nested runs ran; the next start was refused.
    assert len(lines(h.counter)) == MAX_CALL_DEPTH + 1
    runs = [run]
    while children := await h.store.children(runs[-1].id):
        runs.append(children[0])
    assert len(runs) == MAX_CALL_DEPTH + 1
    deepest = (await h.latest(runs[-1].id))["again"]
    assert deepest.reason == "InputError"
    assert f"workflow calls nest deeper than {MAX_CALL_DEPTH} runs" in (deepest.message or "")


async def test_an_unknown_workflow_fails_the_task_naming_the_known_ones(h: Harness) -> None:
    _child(h)
    spec = spec_of([{"name": "call", "workflow": {"name": "nope"}}])
    run = await h.run(spec)
    att = (await h.latest(run.id))["call"]
    assert (att.phase, att.reason) == (TaskPhase.FAILED, "InputError")
    assert att.message == "workflow 'nope' is not among the files given (Workflows: child)"
