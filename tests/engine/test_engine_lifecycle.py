"""Retries with backoff, per-task and per-run timeouts, finally tasks and run.outcome."""

from __future__ import annotations

import asyncio
import itertools

from kit import HANG_GUARD, Harness, lines, mark, outputs, pid_alive, sh, spec_of

from maestro.api.models import RetryPolicy
from maestro.api.phases import RunPhase, TaskPhase


async def test_retries_back_off_exponentially_and_succeed_later(h: Harness) -> None:
    c = h.counter
    # Fails on its first two executions, succeeds on the third.
    script = f'{mark(c, "flaky")}; [ "$(wc -l < {c})" -ge 3 ] || exit 1; ' + outputs({"ok": 1})
    policy = {"limit": 4, "backoffSeconds": 0.2, "factor": 2, "maxBackoffSeconds": 10}
    run = await h.run(spec_of([sh("flaky", script, retries=policy)]))

    assert run.phase is RunPhase.SUCCEEDED
    assert lines(c) == ["flaky"] * 3
    attempts = await h.store.attempts(run.id)
    assert [a.attempt for a in attempts] == [1, 2, 3]
    assert [a.phase for a in attempts] == [TaskPhase.FAILED, TaskPhase.FAILED, TaskPhase.SUCCEEDED]
    assert attempts[2].outputs == {"ok": 1}
    assert attempts[0].not_before is None
    delays = []
    for prev, nxt in itertools.pairwise(attempts):
        assert prev.finished_at is not None
        assert nxt.not_before is not None
        assert nxt.started_at is not None
        delays.append((nxt.not_before - prev.finished_at).total_seconds())
        # The backoff is honoured: no attempt starts before its not_before.
        assert nxt.started_at >= nxt.not_before
    assert abs(delays[0] - 0.2) < 0.01
    assert abs(delays[1] - 0.4) < 0.01


async def test_backoff_is_capped_and_retries_run_out(h: Harness) -> None:
    c = h.counter
    policy = {"limit": 2, "backoffSeconds": 0.1, "factor": 10, "maxBackoffSeconds": 0.3}
    run = await h.run(spec_of([sh("never", f"{mark(c, 'never')}; exit 2", retries=policy)]))
    assert run.phase is RunPhase.FAILED
    assert lines(c) == ["never"] * 3
    attempts = await h.store.attempts(run.id)
    assert [a.phase for a in attempts] == [TaskPhase.FAILED] * 3
    gaps = [
        (n.not_before - p.finished_at).total_seconds()
        for p, n in itertools.pairwise(attempts)
        if n.not_before is not None and p.finished_at is not None
    ]
    assert len(gaps) == 2
    assert abs(gaps[0] - 0.1) < 0.01
    assert abs(gaps[1] - 0.3) < 0.01  # 0.1 * 10 = 1.0, capped at 0.3
    assert RetryPolicy(backoff_seconds=1, factor=3, max_backoff_seconds=5).delay(3) == 5


