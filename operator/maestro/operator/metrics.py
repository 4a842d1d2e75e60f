"""Prometheus metrics of the operator (one registry per operator instance).

Names follow Prometheus conventions: the unit in the name, ``_total`` on counters, and
label values from small fixed sets (phases, executor kinds, failure reasons); a run id
or name is never a label, the traces and logs carry those.

Gauges about runs are recounted from the store on every scrape (:meth:`Metrics.refresh`)
instead of being kept by hand, so they cannot drift from it after restarts, deletions or
another replica's work. Runs the store has not seen yet (waiting for their Workflow, or
rejected before they start) are added from :meth:`Metrics.not_stored`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import UTC, datetime

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

from maestro.api.models import WorkflowSpec
from maestro.api.phases import RunPhase
from maestro.store import AttemptRecord, EventRecord, RunRecord, Store, StoreError

#: Phases whose oldest run's age is exported: the ones a run can be stuck in.
AGED_PHASES = (RunPhase.PENDING, RunPhase.RUNNING)
# Reasons are CamelCase words chosen by our code or Kubernetes; anything else is folded.
_REASON = re.compile(r"^[A-Z][A-Za-z]{0,39}$")

_SECONDS_BUCKETS = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400)
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class _CallbackCounter(Collector):
    """A counter whose value another object keeps (the API client counts its own writes)."""

    def __init__(self, name: str, documentation: str, value: Callable[[], float]) -> None:
        self.name, self.documentation, self.value = name, documentation, value

    def collect(self) -> Iterable[Metric]:
        yield CounterMetricFamily(self.name, self.documentation, value=self.value())


class Metrics:
    """What ``/metrics`` serves."""

    def __init__(
        self,
        store: Store,
        *,
        namespaces: Collection[str] = (),
        api_writes: Callable[[], float],
        watching: Callable[[], bool],
    ) -> None:
        """Values read on scrape come from callables; run gauges from ``store``."""
        self.store = store
        self.namespaces = tuple(namespaces)
        self._watching = watching
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes
        PlatformCollector(registry=r)
        self.runs = Gauge(
            "maestro_runs",
            "Runs by phase: those in the store plus those not started yet.",
            ["phase"],
            registry=r,
        )
        self.oldest_age = Gauge(
            "maestro_run_oldest_age_seconds",
            "Age of the oldest run in a phase (since creation when Pending, start when "
            "Running); 0 when there is none.",
            ["phase"],
            registry=r,
        )
        self.runs_finished = Counter(
            "maestro_runs_finished_total", "Runs that reached a final phase.", ["phase"], registry=r
        )
        self.run_seconds = Histogram(
            "maestro_run_duration_seconds",
            "Duration of finished runs, start to end.",
            ["phase"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.attempts = Counter(
            "maestro_task_attempts_total",
            "Task attempts that ended, by result.",
            ["result"],
            registry=r,
        )
        self.task_failures = Counter(
            "maestro_task_failures_total",
            "Failed task attempts, by reason.",
            ["reason"],
            registry=r,
        )
        self.task_seconds = Histogram(
            "maestro_task_duration_seconds",
            "Duration of finished task attempts.",
            ["kind"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.dependent_start = Histogram(
            "maestro_dependent_start_latency_seconds",
            "From the last dependency's end to the dependent task attempt's start.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.status_patches = Counter(
            "maestro_status_patches_total", "WorkflowRun status patches sent.", registry=r
        )
        self.reconcile_seconds = Histogram(
            "maestro_reconcile_seconds",
            "Time of one engine pass over a run.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.store_seconds = Histogram(
            "maestro_store_query_duration_seconds",
            "Time of one SQL statement against the store.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.store_errors = Counter(
            "maestro_store_errors_total",
            "Store statements or connections that failed.",
            registry=r,
        )
        self.store_up = Gauge(
            "maestro_store_up", "1 when the store answered the last scrape's ping.", registry=r
        )
        self.ready = Gauge(
            "maestro_ready",
            "1 when /readyz would answer 200 (store up, watches running).",
            registry=r,
        )
        self.queue_depth = Gauge(
            "maestro_queue_depth",
            "Runs being driven that were woken and wait for their next pass.",
            registry=r,
        )
        self.buckets_owned = Gauge(
            "maestro_buckets_owned",
            "Buckets of runs this replica holds the lease of (it drives their runs).",
            registry=r,
        )
        self.runs_driven = Gauge(
            "maestro_runs_driven", "Runs this replica drives right now.", registry=r
        )
        self.lease_renew_seconds = Histogram(
            "maestro_lease_renew_seconds",
            "Time of one lease renewal (heartbeat, renew, rebalance) in the store.",
            buckets=_FAST_BUCKETS,
            registry=r,
        )
        self.handovers = Counter(
            "maestro_bucket_handovers_total",
            "Buckets this replica claimed, gave back (rebalance, stop) or lost (expired).",
            ["direction"],
            registry=r,
        )
        for direction in ("claimed", "released", "lost"):
            self.handovers.labels(direction=direction)
        r.register(
            _CallbackCounter(
                "maestro_api_writes", "Write requests sent to the Kubernetes API.", api_writes
            )
        )
        self._not_stored: dict[str, tuple[RunPhase, datetime]] = {}
        for phase in RunPhase:
            self.runs.labels(phase=phase.value)
            if phase.finished:
                self.runs_finished.labels(phase=phase.value)
        for phase in AGED_PHASES:
            self.oldest_age.labels(phase=phase.value)
        self._instrument(store)

    def _instrument(self, store: Store) -> None:
        """Time every statement and count failures."""

        def observe(seconds: float | None) -> None:
            if seconds is None:
                self.store_errors.inc()
            else:
                self.store_seconds.observe(seconds)

        store.watch_statements(observe)

    def not_stored(self, uid: str, phase: RunPhase | None, since: datetime | None = None) -> None:
        """A run the store does not hold shows ``phase`` (None: it is stored now, or gone)."""
        if phase is None:
            self._not_stored.pop(uid, None)
        else:
            self._not_stored[uid] = (phase, since or datetime.now(UTC))

    def observe_event(
        self,
        e: EventRecord,
        run: RunRecord,
        latest: Mapping[str, AttemptRecord],
        spec: WorkflowSpec,
    ) -> None:
        """Count one new entry of a run's event log (each is seen once per process)."""
        if e.kind == "RunPhase" and e.to_phase and RunPhase(e.to_phase).finished:
            self.runs_finished.labels(phase=e.to_phase).inc()
            if run.started_at is not None:
                seconds = (e.at - run.started_at).total_seconds()
                self.run_seconds.labels(phase=e.to_phase).observe(max(0.0, seconds))
            return
        if e.kind != "TaskPhase" or e.task is None:
            return
        att = latest.get(e.task)
        task = next((t for t in spec.all_tasks() if t.name == e.task), None)
        if e.to_phase == "Running" and e.attempt == 1 and att is not None and task is not None:
            # Retries wait out their backoff: only a first attempt measures scheduling.
            ends = [latest[d].finished_at for d in task.depends_on if d in latest]
            if att.started_at is not None and ends and None not in ends:
                last = max(end for end in ends if end is not None)
                self.dependent_start.observe(max(0.0, (att.started_at - last).total_seconds()))
        if e.to_phase not in ("Succeeded", "Failed", "Cancelled", "Skipped"):
            return
        self.attempts.labels(result=e.to_phase).inc()
        if e.to_phase == "Failed":
            reason = e.reason or "Error"
            self.task_failures.labels(reason=reason if _REASON.match(reason) else "Other").inc()
        if att is not None and att.started_at and att.finished_at and att.attempt == e.attempt:
            self.task_seconds.labels(kind=task.kind if task else "unknown").observe(
                (att.finished_at - att.started_at).total_seconds()
            )

    def rejected(self) -> None:
        """A run failed before the store held it (invalid spec): it still counts as Failed."""
        self.runs_finished.labels(phase=RunPhase.FAILED.value).inc()

    async def refresh(self) -> None:
        """Recount the run gauges from the store; on an outage keep the last counts."""
        try:
            summary = await self.store.phase_summary(self.namespaces)
        except StoreError:
            self.store_up.set(0)
            self.ready.set(0)
            return
        self.store_up.set(1)
        self.ready.set(1 if self._watching() else 0)
        counts = {phase: count for phase, (count, _) in summary.items()}
        oldest = {phase: since for phase, (_, since) in summary.items() if since is not None}
        for phase, waiting_since in self._not_stored.values():
            counts[phase] = counts.get(phase, 0) + 1
            if phase not in oldest or waiting_since < oldest[phase]:
                oldest[phase] = waiting_since
        now = datetime.now(UTC)
        for phase in RunPhase:
            self.runs.labels(phase=phase.value).set(counts.get(phase, 0))
        for phase in AGED_PHASES:
            first = oldest.get(phase) if counts.get(phase) else None
            age = (now - first).total_seconds() if first is not None else 0.0
            self.oldest_age.labels(phase=phase.value).set(max(0.0, age))
