"""Dispatch: parallelism, the concurrency bound, failFast, ``when`` and its skip rules."""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path

from kit import HANG_GUARD, Harness, lines, mark, outputs, sh, spec_of

from maestro.api.phases import RunPhase, TaskPhase


def _barrier_task(name: str, log: Path, count: int) -> dict[str, object]:
    """A task that logs its start, waits until ``count`` tasks have started (or 5 s), logs
    its end. With the barrier, overlapping starts are certain, not a matter of timing."""
    script = (
        f"echo + >> {log}; i=0; "
        f'while [ "$(grep -c + {log})" -lt {count} ] && [ $i -lt 100 ]; '
        "do sleep 0.05; i=$((i+1)); done; "
        f"echo - >> {log}"
    )
    return sh(name, script)


def _max_overlap_from_log(log: Path) -> int:
    running = peak = 0
    for line in lines(log):
        running += 1 if line == "+" else -1
        peak = max(peak, running)
    return peak


def _max_overlap(intervals: list[tuple[datetime, datetime]]) -> int:
    # Ends sort before starts at the same instant: a slot freed and taken in one pass.
    points = sorted([(s, 1) for s, _ in intervals] + [(e, -1) for _, e in intervals])
    running = peak = 0
    for _, delta in points:
        running += delta
        peak = max(peak, running)
    return peak


async def test_every_ready_task_starts_at_once(h: Harness) -> None:
    log = h.root / "log"
    spec = spec_of([_barrier_task(f"t{i}", log, 6) for i in range(6)])
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED
    # All six passed a barrier that needs six starts: they ran at the same time.
    assert _max_overlap_from_log(log) == 6


async def test_concurrency_bounds_running_tasks(h: Harness) -> None:
    log = h.root / "log"
    tasks = [_barrier_task(f"t{i}", log, 2) for i in range(5)]
    # An approval gate approved ahead of time does not take a slot.
    tasks.append({"name": "gate", "approval": {}})
    run = await h.create(spec_of(tasks, concurrency=2), controls={"approvals": ["gate"]})
    final = await asyncio.wait_for(h.drive(run.id), HANG_GUARD)
    assert final.phase is RunPhase.SUCCEEDED
    assert _max_overlap_from_log(log) == 2
    attempts = [a for a in await h.store.attempts(run.id) if a.task != "gate"]
    assert len(attempts) == 5
    spans = [(a.started_at, a.finished_at) for a in attempts]
    assert all(s is not None and e is not None for s, e in spans)
    assert _max_overlap([(s, e) for s, e in spans if s and e]) <= 2


async def test_fail_fast_stops_new_starts_and_lets_running_finish(h: Harness) -> None:
    go = h.root / "go"
    c = h.counter
    spec = spec_of(
        [
            sh("bad", "echo broken; exit 3"),
            # Still running when "bad" fails: it must be allowed to finish.
            sh("slow", f"while [ ! -e {go} ]; do sleep 0.05; done; {mark(c, 'slow')}"),
            sh("after-slow", mark(c, "after-slow"), dependsOn=["slow"]),
            sh("after-bad", mark(c, "after-bad"), dependsOn=["bad"]),
        ],
        failFast=True,
    )
    run = await h.create(spec)
    driving = h.drive(run.id)
    await h.wait_for(run.id, "bad", "Failed")
    go.touch()
    final = await asyncio.wait_for(driving, HANG_GUARD)

    assert final.phase is RunPhase.FAILED
    assert final.message is not None
    assert "'bad'" in final.message
    assert "exit code 3" in final.message
    assert lines(c) == ["slow"]
    latest = await h.latest(run.id)
    assert latest["slow"].phase is TaskPhase.SUCCEEDED
    assert latest["after-slow"].phase is TaskPhase.SKIPPED
    assert latest["after-slow"].reason == "FailFast"
    assert "'bad'" in (latest["after-slow"].message or "")
    assert latest["after-bad"].phase is TaskPhase.SKIPPED
    assert latest["after-bad"].reason == "UpstreamFailed"


async def test_without_fail_fast_independent_branches_go_on(h: Harness) -> None:
    c = h.counter
    spec = spec_of(
        [
            sh("bad", "exit 1"),
            sh("other", mark(c, "other")),
            sh("other-2", mark(c, "other-2"), dependsOn=["other"]),
            sh("child", mark(c, "child"), dependsOn=["bad", "other"]),
            sh("grandchild", mark(c, "grandchild"), dependsOn=["child"]),
        ],
        failFast=False,
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    assert "'bad'" in (run.message or "")
    assert sorted(lines(c)) == ["other", "other-2"]
    latest = await h.latest(run.id)
    assert latest["child"].phase is TaskPhase.SKIPPED
    assert latest["child"].reason == "UpstreamFailed"
    assert "'bad'" in (latest["child"].message or "")
    assert latest["grandchild"].phase is TaskPhase.SKIPPED
    assert latest["grandchild"].reason == "UpstreamFailed"
    assert latest["other-2"].phase is TaskPhase.SUCCEEDED


async def test_when_false_skips_the_task_not_its_dependents(h: Harness) -> None:
    c = h.counter
    spec = spec_of(
        [
            sh("deploy", mark(c, "deploy") + "; " + outputs({"url": "x"}),
               when="params.env == 'prod'"),
            sh("notify", mark(c, "notify"), dependsOn=["deploy"]),
            sh("smoke", f"{mark(c, 'smoke')} {{{{ tasks.deploy.outputs.url }}}}",
               dependsOn=["deploy"]),
            sh("after-smoke", mark(c, "after-smoke"), dependsOn=["smoke"]),
            sh("always", mark(c, "always"), when="params.env != 'prod'"),
        ],
        params=[{"name": "env", "default": "prod"}],
    )  # fmt: skip
    run = await h.run(spec, {"env": "dev"})
    assert run.phase is RunPhase.SUCCEEDED
    assert sorted(lines(c)) == ["after-smoke", "always", "notify"]
    latest = await h.latest(run.id)
    assert latest["deploy"].phase is TaskPhase.SKIPPED
    assert latest["deploy"].reason == "WhenFalse"
    assert "params.env == 'prod'" in (latest["deploy"].message or "")
    assert latest["smoke"].phase is TaskPhase.SKIPPED
    assert latest["smoke"].reason == "UpstreamSkipped"
    assert "'deploy'" in (latest["smoke"].message or "")
    assert latest["notify"].phase is TaskPhase.SUCCEEDED


async def test_when_reads_upstream_outputs(h: Harness) -> None:
    c = h.counter
    spec = spec_of(
        [
            sh("test", outputs({"failed": 0, "coverage": 71})),
            sh("deploy", mark(c, "deploy"), dependsOn=["test"],
               when="tasks.test.outputs.failed == 0"),
            sh("badge", mark(c, "badge"), dependsOn=["test"],
               when="tasks.test.outputs.coverage >= 80"),
        ]
    )  # fmt: skip
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED
    assert lines(c) == ["deploy"]
    assert (await h.latest(run.id))["badge"].reason == "WhenFalse"


async def test_when_that_cannot_evaluate_fails_the_task(h: Harness) -> None:
    spec = spec_of(
        [
            sh("test", outputs({"failed": 0})),
            sh("deploy", "true", dependsOn=["test"], when="tasks.test.outputs.missing == 0"),
        ]
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    deploy = (await h.latest(run.id))["deploy"]
    assert deploy.phase is TaskPhase.FAILED
    assert deploy.reason == "InvalidExpression"
    assert "missing" in (deploy.message or "")
