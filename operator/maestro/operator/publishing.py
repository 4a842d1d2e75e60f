"""What a run shows the world: its status (coalesced), its Kubernetes Events, metrics
and traces.

The driver decides what a run's status is; this module decides when it is written
(:class:`StatusWriter`: at most one patch per interval, the final one at once) and
turns the store's event outbox into Kubernetes Events, each exactly once, feeding the
same events to the metrics and the tracer on the way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from maestro.api.models import WorkflowSpec
from maestro.engine.engine import Engine
from maestro.k8s.client import RUNS, Kube, PermanentAPIError
from maestro.operator.logs import event_line
from maestro.operator.metrics import Metrics
from maestro.operator.settings import Clock
from maestro.operator.tracing import RunTracer
from maestro.store import EventRecord, RunRecord

log = logging.getLogger("maestro.operator")


Build = Callable[[], dict[str, Any]]  # a run's status, built when it is written


class StatusWriter:
    """At most one status patch per interval per run; the final state always flushes.

    A pass offers how to build its status, not the status: one held back is built once,
    when it is written. Built on every pass, a 200-task chain spent a tenth of its CPU
    on statuses that the next pass's replaced before anyone saw them.
    """

    def __init__(
        self,
        kube: Kube,
        metrics: Metrics,
        namespace: str,
        name: str,
        interval: float,
        clock: Clock,
    ) -> None:
        """Nothing written yet; ``clock`` times the interval."""
        self.kube, self.metrics = kube, metrics
        self.namespace, self.name = namespace, name
        self.interval = interval
        self.clock = clock
        self.written: dict[str, Any] = {}
        self.pending: Build | None = None
        self.last_at = 0.0

    @staticmethod
    def _comparable(status: Mapping[str, Any]) -> dict[str, Any]:
        # Duration ticks every second: on its own it is no reason to write.
        return {k: v for k, v in status.items() if k != "duration"}

    def due_in(self) -> float | None:
        """Seconds until a held-back status may be written, None when nothing waits."""
        if self.pending is None:
            return None
        return max(0.0, self.last_at + self.interval - self.clock.monotonic())

    async def offer(self, build: Build, *, final: bool = False) -> dict[str, Any] | None:
        """Write now when allowed (the status built), otherwise hold it for :meth:`flush`
        (None)."""
        self.pending = build
        if final or self.clock.monotonic() - self.last_at >= self.interval:
            return await self.flush()
        return None

    async def flush(self) -> dict[str, Any] | None:
        """Build and write the held-back status, if any, unless it says nothing new: the
        status built (None when nothing was held)."""
        if self.pending is None:
            return None
        build, self.pending = self.pending, None
        status = build()
        if self._comparable(status) == self._comparable(self.written):
            return status
        await self.kube.patch_status(RUNS, self.namespace, self.name, status)
        self.metrics.status_patches.inc()
        self.written = status
        self.last_at = self.clock.monotonic()
        return status


_RUN_EVENTS = {
    (None, "Running"): ("RunStarted", False),
    ("Pending", "Running"): ("RunStarted", False),
    ("Suspended", "Running"): ("RunResumed", False),
    (None, "Suspended"): ("RunSuspended", False),
    (None, "Succeeded"): ("RunSucceeded", False),
    (None, "Failed"): ("RunFailed", True),
    (None, "Cancelled"): ("RunCancelled", True),
}


def _run_event(from_phase: str | None, to_phase: str | None) -> tuple[str, bool] | None:
    """The Event reason (and whether a warning) of a run's phase change, if any."""
    found = _RUN_EVENTS.get((from_phase, to_phase or "")) or _RUN_EVENTS.get((None, to_phase or ""))
    if found is None or (found[0] == "RunStarted" and from_phase not in (None, "Pending")):
        return None
    return found


def announced(kind: str, from_phase: str | None, to_phase: str | None) -> bool:
    """Whether a store event becomes a Kubernetes Event (the engine's outbox filter: the
    others, most task phase changes, are logged, measured and traced from memory)."""
    if kind == "RunPhase":
        return _run_event(from_phase, to_phase) is not None
    return (kind == "TaskPhase" and to_phase == "Failed") or kind == "Approved"


def k8s_event(e: EventRecord) -> tuple[str, str, bool] | None:
    """The Kubernetes Event (reason, message, warning) for a store event, if any."""
    if e.kind == "RunPhase":
        found = _run_event(e.from_phase, e.to_phase)
        return None if found is None else (found[0], e.message or e.to_phase or "", found[1])
    if e.kind == "TaskPhase" and e.to_phase == "Failed":
        reason = "TaskTimedOut" if e.reason == "TimedOut" else "TaskFailed"
        return reason, f"{e.task} attempt {e.attempt}: {e.message or 'failed'}", True
    if e.kind == "Approved":
        by = f"{e.task} approved by {e.actor or 'unknown'}"
        return "TaskApproved", by + (f": {e.message}" if e.message else ""), False
    return None


def event_name(run: RunRecord, event_id: int) -> str:
    """The Kubernetes Event's name for one store event: posting it twice is a 409."""
    prefix = run.name[:200].rstrip(".-")
    return f"{prefix}.{run.id[:8]}.{event_id}"


class Publisher:
    """Empties runs' event outboxes into Kubernetes Events, metrics and traces."""

    def __init__(self, engine: Engine, kube: Kube, metrics: Metrics, tracer: RunTracer) -> None:
        """Shared by every run's driver."""
        self.engine, self.kube, self.metrics, self.tracer = engine, kube, metrics, tracer

    async def post_events(
        self,
        run: RunRecord,
        body: Mapping[str, Any],
        latest: Mapping[str, Any],
        spec: WorkflowSpec,
    ) -> None:
        """Empty the run's outbox: each store event's Kubernetes Event, exactly once.

        An event is marked posted only after its Event exists; the Event's name is
        derived from the store event, so a crash between the two posts nothing twice.
        """
        done: list[int] = []
        try:
            for e in await self.engine.pending_events(run.id):
                self.metrics.observe_event(e, run, latest, spec)
                self.tracer.observe_event(e, run, latest, spec)
                text, extra = event_line(e)
                log.info(text, extra=extra)
                try:
                    await self._record_event(run, body, e)
                except PermanentAPIError as err:  # refused for good (RBAC, a deleted namespace)
                    log.warning("run %s/%s: event not posted: %s", run.namespace, run.name, err)
                done.append(e.id)
        finally:
            # Also when a post failed for now: what was posted leaves the outbox, the rest
            # stays for the pass that is retried shortly.
            await self.engine.mark_posted(run.id, done)

    async def _record_event(self, run: RunRecord, body: Mapping[str, Any], e: EventRecord) -> None:
        found = k8s_event(e)
        if found is not None:
            reason, message, warning = found
            await self.kube.emit_event(
                {
                    "apiVersion": "maestro.dev/v1alpha1",
                    "kind": "WorkflowRun",
                    "metadata": body["metadata"],
                },
                reason=reason,
                message=message,
                warning=warning,
                name=event_name(run, e.id),
            )
