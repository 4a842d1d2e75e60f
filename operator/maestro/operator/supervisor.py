"""One per replica: hold the buckets the store leases to it, drive exactly their runs.

Every replica is active. The runs are split into fixed buckets (a hash of the
WorkflowRun uid, :mod:`maestro.store.leases`); each replica renews its leases every
``renew_seconds`` (on a thread of its own, :mod:`maestro.operator.leasing`) and the
store balances the buckets over the live replicas. This
replaces Kopf's per-object daemons for WorkflowRuns, which could not follow ownership
(a daemon's filter is re-checked only when an event comes, and daemons need Kopf's
finalizer, which a replica that does not own the run would remove).

- A plain watch of WorkflowRuns keeps an index of every run; the runs in held buckets
  get a driver task (:meth:`RunController.daemon`), started under the bucket's
  :class:`~maestro.store.leases.Fence`, so each store write it makes is refused once
  the bucket is not this replica's under that epoch any more.
- A bucket lost (rebalanced away, expired, or reclaimed under a new epoch) stops its
  drivers; a bucket gained starts them, and records as Cancelled the stored runs whose
  WorkflowRun went while nobody held the bucket.
- The task pods watched are those of the held buckets only (a label selector).
- A graceful stop stops the drivers and gives every bucket back at once.
- The operator's finalizer is added by the run's driver and removed by the owner once
  the deletion is recorded (pods go with the run: they are owned by it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from maestro.executors.container import LABEL_BUCKET, LABEL_RUN_ID, ContainerExecutor
from maestro.k8s.client import FINALIZER, RUNS, APIError, Kube, NotFound
from maestro.k8s.watch import Labels, Watch
from maestro.operator.leasing import LeaseKeeper
from maestro.operator.metrics import Metrics
from maestro.operator.runs import RunController
from maestro.store import Fenced, Store, StoreError
from maestro.store.leases import BUCKETS, Fence, Tick, bucket_of, fenced

log = logging.getLogger("maestro.supervisor")

# A stopped driver that has not returned after this long is cancelled.
STOP_GRACE_SECONDS = 10.0
# Trouble recording a deletion or adding the finalizer is retried after this long.
RETRY_SECONDS = 1.0


class Stopped:
    """How a driver is told to stop: the shape of Kopf's daemon ``stopped`` flag."""

    def __init__(self) -> None:
        """Not stopped yet."""
        self._event = asyncio.Event()

    def __bool__(self) -> bool:
        """True once stopped."""
        return self._event.is_set()

    def set(self) -> None:
        """Stop."""
        self._event.set()

    async def wait(self, seconds: float | None = None) -> bool:
        """Until stopped, or ``seconds`` pass; whether it is stopped."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), seconds)
        return self._event.is_set()


@dataclass
class _Driver:
    fence: Fence
    stopped: Stopped
    task: asyncio.Task[None]


def _uid(body: Mapping[str, Any]) -> str:
    return str(body["metadata"].get("uid") or "")


class Supervisor:
    """The runs this replica drives, following the buckets it holds."""

    def __init__(
        self,
        keeper: LeaseKeeper,
        runs: RunController,
        kube: Kube,
        container: ContainerExecutor,
        metrics: Metrics,
        *,
        namespaces: list[str],
        renew_seconds: float,
    ) -> None:
        """One watch of runs and one of task pods per watched namespace (or all)."""
        self.keeper, self.runs, self.kube, self.metrics = keeper, runs, kube, metrics
        self.store: Store = runs.engine.store
        self.namespaces = namespaces
        self.renew_seconds = renew_seconds
        scopes: list[str | None] = [*namespaces] or [None]
        self.run_watches = [Watch(kube, RUNS, "", self._on_run, s) for s in scopes]
        self.pod_watches = [Watch(kube, "pods", None, container.observe, s) for s in scopes]
        self.index: dict[tuple[str, str], dict[str, Any]] = {}  # every WorkflowRun seen
        self.held: dict[int, int] = {}  # bucket -> epoch
        self.renewed = False  # at least one renewal went through
        self._drivers: dict[str, _Driver] = {}  # uid -> the driver of a run in a held bucket
        self._done: set[str] = set()  # uids whose driver returned: the run has finished
        self._chores: dict[str, asyncio.Task[None]] = {}  # uid -> its latest sync or delete
        self._deleting: set[str] = set()  # uids whose deletion is being recorded
        self._unswept: set[int] = set()  # gained buckets not yet checked for deleted runs
        self._background: set[asyncio.Task[Any]] = set()
        self._stopping = False
        metrics.runs_driven.set_function(lambda: float(len(self._drivers)))
        metrics.buckets_owned.set_function(lambda: float(len(self.held)))

    # Readiness and what /readyz shows ---------------------------------------------------

    @property
    def ready(self) -> bool:
        """Leases renewed and every watch listed."""
        return self.renewed and all(w.ready for w in (*self.run_watches, *self.pod_watches))

    def ownership(self) -> dict[str, Any]:
        """This replica, its buckets and how many runs it drives."""
        return {
            "replica": self.keeper.replica,
            "buckets": sorted(self.held),
            "runsDriven": len(self._drivers),
        }

    def owns(self, uid: str) -> bool:
        """Whether the object with this uid is in a bucket held now (schedules ask too)."""
        return bucket_of(uid) in self.held

    # The loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Watch and renew until cancelled or :meth:`shutdown`; a renewal thread that
        cannot go on (a schema it does not know) ends it with that error."""
        tasks = [asyncio.create_task(w.run()) for w in (*self.run_watches, *self.pod_watches)]
        tasks.append(asyncio.create_task(self._sweeps()))
        try:
            await self.keeper.start(self._renewed)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.to_thread(self.keeper.stop)

    def _renewed(self, tick: Tick, seconds: float) -> None:
        """A renewal, delivered from the lease thread."""
        if self._stopping:
            return
        self.metrics.lease_renew_seconds.observe(seconds)
        self.renewed = True
        self._apply(tick)

    async def shutdown(self) -> None:
        """A graceful stop: stop every driver, then give every bucket back at once.

        Idempotent (the operator also calls it on its way out after any other stop)."""
        if self._stopping:
            return
        self._stopping = True
        drivers = list(self._drivers.values())
        for driver in drivers:
            driver.stopped.set()
        # Given back before the drivers have wound down: the fence refuses whatever they
        # still try to write, and the others need not wait for them.
        try:
            released = await self.keeper.release()
        except StoreError as err:
            log.warning("buckets not given back (they expire instead): %s", err)
            released = []
        self.metrics.handovers.labels(direction="released").inc(len(released))
        self.held = {}
        log.info("gave back %d buckets", len(released))
        await self._reap([d.task for d in drivers])

    def _apply(self, tick: Tick) -> None:
        """Start and stop drivers for what the renewal says is held now."""
        before, self.held = self.held, dict(tick.held)
        lost = [b for b in before if self.held.get(b) != before[b]]
        gained = {b for b in self.held if before.get(b) != self.held[b]}
        expired = [b for b in lost if b not in tick.released]
        self.metrics.handovers.labels(direction="claimed").inc(len(tick.claimed))
        self.metrics.handovers.labels(direction="released").inc(len(tick.released))
        self.metrics.handovers.labels(direction="lost").inc(len(expired))
        if lost or gained:
            log.info(
                "buckets: holding %d of %d (%d live replicas); gained %s, lost %s",
                len(self.held), BUCKETS, len(tick.replicas), sorted(gained), sorted(lost),
            )  # fmt: skip
        for uid, driver in list(self._drivers.items()):
            if self.held.get(driver.fence.bucket) != driver.fence.epoch:
                self._stop(uid)
        for uid in [u for u in self._done if bucket_of(u) in lost]:
            self._done.discard(uid)
            self.runs.forget(uid)
        self._unswept |= gained
        # Level-triggered: any run of a held bucket without a driver gets one (a bucket
        # gained, or a driver that ended on a write refused while the lease had lapsed).
        for body in list(self.index.values()):
            uid = _uid(body)
            if bucket_of(uid) in self.held and uid not in self._drivers and uid not in self._done:
                self._consider(body)
        if set(before) != set(self.held):
            self._retarget_pods()

    def _retarget_pods(self) -> None:
        held = set(self.held)
        if not held:
            selector = None
        elif len(held) == BUCKETS:
            selector = LABEL_RUN_ID  # all of them (pods made before buckets had no label)
        else:
            selector = f"{LABEL_BUCKET} in ({','.join(map(str, sorted(held)))})"

        def keep(labels: Labels) -> bool:
            bucket = labels.get(LABEL_BUCKET)
            return bucket is None or (bucket.isdigit() and int(bucket) in held)

        for watch in self.pod_watches:
            watch.retarget(selector, keep)

    # WorkflowRun events ------------------------------------------------------------------

    def _on_run(self, obj: dict[str, Any], deleted: bool) -> None:
        """Keep the index, and hand the news to the run's driver when it is ours."""
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        known = self.index.get(key)
        if deleted:
            body = self.index.pop(key, None) or obj
            if _uid(body) and self.owns(_uid(body)):
                self._chore(body, self._deleted(body))
            return
        if known is not None and _uid(known) == _uid(obj):
            # In place, as Kopf does: a driver holding the body sees the newest one.
            known.clear()
            known.update(obj)
            body = known
        else:
            if known is not None and self.owns(_uid(known)):
                self._chore(known, self._deleted(known))  # replaced under the same name
            body = self.index[key] = obj
        self._consider(body)

    def _consider(self, body: dict[str, Any]) -> None:
        uid = _uid(body)
        bucket = bucket_of(uid)
        if self._stopping or bucket not in self.held:
            return
        if body["metadata"].get("deletionTimestamp"):
            if uid not in self._deleting:  # one recording at a time (renewals ask again)
                self._deleting.add(uid)
                self._chore(body, self._deleted(body))
        elif uid in self._drivers or uid in self._done:
            self._chore(body, self.runs.sync_controls(body))
        else:
            self._start(body, Fence(bucket, self.keeper.replica, self.held[bucket]))

    def _chore(self, body: Mapping[str, Any], work: Any) -> None:
        """Run ``work`` for this run after its previous chore (Kopf's one-at-a-time per
        object), under the fence of the run's bucket."""
        uid = _uid(body)
        bucket = bucket_of(uid)
        epoch = self.held.get(bucket)
        previous = self._chores.get(uid)

        async def chore() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            if epoch is None:
                work.close()
                return
            with fenced(Fence(bucket, self.keeper.replica, epoch)):
                try:
                    await work
                except Fenced:
                    pass  # not ours any more: the new owner does it
                except Exception as err:
                    log.warning("run %s: %s", body["metadata"].get("name"), err)

        task = asyncio.create_task(chore())
        self._chores[uid] = task
        task.add_done_callback(
            lambda t: self._chores.pop(uid, None) if self._chores.get(uid) is t else None
        )

    # Drivers ----------------------------------------------------------------------------

    def _start(self, body: dict[str, Any], fence: Fence) -> None:
        uid = _uid(body)
        stopped = Stopped()
        task = asyncio.create_task(self._drive(body, fence, stopped))
        self._drivers[uid] = _Driver(fence, stopped, task)

    async def _drive(self, body: dict[str, Any], fence: Fence, stopped: Stopped) -> None:
        uid = _uid(body)
        with fenced(fence):
            try:
                await self._hold_finalizer(body, stopped)
                await self.runs.daemon(body, stopped)
                if not stopped:
                    self._done.add(uid)
            except Fenced as err:
                log.info("run %s stops here: %s", body["metadata"]["name"], err)
            finally:
                driver = self._drivers.get(uid)
                if driver is not None and driver.fence == fence:
                    del self._drivers[uid]

    async def _hold_finalizer(self, body: dict[str, Any], stopped: Stopped) -> None:
        """The finalizer first, so a deletion waits until its owner has recorded it."""
        while not stopped:
            meta = body["metadata"]
            if meta.get("deletionTimestamp") or FINALIZER in (meta.get("finalizers") or []):
                return
            try:
                await self.kube.change_run_finalizers(
                    meta["namespace"], meta["name"], body, add=True
                )
                return
            except NotFound:
                return  # gone already: its DELETED event records it
            except APIError as err:
                log.warning("run %s: finalizer not added: %s", meta["name"], err)
                await stopped.wait(RETRY_SECONDS)

    def _stop(self, uid: str) -> None:
        driver = self._drivers.pop(uid, None)
        if driver is None:
            return
        driver.stopped.set()
        self.runs.forget(uid)
        reaper = asyncio.create_task(self._reap([driver.task]))
        self._background.add(reaper)
        reaper.add_done_callback(self._background.discard)

    @staticmethod
    async def _reap(tasks: list[asyncio.Task[None]]) -> None:
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=STOP_GRACE_SECONDS)
        for task in late:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # Deletion ---------------------------------------------------------------------------

    async def _deleted(self, body: Mapping[str, Any]) -> None:
        """Record the deletion (pods stopped, run Cancelled), then let the object go."""
        uid = _uid(body)
        try:
            await self._record_deletion(uid, body)
        finally:
            self._deleting.discard(uid)

    async def _record_deletion(self, uid: str, body: Mapping[str, Any]) -> None:
        driver = self._drivers.get(uid)
        if driver is not None:
            self._stop(uid)
            await self._reap([driver.task])
        while bucket_of(uid) in self.held and not self._stopping:
            try:
                await self.runs.on_delete(body)
                meta = body["metadata"]
                if FINALIZER in (meta.get("finalizers") or []):
                    await self.kube.change_run_finalizers(
                        meta["namespace"], meta["name"], body, add=False
                    )
                break
            except NotFound:
                break
            except (APIError, StoreError) as err:
                if isinstance(err, Fenced):
                    raise
                log.warning("run %s: deletion not recorded yet: %s", body["metadata"]["name"], err)
                await asyncio.sleep(RETRY_SECONDS)
        self._done.discard(uid)

    async def _sweeps(self) -> None:
        while True:
            await asyncio.sleep(self.renew_seconds)
            try:
                await self._sweep()
            except Exception:  # the next round tries again; renewals go on regardless
                log.exception("sweep of gained buckets")

    async def _sweep(self) -> None:
        """Stored runs of gained buckets whose WorkflowRun is gone: record them Cancelled.

        Only once the run watches have listed (else every run looks gone); and a run
        missing from the index is looked up before it is given up (the index may lag).
        """
        if not self._unswept or not all(w.ready for w in self.run_watches):
            return
        buckets, self._unswept = self._unswept, set()
        try:
            stored = await self.store.list_runs(unfinished=True)
        except StoreError:
            self._unswept |= buckets
            return
        present = {_uid(b) for b in self.index.values()}
        for run in stored:
            if run.uid is None or run.uid in present or bucket_of(run.uid) not in buckets:
                continue
            if self.namespaces and run.namespace not in self.namespaces:
                continue
            try:
                live = await self.kube.get_run(run.namespace, run.name)
                if _uid(live) == run.uid:
                    continue
            except NotFound:
                pass
            except APIError:
                self._unswept.add(bucket_of(run.uid))
                continue
            gone = {"metadata": {"namespace": run.namespace, "name": run.name, "uid": run.uid}}
            self._chore(gone, self._deleted(gone))
