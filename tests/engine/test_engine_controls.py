"""What people ask of a run: suspend and resume, cancel, approval gates."""

from __future__ import annotations

import asyncio

from kit import HANG_GUARD, Harness, lines, mark, pid_alive, sh, spec_of

from maestro.api.phases import RunPhase, TaskPhase


async def _wait_phase(h: Harness, run_id: str, phase: RunPhase) -> None:
    async with asyncio.timeout(HANG_GUARD):
        while (await h.store.get_run(run_id)).phase is not phase:
            await asyncio.sleep(0.05)


async def _passes(h: Harness, run_id: str, n: int) -> None:
    """Let the driver make ``n`` more passes (it passes at least every 0.1 s)."""
    for _ in range(n):
        h.waker(run_id)
        await asyncio.sleep(0.1)


async def test_suspend_holds_new_tasks_and_resume_goes_on(h: Harness) -> None:
    go = h.root / "go"
    c = h.counter
    spec = spec_of(
        [
            sh("first", f"while [ ! -e {go} ]; do sleep 0.05; done; {mark(c, 'first')}"),
            sh("second", mark(c, "second"), dependsOn=["first"]),
        ]
    )
    run = await h.create(spec)
    driving = h.drive(run.id)
    await h.wait_for(run.id, "first", "Running")
    await h.control(run.id, suspend=True)
    await _wait_phase(h, run.id, RunPhase.SUSPENDED)
    go.touch()  # the running task finishes while suspended
    await h.wait_for(run.id, "first", "Succeeded")
    await _passes(h, run.id, 5)
    assert "second" not in await h.latest(run.id)
    suspended = await h.store.get_run(run.id)
    assert suspended.phase is RunPhase.SUSPENDED
    assert "suspended" in (suspended.message or "")

    await h.control(run.id, suspend=False)
    final = await asyncio.wait_for(driving, HANG_GUARD)
    assert final.phase is RunPhase.SUCCEEDED
    assert lines(c) == ["first", "second"]
    phases = [e.to_phase for e in await h.store.events(run.id) if e.kind == "RunPhase"]
    assert phases == ["Pending", "Running", "Suspended", "Running", "Succeeded"]


async def test_suspended_from_the_start(h: Harness) -> None:
    run = await h.create(spec_of([sh("a", mark(h.counter, "a"))]), controls={"suspend": True})
    driving = h.drive(run.id)
    await _wait_phase(h, run.id, RunPhase.SUSPENDED)
    await _passes(h, run.id, 3)
    assert await h.latest(run.id) == {}
    await h.control(run.id, suspend=False)
    assert (await asyncio.wait_for(driving, HANG_GUARD)).phase is RunPhase.SUCCEEDED
    assert lines(h.counter) == ["a"]


async def test_cancel_stops_running_processes(h: Harness) -> None:
    pids = [h.root / "pid-a", h.root / "pid-b"]
    spec = spec_of(
        [
            sh("a", f"echo $$ > {pids[0]}; exec sleep 30"),
            # Ignores SIGTERM: the executor must escalate to SIGKILL.
            sh("b", f"trap '' TERM; echo $$ > {pids[1]}; while true; do sleep 0.1; done"),
            sh("c", mark(h.counter, "c"), dependsOn=["a"]),
        ],
        **{"finally": [sh("cleanup", mark(h.counter, "cleanup"))]},
    )
    run = await h.create(spec)
    driving = h.drive(run.id)
    for p in pids:
        await h.wait_file(p)
    await h.control(run.id, cancel=True)
    final = await asyncio.wait_for(driving, HANG_GUARD)

    assert final.phase is RunPhase.CANCELLED
    assert final.reason == "RunCancelled"
    for p in pids:
        assert not pid_alive(int(p.read_text()))
    latest = await h.latest(run.id)
    for name in ("a", "b", "c"):
        assert latest[name].phase is TaskPhase.CANCELLED
        assert latest[name].reason == "RunCancelled"
    assert lines(h.counter) == ["cleanup"]


async def test_cancel_while_suspended_ends_the_run(h: Harness) -> None:
    """A suspended run that is cancelled ends (Cancelled, finally tasks run) without
    waiting for a resume that will never come."""
    spec = spec_of(
        [sh("a", "true"), sh("b", "true", dependsOn=["a"])],
        **{"finally": [sh("cleanup", mark(h.counter, "cleanup"))]},
    )
    run = await h.create(spec, controls={"suspend": True})
    driving = h.drive(run.id)
    await _wait_phase(h, run.id, RunPhase.SUSPENDED)
    await h.control(run.id, cancel=True)
    final = await asyncio.wait_for(driving, HANG_GUARD)
    assert final.phase is RunPhase.CANCELLED
    assert lines(h.counter) == ["cleanup"]


