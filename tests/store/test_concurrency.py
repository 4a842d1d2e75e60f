"""Concurrent writers and a writer killed mid-transaction, on both backends."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from maestro.api.phases import TaskPhase
from maestro.store import Store

WRITER = Path(__file__).with_name("writer.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "operator")}


async def _run_with_attempt(store: Store) -> str:
    run = await store.create_run(
        namespace="ns", name="race", workflow_name=None, spec={}, params={}
    )
    assert await store.create_attempt(run.id, "build", 1) is not None
    return run.id


async def test_concurrent_starts_on_separate_connections_one_wins(
    store: Store, database_url: str
) -> None:
    # Each contender has its own engine, hence its own connection and transaction.
    contenders = [await Store.open(database_url) for _ in range(8)]
    try:
        for attempt in (1, 2, 3):
            run = await store.create_run(
                namespace="ns", name=f"race-{attempt}", workflow_name=None, spec={}, params={}
            )
            await store.create_attempt(run.id, "build", attempt)
            results = await asyncio.gather(
                *(
                    s.transition_attempt(
                        run.id, "build", attempt, TaskPhase.RUNNING, job_name=f"job-{i}"
                    )
                    for i, s in enumerate(contenders)
                )
            )
            assert results.count(True) == 1, results
            winner = results.index(True)
            stored = (await store.attempts(run.id))[0]
            assert stored.phase is TaskPhase.RUNNING
            assert stored.job_name == f"job-{winner}"
            starts = [e for e in await store.events(run.id) if e.to_phase == "Running"]
            assert len(starts) == 1
    finally:
        for s in contenders:
            await s.close()


async def test_concurrent_creates_of_the_same_attempt_one_wins(
    store: Store, database_url: str
) -> None:
    run_id = await _run_with_attempt(store)
    contenders = [await Store.open(database_url) for _ in range(6)]
    try:
        created = await asyncio.gather(*(s.create_attempt(run_id, "build", 2) for s in contenders))
        replayed = await asyncio.gather(
            *(
                s.create_run(
                    namespace="ns", name="x", workflow_name=None, spec={}, params={}, uid="u"
                )
                for s in contenders
            )
        )
    finally:
        for s in contenders:
            await s.close()
    assert sum(c is not None for c in created) == 1
    assert [a.attempt for a in await store.attempts(run_id)] == [1, 2]
    assert len({r.id for r in replayed}) == 1
    assert len([r for r in await store.list_runs() if r.uid == "u"]) == 1


async def _writer(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(WRITER),
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=ENV,
    )


async def test_concurrent_starts_from_separate_processes_one_wins(
    store: Store, database_url: str
) -> None:
    run_id = await _run_with_attempt(store)
    writers = [await _writer("race", database_url, run_id) for _ in range(4)]
    try:
        for w in writers:
            assert w.stdout is not None
            assert await w.stdout.readline() == b"ready\n"
        for w in writers:
            assert w.stdin is not None
            w.stdin.write(b"go\n")
        outcomes = await asyncio.gather(*(w.communicate() for w in writers))
    finally:
        for w in writers:
            if w.returncode is None:
                w.kill()
                await w.wait()
    assert [w.returncode for w in writers] == [0, 0, 0, 0]
    assert sorted(out.strip() for out, _ in outcomes) == [b"False", b"False", b"False", b"True"]
    assert (await store.attempts(run_id))[0].phase is TaskPhase.RUNNING
    starts = [e for e in await store.events(run_id) if e.to_phase == "Running"]
    assert len(starts) == 1


async def test_writer_killed_mid_transaction_leaves_no_trace(
    store: Store, database_url: str
) -> None:
    run_id = await _run_with_attempt(store)
    events_before = await store.events(run_id)
    writer = await _writer("hang", database_url, run_id)
    try:
        assert writer.stdout is not None
        # The UPDATE to Running has run inside the open transaction when this arrives.
        assert await writer.stdout.readline() == b"in-transaction\n"
        writer.send_signal(signal.SIGKILL)
    finally:
        if writer.returncode is None:
            writer.kill()
        await writer.wait()
    assert writer.returncode == -signal.SIGKILL

    attempt = (await store.attempts(run_id))[0]
    assert attempt.phase is TaskPhase.PENDING
    assert attempt.job_name is None
    assert attempt.started_at is None
    assert await store.events(run_id) == events_before
    # Nothing is left locked: the next writer moves the attempt normally.
    assert await store.transition_attempt(run_id, "build", 1, TaskPhase.RUNNING)
    assert [e.to_phase for e in await store.events(run_id)] == ["Pending", "Pending", "Running"]
