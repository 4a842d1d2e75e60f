"""Bucket leases and fencing, on SQLite and PostgreSQL (store/leases.py, store/fencing.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import update

from maestro.api.phases import RunPhase
from maestro.engine.launches import LaunchMarks
from maestro.store import AttemptRecord, Fenced, Launch, RunRecord, Starting, Store
from maestro.store.leases import BUCKETS, Fence, Leases, bucket_of, fenced, owners
from maestro.store.models import BucketRow, ReplicaRow

MakeRun = Callable[..., Awaitable[RunRecord]]


async def _settle(leases: list[Leases], rounds: int = 3) -> dict[str, dict[int, int]]:
    """Tick every replica a few rounds (as their loops would) and say who holds what."""
    held: dict[str, dict[int, int]] = {}
    for _ in range(rounds):
        for lease in leases:
            held[lease.replica] = (await lease.tick()).held
    return held


async def _expire(store: Store, holder: str) -> None:
    """As if ``holder`` had been paused past its lease (its heartbeat too)."""
    past = datetime.now(UTC) - timedelta(minutes=1)
    async with store.writing() as session:
        await session.execute(
            update(BucketRow).where(BucketRow.holder == holder).values(expires_at=past)
        )
        await session.execute(
            update(ReplicaRow).where(ReplicaRow.name == holder).values(expires_at=past)
        )


def test_bucket_of_is_stable_and_spreads() -> None:
    assert bucket_of("3f0c-uid") == bucket_of("3f0c-uid")
    spread = Counter(bucket_of(f"uid-{i}") for i in range(3200))
    assert set(spread) == set(range(BUCKETS))
    assert max(spread.values()) < 2 * 3200 / BUCKETS


async def test_one_replica_holds_every_bucket(store: Store) -> None:
    lease = Leases(store, "a", 5.0)
    await lease.check()
    tick = await lease.tick()
    assert sorted(tick.held) == list(range(BUCKETS))
    assert tick.claimed == list(range(BUCKETS))
    assert tick.replicas == ["a"]
    again = await lease.tick()
    assert again.held == tick.held
    assert again.claimed == []
    assert again.released == []


async def test_three_replicas_balance_within_one_of_their_share(store: Store) -> None:
    a, b, c = (Leases(store, name, 5.0) for name in "abc")
    await a.tick()  # a starts alone and takes everything
    held = await _settle([a, b, c])
    counts = sorted(len(h) for h in held.values())
    assert sum(counts) == BUCKETS
    assert counts[-1] - counts[0] <= 1, held
    assert all(abs(n - BUCKETS / 3) < 1 for n in counts)
    everyone = [bucket for h in held.values() for bucket in h]
    assert sorted(everyone) == list(range(BUCKETS))  # no bucket held twice


async def test_release_hands_everything_over_at_once(store: Store) -> None:
    a, b = Leases(store, "a", 5.0), Leases(store, "b", 5.0)
    held = await _settle([a, b])
    assert len(held["a"]) == len(held["b"]) == BUCKETS // 2
    assert sorted(await a.release()) == sorted(held["a"])
    tick = await b.tick()
    assert sorted(tick.held) == list(range(BUCKETS))
    assert tick.replicas == ["b"]


async def test_expired_lease_is_taken_with_a_new_epoch(store: Store) -> None:
    a, b = Leases(store, "a", 5.0), Leases(store, "b", 5.0)
    held = await _settle([a, b])
    await _expire(store, "a")
    tick = await b.tick()
    assert sorted(tick.held) == list(range(BUCKETS))
    for bucket, epoch in held["a"].items():
        assert tick.held[bucket] == epoch + 1
    # a wakes up: it holds nothing it had (it may claim again only what is free).
    woke = await a.tick()
    assert not set(woke.held) & set(tick.held)


async def test_write_under_a_lost_fence_is_refused_and_nothing_is_written(
    store: Store, make_run: MakeRun
) -> None:
    a, b = Leases(store, "a", 5.0), Leases(store, "b", 5.0)
    run = await make_run(uid="uid-1")
    bucket = bucket_of("uid-1")
    tick = await a.tick()
    mine = Fence(bucket, "a", tick.held[bucket])
    with fenced(mine):
        assert await store.set_run_phase(run.id, RunPhase.RUNNING)
    await _expire(store, "a")
    taken = await b.tick()
    assert bucket in taken.held
    with fenced(mine), pytest.raises(Fenced, match=f"bucket {bucket} is no longer held by a"):
        await store.set_run_phase(run.id, RunPhase.SUCCEEDED)
    with fenced(mine), pytest.raises(Fenced):
        await store.update_controls(run.id, cancel=True)
    assert (await store.get_run(run.id)).phase is RunPhase.RUNNING
    with fenced(Fence(bucket, "b", taken.held[bucket])):
        assert await store.set_run_phase(run.id, RunPhase.SUCCEEDED)
    # Even holding the bucket again, an old epoch stays refused.
    await b.release()
    again = await a.tick()
    assert again.held[bucket] > mine.epoch
    with fenced(mine), pytest.raises(Fenced):
        await store.update_controls(run.id, suspend=True)


async def test_fence_is_inherited_by_tasks_started_under_it(
    store: Store, make_run: MakeRun
) -> None:
    run = await make_run(uid="uid-2")
    with fenced(Fence(bucket_of("uid-2"), "nobody", 1)):
        child = asyncio.create_task(store.set_run_phase(run.id, RunPhase.RUNNING))
    with pytest.raises(Fenced):
        await child
    assert await store.set_run_phase(run.id, RunPhase.RUNNING)  # no fence: local mode


async def test_concurrent_ticks_never_give_a_bucket_to_two(store: Store) -> None:
    replicas = [Leases(store, f"r{i}", 5.0) for i in range(3)]
    for _ in range(4):
        ticks = await asyncio.gather(*(r.tick() for r in replicas))
        claimed = [b for t in ticks for b in t.held]
        assert len(claimed) == len(set(claimed))
    rows, live = await owners(store)
    assert len(rows) == BUCKETS
    assert [name for name, _ in live] == ["r0", "r1", "r2"]
    assert Counter(r.holder for r in rows) == Counter(
        {name: len(t.held) for name, t in zip(["r0", "r1", "r2"], ticks, strict=True)}
    )


async def test_a_lapsed_lease_no_one_claimed_is_renewed_under_the_same_epoch(
    store: Store, make_run: MakeRun
) -> None:
    a = Leases(store, "a", 5.0)
    run = await make_run(uid="uid-3")
    bucket = bucket_of("uid-3")
    held = (await a.tick()).held
    await _expire(store, "a")
    mine = Fence(bucket, "a", held[bucket])
    with fenced(mine), pytest.raises(Fenced):
        await store.set_run_phase(run.id, RunPhase.RUNNING)  # refused while lapsed
    again = await a.tick()
    assert again.held == held
    assert again.claimed == []
    with fenced(mine):
        assert await store.set_run_phase(run.id, RunPhase.RUNNING)


async def _started(store: Store, run: RunRecord, task: str) -> None:
    async with store.batch(run.id) as writes:
        assert await writes.start_attempts([Starting(task, 1, create=True, job_name=task)]) == [
            True
        ]


async def test_launch_marks_of_several_runs_refuse_only_the_one_whose_fence_is_lost(
    store: Store, make_run: MakeRun
) -> None:
    a, b = Leases(store, "a", 5.0), Leases(store, "b", 5.0)
    kept, lost = await make_run(uid="uid-kept"), await make_run(uid="uid-lost")
    for run in (kept, lost):
        await _started(store, run, "build")
    await _settle([a, b])
    held = {**(await a.tick()).held}
    bucket_kept, bucket_lost = bucket_of("uid-kept"), bucket_of("uid-lost")
    fence_kept = Fence(bucket_kept, "a", held[bucket_kept]) if bucket_kept in held else None
    # The lost run's fence names a holder that never held its bucket.
    fence_lost = Fence(bucket_lost, "nobody", 1)
    outcomes = await store.mark_launched(
        [
            Launch(kept.id, (("build", 1),), fence_kept),
            Launch(lost.id, (("build", 1),), fence_lost),
        ]
    )
    assert isinstance(outcomes[1], Fenced)
    assert not isinstance(outcomes[0], Fenced)
    assert [(r.task, r.attempt, r.launched_at is not None) for r in outcomes[0]] == [
        ("build", 1, True)
    ]
    assert (await store.latest_attempts(lost.id))["build"].launched_at is None
    # Marked once: a second mark of the same attempt writes nothing.
    assert await store.mark_launched([Launch(kept.id, (("build", 1),), None)]) == [[]]


async def test_launch_marks_waiting_together_share_one_transaction(
    store: Store, make_run: MakeRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs = [await make_run(uid=f"uid-{i}") for i in range(5)]
    for run in runs:
        await _started(store, run, "build")
    groups: list[int] = []
    write = store.mark_launched

    async def counted(launches: list[Launch]) -> list[list[AttemptRecord] | Fenced]:
        groups.append(len(launches))
        return await write(launches)

    monkeypatch.setattr(store, "mark_launched", counted)
    marks = LaunchMarks(store)
    marked = await asyncio.gather(*(marks.mark(run.id, [("build", 1)]) for run in runs))
    assert [[(r.run_id, r.task) for r in m] for m in marked] == [
        [(run.id, "build")] for run in runs
    ]
    # Asked for in the same turn of the loop, before the writer ran: one transaction.
    assert groups == [5]
    with fenced(Fence(bucket_of("uid-0"), "nobody", 1)), pytest.raises(Fenced):
        await marks.mark(runs[0].id, [("build", 1)])