async def test_cancel_while_an_approval_gate_waits(h: Harness) -> None:
    """The gate is the only unfinished task: the cancel stops it, and the run ends
    Cancelled (naming who cancelled), not Succeeded; finally tasks are told so."""
    report = sh("report", f"echo {{{{ run.outcome }}}} >> {h.counter}")
    spec = spec_of(
        [sh("build", "true"), {"name": "gate", "dependsOn": ["build"], "approval": {}}],
        **{"finally": [report]},
    )
    run = await h.create(spec)
    driving = h.drive(run.id)
    await h.wait_for(run.id, "gate", "Running")
    await h.control(run.id, cancel=True, cancelledBy="alice")
    final = await asyncio.wait_for(driving, HANG_GUARD)

    assert final.phase is RunPhase.CANCELLED
    assert final.reason == "RunCancelled"
    assert final.message == "cancelled by alice"
    gate = (await h.latest(run.id))["gate"]
    assert gate.phase is TaskPhase.CANCELLED
    assert gate.reason == "RunCancelled"
    assert lines(h.counter) == ["Cancelled"]


async def test_cancel_while_the_last_container_task_runs(h: Harness) -> None:
    """Suspended, then cancelled, while the run's last task runs: it is stopped and
    the run ends Cancelled."""
    pid = h.root / "pid"
    spec = spec_of([sh("a", "true"), sh("b", f"echo $$ > {pid}; exec sleep 30", dependsOn=["a"])])
    run = await h.create(spec)
    driving = h.drive(run.id)
    await h.wait_file(pid)
    await h.control(run.id, suspend=True)
    await _wait_phase(h, run.id, RunPhase.SUSPENDED)
    await h.control(run.id, cancel=True)
    final = await asyncio.wait_for(driving, HANG_GUARD)

    assert final.phase is RunPhase.CANCELLED
    assert final.reason == "RunCancelled"
    assert final.message == "cancelled"
    assert not pid_alive(int(pid.read_text()))
    b = (await h.latest(run.id))["b"]
    assert b.phase is TaskPhase.CANCELLED
    assert b.reason == "RunCancelled"


async def test_approval_gate_waits_then_opens(h: Harness) -> None:
    c = h.counter
    spec = spec_of(
        [
            sh("build", mark(c, "build")),
            {
                "name": "ship-it",
                "dependsOn": ["build"],
                "approval": {"message": "ship {{ run.name }}?"},
            },
            sh("release", mark(c, "release"), dependsOn=["ship-it"]),
        ]
    )
    run = await h.create(spec)
    driving = h.drive(run.id)
    gate = await h.wait_for(run.id, "ship-it", "Running")
    # The approver is asked the rendered approval.message.
    assert gate.message == f"waiting for approval: ship {run.name}?"
    await _passes(h, run.id, 3)
    assert lines(c) == ["build"]
    # A pass of a second engine on the same store: the driver's CAS writes keep it safe.
    assert "waiting for approval of ship-it" in (await h.engine.reconcile(run.id)).decision.message

    assert await h.engine.approve(run.id, "ship-it", actor="alice")
    h.waker(run.id)
    final = await asyncio.wait_for(driving, HANG_GUARD)
    assert final.phase is RunPhase.SUCCEEDED
    assert lines(c) == ["build", "release"]
    approved = (await h.latest(run.id))["ship-it"]
    assert approved.reason == "Approved"
    assert approved.outputs == {"approved": True}
    events = [e for e in await h.store.events(run.id) if e.kind == "Approved"]
    assert [(e.task, e.actor, e.message) for e in events] == [("ship-it", "alice", None)]


async def test_approval_gate_times_out(h: Harness) -> None:
    spec = spec_of(
        [
            {"name": "gate", "timeoutSeconds": 1, "approval": {}},
            sh("after", mark(h.counter, "after"), dependsOn=["gate"]),
        ]
    )
    run = await h.run(spec)
    assert run.phase is RunPhase.FAILED
    gate = (await h.latest(run.id))["gate"]
    assert gate.phase is TaskPhase.FAILED
    assert gate.reason == "TimedOut"
    assert lines(h.counter) == []
    assert (await h.latest(run.id))["after"].reason == "UpstreamFailed"
