"""Prometheus metrics of the operator (one registry per operator instance)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """What ``/metrics`` serves."""

    def __init__(self, queue_depth: Callable[[], float], api_writes: Callable[[], float]) -> None:
        """Metrics whose values are read on scrape take a callable."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.runs = Gauge(
            "maestro_runs", "Runs this operator knows, by phase.", ["phase"], registry=r
        )
        self.attempts = Counter(
            "maestro_task_attempts_total",
            "Task attempts that ended, by result.",
            ["result"],
            registry=r,
        )
        self.task_seconds = Histogram(
            "maestro_task_duration_seconds",
            "Duration of finished task attempts.",
            ["kind"],
            buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 14400),
            registry=r,
        )
        self.status_patches = Counter(
            "maestro_status_patches_total", "WorkflowRun status patches sent.", registry=r
        )
        self.reconcile_seconds = Histogram(
            "maestro_reconcile_seconds",
            "Time of one engine pass over a run.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        depth = Gauge(
            "maestro_queue_depth", "Runs woken and waiting for their next pass.", registry=r
        )
        depth.set_function(queue_depth)
        writes = Gauge(
            "maestro_api_writes",
            "Write requests sent to the Kubernetes API since start.",
            registry=r,
        )
        writes.set_function(api_writes)
        self._phases: dict[str, str] = {}

    def run_phase(self, run_id: str, phase: str) -> None:
        """Record a run's current phase; the gauge is recounted when it changes."""
        if self._phases.get(run_id) == phase:
            return
        self._phases[run_id] = phase
        counts: dict[str, int] = {}
        for p in self._phases.values():
            counts[p] = counts.get(p, 0) + 1
        for p in ("Pending", "Running", "Suspended", "Succeeded", "Failed", "Cancelled"):
            self.runs.labels(phase=p).set(counts.get(p, 0))