async def test_a_template_error_is_not_retried(h: Harness) -> None:
    spec = spec_of(
        [
            sh("a", outputs({"x": 1})),
            sh("b", "echo {{ tasks.a.outputs.y }}", dependsOn=["a"], retries={"limit": 3}),
        ]
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    assert [a.attempt for a in await h.store.attempts(run.id) if a.task == "b"] == [1]


async def test_task_timeout_kills_the_process_and_is_recorded(h_sqlite: Harness) -> None:
    h = h_sqlite
    pid_file = h.root / "pid"
    spec = spec_of(
        [
            sh("slow", f"echo $$ > {pid_file}; exec sleep 30", timeoutSeconds=1),
            sh("next", "true", dependsOn=["slow"]),
        ]
    )
    run = await h.run(spec)
    pid = int(pid_file.read_text())
    assert not pid_alive(pid)
    assert run.phase is RunPhase.FAILED
    slow = (await h.latest(run.id))["slow"]
    assert slow.phase is TaskPhase.FAILED
    assert slow.reason == "TimedOut"
    assert "timed out after 1s" in (slow.message or "")
    assert (await h.latest(run.id))["next"].reason == "UpstreamFailed"


async def test_timed_out_attempt_is_retried(h_sqlite: Harness) -> None:
    h = h_sqlite
    c = h.counter
    # The first execution hangs, the second is quick.
    script = f'{mark(c, "x")}; [ "$(wc -l < {c})" -ge 2 ] || exec sleep 30'
    spec = spec_of([sh("x", script, timeoutSeconds=1, retries={"limit": 1, "backoffSeconds": 0})])
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED
    attempts = await h.store.attempts(run.id)
    assert [(a.phase, a.reason) for a in attempts] == [
        (TaskPhase.FAILED, "TimedOut"),
        (TaskPhase.SUCCEEDED, "Succeeded"),
    ]


async def test_run_timeout_cancels_running_and_pending_tasks(h_sqlite: Harness) -> None:
    h = h_sqlite
    pid_file = h.root / "pid"
    spec = spec_of(
        [
            sh("slow", f"echo $$ > {pid_file}; exec sleep 30"),
            sh("after", mark(h.counter, "after"), dependsOn=["slow"]),
        ],
        timeoutSeconds=1,
        **{"finally": [sh("report", f"echo {{{{ run.outcome }}}} > {h.root / 'outcome'}")]},
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    assert run.reason == "RunTimedOut"
    assert "timeoutSeconds=1" in (run.message or "")
    assert not pid_alive(int(pid_file.read_text()))
    latest = await h.latest(run.id)
    assert latest["slow"].phase is TaskPhase.CANCELLED
    assert latest["slow"].reason == "RunTimedOut"
    assert latest["after"].phase is TaskPhase.CANCELLED
    assert latest["after"].reason == "RunTimedOut"
    assert lines(h.counter) == []
    assert (h.root / "outcome").read_text().strip() == "Failed"


def _finally_report(h: Harness) -> dict[str, object]:
    out = h.root / "outcome"
    return sh("report", f'echo "{{{{ run.outcome }}}} $MAESTRO_RUN_OUTCOME" > {out}')


async def test_finally_runs_after_success_and_sees_the_outcome(h: Harness) -> None:
    spec = spec_of([sh("a", "true")], **{"finally": [_finally_report(h)]})
    run = await h.run(spec)
    assert run.phase is RunPhase.SUCCEEDED
    assert (h.root / "outcome").read_text().split() == ["Succeeded", "Succeeded"]


async def test_finally_runs_after_failure(h: Harness) -> None:
    spec = spec_of(
        [sh("a", "exit 1"), sh("b", "true", dependsOn=["a"])],
        **{"finally": [_finally_report(h)]},
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    assert "'a'" in (run.message or "")
    assert (h.root / "outcome").read_text().split() == ["Failed", "Failed"]


async def test_finally_runs_after_cancel(h: Harness) -> None:
    spec = spec_of(
        [sh("a", "exec sleep 30"), sh("b", "true", dependsOn=["a"])],
        **{"finally": [_finally_report(h)]},
    )
    run = await h.create(spec)
    driving = h.drive(run.id)
    await h.wait_for(run.id, "a", "Running")
    await h.control(run.id, cancel=True)
    final = await asyncio.wait_for(driving, HANG_GUARD)
    assert final.phase is RunPhase.CANCELLED
    assert (h.root / "outcome").read_text().split() == ["Cancelled", "Cancelled"]


async def test_failed_finally_fails_a_succeeded_run(h: Harness) -> None:
    spec = spec_of(
        [sh("a", "true")],
        **{"finally": [sh("cleanup", "exit 4"), sh("after-cleanup", "true")]},
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    assert run.reason == "FinallyFailed"
    assert "'cleanup'" in (run.message or "")
    # finally tasks never fail fast: the other one still ran.
    assert (await h.latest(run.id))["after-cleanup"].phase is TaskPhase.SUCCEEDED


async def test_finally_when_can_read_the_outcome(h: Harness) -> None:
    c = h.counter
    spec = spec_of(
        [sh("a", "exit 1")],
        failFast=False,
        **{
            "finally": [
                sh("on-fail", mark(c, "on-fail"), when="run.outcome == 'Failed'"),
                sh("on-ok", mark(c, "on-ok"), when="run.outcome == 'Succeeded'"),
            ]
        },
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    assert lines(c) == ["on-fail"]


async def test_outcome_does_not_change_while_finally_runs(h_sqlite: Harness) -> None:
    """The run deadline passing during finally does not turn a DAG that succeeded into a
    failed run: finally tasks were told "Succeeded", and the record must agree."""
    h = h_sqlite
    out = h.root / "o"
    spec = spec_of(
        [sh("a", "true")],
        timeoutSeconds=1,
        **{"finally": [sh("slow-report", f'sleep 1.5; echo "{{{{ run.outcome }}}}" > {out}')]},
    )
    run = await h.run(spec)
    assert (h.root / "o").read_text().strip() == "Succeeded"
    assert run.phase is RunPhase.SUCCEEDED


async def test_cancel_while_finally_runs_keeps_the_outcome(h: Harness) -> None:
    go = h.root / "go"
    report = (
        f'while [ ! -e {go} ]; do sleep 0.05; done; echo "{{{{ run.outcome }}}}" > {h.root / "o"}'
    )
    spec = spec_of([sh("a", "true")], **{"finally": [sh("report", report)]})
    run = await h.create(spec)
    driving = h.drive(run.id)
    await h.wait_for(run.id, "report", "Running")
    await h.control(run.id, cancel=True)
    go.touch()
    final = await asyncio.wait_for(driving, HANG_GUARD)
    assert (h.root / "o").read_text().strip() == "Succeeded"
    assert final.phase is RunPhase.SUCCEEDED


async def test_cancel_during_retry_backoff_cancels_the_run(h: Harness) -> None:
    spec = spec_of(
        [sh("flaky", "exit 1", retries={"limit": 3, "backoffSeconds": 30})],
        **{"finally": [_finally_report(h)]},
    )
    run = await h.create(spec)
    driving = h.drive(run.id)
    await h.wait_for(run.id, "flaky", "Pending")  # attempt 2, waiting out its backoff
    await h.control(run.id, cancel=True)
    final = await asyncio.wait_for(driving, HANG_GUARD)
    assert final.phase is RunPhase.CANCELLED
    assert (h.root / "outcome").read_text().split() == ["Cancelled", "Cancelled"]
    attempts = await h.store.attempts(run.id)
    assert [(a.attempt, a.phase) for a in attempts if a.task == "flaky"] == [
        (1, TaskPhase.FAILED),
        (2, TaskPhase.CANCELLED),
    ]
