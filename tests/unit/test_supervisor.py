"""The per-replica supervisor (operator/supervisor.py) with a fake API and run controller.

The store and its leases are real (SQLite); the Kubernetes side and the run controller
are fakes that record what the supervisor asks of them. The e2e side (three replicas
on the local plane) is tests/e2e/test_scale_out.py.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from maestro.executors.container import ContainerExecutor
from maestro.k8s.client import FINALIZER, NotFound
from maestro.operator.leasing import LeaseKeeper
from maestro.operator.metrics import Metrics
from maestro.operator.supervisor import Stopped, Supervisor
from maestro.store import Store
from maestro.store.fencing import FENCE
from maestro.store.leases import BUCKETS, Fence, Tick, bucket_of


class FakeKube:
    def __init__(self) -> None:
        self.finalizers: list[tuple[str, bool]] = []

    async def change_run_finalizers(self, namespace: str, name: str, body: Any, add: bool) -> None:
        self.finalizers.append((name, add))

    async def get_run(self, namespace: str, name: str) -> dict[str, Any]:
        raise NotFound(f"workflowrun {namespace}/{name}", "not found")


class FakeEngine:
    def __init__(self, store: Store) -> None:
        self.store = store


class FakeRuns:
    """Records the drivers it runs, with the fence each one writes under."""

    def __init__(self, store: Store) -> None:
        self.engine = FakeEngine(store)
        self.driving: dict[str, Fence | None] = {}
        self.stopped: list[str] = []
        self.synced: list[str] = []
        self.deleted: list[str] = []
        self.forgotten: list[str] = []

    async def daemon(self, body: dict[str, Any], stopped: Stopped) -> None:
        name = body["metadata"]["name"]
        self.driving[name] = FENCE.get()
        await stopped.wait()
        self.stopped.append(name)

    async def sync_controls(self, body: dict[str, Any]) -> None:
        self.synced.append(body["metadata"]["name"])

    async def on_delete(self, body: dict[str, Any]) -> None:
        self.deleted.append(body["metadata"]["name"])

    def forget(self, uid: str) -> None:
        self.forgotten.append(uid)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[Store]:
    opened = await Store.open(f"sqlite:///{tmp_path / 'maestro.db'}", migrate=True)
    try:
        yield opened
    finally:
        await opened.close()


def _run(name: str, uid: str, **meta: Any) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": name, "uid": uid, **meta}, "spec": {}}


def _uid_in(bucket: int) -> str:
    """A uid that hashes into ``bucket``."""
    return next(f"u{i}" for i in range(10_000) if bucket_of(f"u{i}") == bucket)


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def _supervisor(store: Store) -> tuple[Supervisor, FakeRuns, FakeKube]:
    runs, kube = FakeRuns(store), FakeKube()
    metrics = Metrics(store, api_writes=lambda: 0.0, watching=lambda: True)
    sup = Supervisor(
        LeaseKeeper(lambda: asyncio.sleep(0, store), "me", lease_seconds=5.0, renew_seconds=1.0),
        runs,  # type: ignore[arg-type]
        kube,  # type: ignore[arg-type]
        ContainerExecutor(kube, lambda run_id: None),  # type: ignore[arg-type]
        metrics,
        namespaces=["ns"],
        renew_seconds=1.0,
    )
    return sup, runs, kube


def _tick(held: dict[int, int]) -> Tick:
    return Tick(held, ["me", "other"], sorted(held), [])


async def test_drives_only_the_runs_of_held_buckets_under_their_fence(store: Store) -> None:
    sup, runs, kube = _supervisor(store)
    mine, theirs = _uid_in(3), _uid_in(4)
    sup._on_run(_run("mine", mine), False)
    sup._on_run(_run("theirs", theirs), False)
    await _settle()
    assert runs.driving == {}  # nothing is held before the first renewal
    sup._apply(_tick({3: 7}))
    await _settle()
    assert runs.driving == {"mine": Fence(3, "me", 7)}
    assert kube.finalizers == [("mine", True)]  # held before the run is driven
    assert sup.ownership() == {"replica": "me", "buckets": [3], "runsDriven": 1}
    assert sup.owns(mine)
    assert not sup.owns(theirs)


async def test_a_lost_or_reclaimed_bucket_stops_its_drivers(store: Store) -> None:
    sup, runs, _ = _supervisor(store)
    uid = _uid_in(5)
    sup._on_run(_run("r", uid), False)
    sup._apply(_tick({5: 1}))
    await _settle()
    sup._apply(_tick({5: 2}))  # lapsed and claimed again: a new epoch, a new driver
    await _settle()
    assert runs.stopped == ["r"]
    assert uid in runs.forgotten
    assert runs.driving["r"] == Fence(5, "me", 2)
    sup._apply(_tick({}))  # given away
    await _settle()
    assert runs.stopped == ["r", "r"]
    assert sup.ownership()["runsDriven"] == 0


async def test_spec_edits_go_to_the_driver_and_a_deletion_is_recorded_then_let_go(
    store: Store,
) -> None:
    sup, runs, kube = _supervisor(store)
    uid = _uid_in(6)
    sup._on_run(_run("r", uid, finalizers=[FINALIZER]), False)
    sup._apply(_tick({6: 1}))
    await _settle()
    sup._on_run(_run("r", uid, finalizers=[FINALIZER], generation=2), False)
    await _settle()
    assert runs.synced == ["r"]
    deleting = _run("r", uid, finalizers=[FINALIZER], deletionTimestamp="2026-12-07T00:00:00Z")
    sup._on_run(deleting, False)
    for _ in range(20):
        await _settle()
    assert runs.stopped == ["r"]
    assert runs.deleted == ["r"]
    assert kube.finalizers == [("r", False)]  # the finalizer was already there: no add


async def test_a_gained_bucket_cancels_stored_runs_whose_resource_is_gone(store: Store) -> None:
    sup, runs, _ = _supervisor(store)
    gone = _uid_in(9)
    await store.create_run(
        namespace="ns", name="gone", workflow_name=None, spec={"tasks": []}, params={}, uid=gone
    )
    for watch in sup.run_watches:
        watch.ready = True  # listed: the index is complete, and "gone" is not in it
    sup._apply(_tick({b: 1 for b in range(BUCKETS)}))
    await sup._sweep()
    for _ in range(20):
        await _settle()
    assert runs.deleted == ["gone"]


async def test_the_lease_thread_renews_delivers_and_gives_everything_back(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'leases.db'}"
    await (await Store.open(url, migrate=True)).close()
    ticks: list[Tick] = []
    keeper = LeaseKeeper(lambda: Store.open(url), "me", lease_seconds=2.0, renew_seconds=0.1)
    ended = keeper.start(lambda tick, seconds: ticks.append(tick))
    for _ in range(100):
        if len(ticks) >= 3:
            break
        await asyncio.sleep(0.05)
    assert sorted(ticks[0].held) == list(range(BUCKETS))  # alone: every bucket
    assert ticks[-1].held == ticks[0].held  # renewed under the same epochs
    assert sorted(await keeper.release()) == list(range(BUCKETS))
    await asyncio.wait_for(ended, 5)  # the thread ends after giving back
    # The operator's way out stops the keeper after a release: its loop has closed by then.
    await asyncio.to_thread(keeper.stop)
    assert await keeper.release() == []


async def test_the_lease_thread_stops_renewing_when_the_operator_loop_is_frozen(
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'leases.db'}"
    await (await Store.open(url, migrate=True)).close()
    ticks: list[Tick] = []
    keeper = LeaseKeeper(lambda: Store.open(url), "me", lease_seconds=1.0, renew_seconds=0.1)
    keeper.start(lambda tick, seconds: ticks.append(tick))
    for _ in range(100):
        if ticks:
            break
        await asyncio.sleep(0.05)
    assert ticks
    # The operator's loop freezes for longer than the lease: the thread must stop renewing
    # after half a lease, so the leases run out (others may take the buckets).
    time.sleep(1.6)  # noqa: ASYNC251 (the freeze is the point)
    with sqlite3.connect(tmp_path / "leases.db") as db:
        (latest,) = db.execute("SELECT max(expires_at) FROM buckets").fetchone()
    assert datetime.fromisoformat(latest).replace(tzinfo=UTC) < datetime.now(UTC)
    await asyncio.sleep(0.5)  # the loop answers again: renewals resume
    with sqlite3.connect(tmp_path / "leases.db") as db:
        (latest,) = db.execute("SELECT max(expires_at) FROM buckets").fetchone()
    assert datetime.fromisoformat(latest).replace(tzinfo=UTC) > datetime.now(UTC)
    await asyncio.to_thread(keeper.stop)
