"""WorkflowRun lifecycle: one driving loop per run, fed by pod events and timers.

The replica's supervisor (operator/supervisor.py) starts :meth:`RunController.daemon`
for every WorkflowRun in the buckets it holds (again after a restart or a handover),
so every unfinished run is picked up from the store and the live pods. The loop owns
nothing it could lose: it starts from the store, and a write refused because the
bucket moved (:class:`~maestro.store.Fenced`) ends it.

:class:`RunController` is the façade the supervisor and the app use; each concern is
a module of its own, all sharing one :class:`~maestro.operator.known.Known`:

- :mod:`.starting`: the Workflow resolved, the store's run created once (retries too);
- :mod:`.controls`: spec edits (suspend, cancel, approvals) copied into the store;
- :mod:`.driving`: pass after pass until the run ends; :mod:`.ttl` deletes it after;
- :mod:`.publishing`: status patches coalesced, the Events outbox, metrics and traces;
- :mod:`.settings`: the tunables, the retry policy and the (injectable) clock.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from maestro.engine.driver import Waker
from maestro.engine.engine import Engine
from maestro.k8s.client import APIError, Kube
from maestro.operator.controls import Controls, controls_of_spec, editor_of
from maestro.operator.driving import Driver, namespace_gone
from maestro.operator.known import Known
from maestro.operator.logs import bind_run
from maestro.operator.metrics import Metrics
from maestro.operator.publishing import Publisher, StatusWriter, event_name
from maestro.operator.settings import RETRY_MAX_SECONDS, Clock, Settings, retry_delay
from maestro.operator.starting import Starter
from maestro.operator.tracing import RunTracer
from maestro.store import RunRecord

# What callers have always imported from here (the app, the supervisor, tests).
__all__ = [
    "RETRY_MAX_SECONDS",
    "Clock",
    "RunController",
    "Settings",
    "controls_of_spec",
    "editor_of",
    "event_name",
    "retry_delay",
]

log = logging.getLogger("maestro.operator")


class RunController:
    """Everything the operator does with WorkflowRuns."""

    def __init__(
        self,
        engine: Engine,
        kube: Kube,
        waker: Waker,
        metrics: Metrics,
        settings: Settings,
        tracer: RunTracer,
    ) -> None:
        """Share one engine, API client and waker between all runs."""
        self.engine = engine
        self.kube = kube
        self.waker = waker
        self.metrics = metrics
        self.settings = settings
        self.tracer = tracer
        self.known = Known()
        self.active: set[str] = set()  # run ids whose loop runs in this process
        metrics.queue_depth.set_function(lambda: float(waker.woken(self.active)))
        # Shared by the start and the first pass of every run (Settings.admissions).
        admitting = asyncio.Semaphore(settings.admissions)
        self.starter = Starter(engine, kube, metrics, settings, self.known, admitting)
        self.controls = Controls(engine, kube, waker, self.known)
        self.publisher = Publisher(engine, kube, metrics, tracer)
        self.driver = Driver(waker, settings, self.known, self.controls, self.publisher, admitting)

    async def ensure_run(self, body: Mapping[str, Any]) -> RunRecord:
        """The store's run for this WorkflowRun, created (with its snapshot) on first sight."""
        return await self.starter.ensure_run(body)

    async def sync_controls(self, body: Mapping[str, Any]) -> None:
        """Copy suspend/cancel/approvals from the spec into the store, then wake the run."""
        await self.controls.sync(body)

    def forget(self, uid: str) -> None:
        """Drop what this process knows of a run it stops driving (its bucket moved)."""
        run_id = self.known.ids.pop(uid, None)
        self.metrics.not_stored(uid, None)
        if run_id is None:
            return
        self.known.drop(run_id)
        self.engine.forget(run_id)

    async def on_delete(self, body: Mapping[str, Any]) -> None:
        """Stop the run's pods and record the cancellation before the object goes."""
        meta = body["metadata"]
        run = await self.engine.store.find_run(meta["namespace"], meta["uid"])
        if run is not None and not run.phase.finished:
            try:
                gone = await self.kube.namespace_terminating(meta["namespace"])
            except APIError:
                gone = False  # the API is down: the cancel itself matters more than its wording
            why = namespace_gone(meta["namespace"]) if gone else "the WorkflowRun was deleted"
            await self.engine.abort(run.id, why)
            log.info("run %s/%s cancelled: resource deleted", meta["namespace"], meta["name"])
        if run is not None:
            self.known.drop(run.id)
        self.known.ids.pop(meta["uid"], None)
        self.metrics.not_stored(meta["uid"], None)

    async def daemon(self, body: Mapping[str, Any], stopped: Any) -> None:
        """Drive one WorkflowRun until it finishes (and its TTL, if any, expires)."""
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        bind_run(namespace, name)  # this daemon's task logs about this run only
        writer = StatusWriter(
            self.kube,
            self.metrics,
            namespace,
            name,
            self.settings.status_interval,
            self.settings.clock,
        )
        previous = list((body.get("status") or {}).get("conditions") or [])
        writer.written = dict(body.get("status") or {})
        run = await self.starter.start(body, writer, previous, stopped)
        if run is None:
            return
        bind_run(namespace, name, run.id)
        self.metrics.not_stored(meta["uid"], None)
        self.active.add(run.id)
        try:
            await self.driver.drive(run, body, writer, previous, stopped)
        finally:
            self.active.discard(run.id)
            # Held only while this daemon drives it: a daemon started again (a bucket
            # handed back, an operator restart) loads it from the store.
            self.engine.forget(run.id)
