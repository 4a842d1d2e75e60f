"""Driving a started run: pass after pass of the engine until the run finishes.

Each pass reconciles the run, publishes what changed (:mod:`.publishing`) and says how
long to wait: at once after progress, until a timer or the next status write is due,
at most :data:`RESYNC_SECONDS`. Pod events and spec edits wake it earlier (the
waker). No error ends the loop: only the run's end, its resource's deletion, the
supervisor's stop flag or a fenced write (its bucket moved).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from maestro.engine.driver import Waker
from maestro.engine.engine import Engine
from maestro.k8s.client import Kube, NamespaceTerminating, NotFound
from maestro.operator.controls import Controls
from maestro.operator.known import Known
from maestro.operator.logs import log_trouble
from maestro.operator.metrics import Metrics
from maestro.operator.publishing import Publisher, StatusWriter
from maestro.operator.settings import (
    RETRY_MAX_SECONDS,
    STORE_RETRY_SECONDS,
    Settings,
    retry_delay,
)
from maestro.operator.status import run_status
from maestro.operator.tracing import RunTracer
from maestro.operator.ttl import expire
from maestro.store import Fenced, RunRecord, StoreError

log = logging.getLogger("maestro.operator")

# Even with no event, a run is looked at this often (a missed watch event heals).
RESYNC_SECONDS = 30.0
# Specs larger than this are not copied into status (etcd objects are capped at 1.5 MiB).
MAX_SPEC_IN_STATUS = 256 * 1024


def namespace_gone(namespace: str) -> str:
    """The cancel message of a run whose namespace is being deleted."""
    return f"cancelled: namespace {namespace} is being deleted"


class Driver:
    """The loop of every started run in this process (one call of :meth:`drive` each)."""

    def __init__(
        self,
        waker: Waker,
        settings: Settings,
        known: Known,
        controls: Controls,
        publisher: Publisher,
        admitting: asyncio.Semaphore,
    ) -> None:
        """The controller's shared parts; the engine, API client, metrics and tracer are
        the publisher's (one of each per controller). A run's first pass holds one of
        the ``admitting`` slots (see Settings.admissions)."""
        self.waker, self.settings = waker, settings
        self.admitting = admitting
        self.known, self.controls, self.publisher = known, controls, publisher
        self.engine: Engine = publisher.engine
        self.kube: Kube = publisher.kube
        self.metrics: Metrics = publisher.metrics
        self.tracer: RunTracer = publisher.tracer

    async def drive(
        self,
        run: RunRecord,
        body: Mapping[str, Any],
        writer: StatusWriter,
        previous: list[Any],
        stopped: Any,
    ) -> None:
        """Pass after pass until the run finishes; no error ends the loop early.

        A store outage is waited out; an API error or a bug is retried with a short
        capped backoff; a namespace being deleted cancels the run.
        """
        failures = 0
        synced = False
        include_spec = len(str(run.spec)) <= MAX_SPEC_IN_STATUS
        trace_id = self.tracer.trace_id(run.id)
        while not stopped:
            try:
                async with self.admitting if not synced else contextlib.nullcontext():
                    if not synced:
                        if trace_id is not None and run.trace_id != trace_id:
                            await self.engine.store.set_trace_id(run.id, trace_id)
                        await self.controls.sync(body)
                        synced = True
                    timeout = await self._pass(
                        run.id, body, writer, previous, stopped, include_spec, trace_id
                    )
                failures = 0
                if isinstance(timeout, RunRecord):  # finished: deleted when its TTL ends
                    await expire(self.kube, self.settings.clock, timeout, body, stopped)
                    return
            except Fenced:
                raise  # the bucket moved: its new holder drives the run
            except StoreError as err:
                log.warning(
                    "run %s/%s: store unavailable, retrying: %s", run.namespace, run.name, err
                )
                await stopped.wait(STORE_RETRY_SECONDS)
                continue
            except NamespaceTerminating:
                await self._namespace_deleted(run, stopped)
                continue  # the next pass writes the Cancelled status (or finds it gone)
            except Exception as err:  # a pass's trouble never ends the driver
                failures += 1
                log_trouble(run.namespace, run.name, err)
                await stopped.wait(retry_delay(failures))
                continue
            if timeout is None:
                return
            if timeout > 0:
                await self._wait(run.id, timeout, stopped)
            if writer.due_in() == 0.0:
                with contextlib.suppress(NotFound):
                    await writer.flush()

    async def _namespace_deleted(self, run: RunRecord, stopped: Any) -> None:
        """Record the run Cancelled; on trouble wait a little (the next pass tries again)."""
        try:
            await self.engine.abort(run.id, namespace_gone(run.namespace))
        except Exception as err:  # the loop must go on: the next pass raises it again
            log_trouble(run.namespace, run.name, err)
            await stopped.wait(RETRY_MAX_SECONDS)
            return
        log.info("run %s/%s cancelled: its namespace is being deleted", run.namespace, run.name)

    async def _pass(
        self,
        run_id: str,
        body: Mapping[str, Any],
        writer: StatusWriter,
        previous: list[Any],
        stopped: Any,
        include_spec: bool,
        trace_id: str | None,
    ) -> float | RunRecord | None:
        """One reconcile, its Events and status: how long to wait; the run once it has
        finished (its TTL is waited out by the caller, holding no admission slot); None
        when its WorkflowRun is gone."""
        meta = body["metadata"]
        started = time.perf_counter()  # a measurement only: decisions use the clock
        step = await self.engine.reconcile(run_id)
        self.metrics.reconcile_seconds.observe(time.perf_counter() - started)
        run, latest = step.run, step.latest
        spec, _ = self.engine.spec_of(run)
        await self.publisher.post_events(run, body, latest, spec)
        now = self.settings.clock.now()
        generation = self.known.generations.get(run.id, meta.get("generation"))

        def build() -> dict[str, Any]:
            status = run_status(
                run,
                spec,
                latest,
                live_message=step.decision.message,
                generation=generation,
                previous_conditions=writer.written.get("conditions") or previous,
                now=now,
                include_spec=include_spec,
            )
            if trace_id is not None:
                status["traceId"] = trace_id
            return status

        try:
            status = await writer.offer(build, final=run.phase.finished)
        except NotFound:
            return None  # the WorkflowRun is gone; the delete handler records it
        if run.phase.finished:
            assert status is not None  # a final status is written at once
            self.known.finished.add(run.id)
            if run.parent_id is not None:
                self.waker(run.parent_id)  # its workflow task waits on this run
            self.known.observed[run.id] = int(generation or 1)
            live = int(body["metadata"].get("generation") or 1)
            if live > self.known.observed[run.id]:
                # An edit that came while the final status was being written.
                await self.controls.observe(meta, status, live, run.id)
            self.engine.forget(run.id)
            return run
        if step.again:
            return 0.0
        timeout = RESYNC_SECONDS
        if step.decision.wake_at is not None:
            timeout = min(timeout, max(0.0, (step.decision.wake_at - now).total_seconds()))
        due = writer.due_in()
        if due is not None:
            timeout = min(timeout, due)
        return timeout

    async def _wait(self, run_id: str, seconds: float, stopped: Any) -> None:
        """Until woken, ``seconds`` pass, or the supervisor stops the driver."""
        woken = asyncio.ensure_future(self.waker.wait(run_id, seconds))
        stop = asyncio.ensure_future(stopped.wait())
        try:
            await asyncio.wait({woken, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (woken, stop):
                fut.cancel()
