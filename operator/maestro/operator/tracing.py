"""OpenTelemetry traces of runs: one trace per run, one span per task attempt.

Off unless an OTLP endpoint is configured (``--otlp-endpoint`` or the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``); the exporter
speaks OTLP over HTTP and reads the other standard ``OTEL_*`` variables itself.

Spans are written from the store's event log when an attempt or the run ends, with the
recorded start and end times, not held open in memory: an operator restart (or another
replica taking over) loses nothing, and the ids are derived from the run id, so every
process puts a run's spans into the same trace under the same root span.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import datetime

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode

from maestro.api.models import WorkflowSpec
from maestro.api.phases import RunPhase
from maestro.store import AttemptRecord, EventRecord, RunRecord

_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def trace_ids(run_id: str) -> tuple[int, int]:
    """The run's trace id (128 bits) and root span id (64 bits), derived from its id."""
    digest = hashlib.sha256(run_id.encode()).digest()
    trace_id = int.from_bytes(digest[:16], "big") or 1
    span_id = int.from_bytes(digest[16:24], "big") or 1
    return trace_id, span_id


def trace_id_hex(run_id: str) -> str:
    """The trace id as tracing UIs show and search it (32 hex digits)."""
    return format(trace_ids(run_id)[0], "032x")


class _RunIds(RandomIdGenerator):
    """Random ids, except for a run's root span, whose ids are set just before it starts."""

    def __init__(self) -> None:
        self.root: ContextVar[tuple[int, int] | None] = ContextVar("maestro_root", default=None)

    def generate_trace_id(self) -> int:
        root = self.root.get()
        return root[0] if root else super().generate_trace_id()

    def generate_span_id(self) -> int:
        root = self.root.get()
        return root[1] if root else super().generate_span_id()


def _ns(at: datetime) -> int:
    return int(at.timestamp() * 1e9)


class RunTracer:
    """Turns a run's event log into spans; a disabled tracer does nothing."""

    def __init__(self, processor: SpanProcessor | None) -> None:
        """Export through ``processor``; None disables tracing."""
        self.enabled = processor is not None
        self._ids = _RunIds()
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": "maestro-operator"}), id_generator=self._ids
        )
        if processor is not None:
            self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer("maestro")
        self._starts: dict[tuple[str, str, int], datetime] = {}

    @classmethod
    def configure(cls, endpoint: str | None) -> RunTracer:
        """Export to ``endpoint`` or the one the environment names; disabled when neither."""
        if endpoint:
            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        if not any(os.environ.get(v) for v in _ENDPOINT_VARS):
            return cls(None)
        # Imported only when used: it pulls in protobuf and requests.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return cls(BatchSpanProcessor(OTLPSpanExporter()))

    def trace_id(self, run_id: str) -> str | None:
        """The run's trace id when traces are exported, for status and the store."""
        return trace_id_hex(run_id) if self.enabled else None

    def observe_event(
        self,
        e: EventRecord,
        run: RunRecord,
        latest: Mapping[str, AttemptRecord],
        spec: WorkflowSpec,
    ) -> None:
        """Record one new event-log entry: attempt and run ends become spans."""
        if not self.enabled:
            return
        if e.kind == "RunPhase" and e.to_phase and RunPhase(e.to_phase).finished:
            self._run_span(e, run)
        elif e.kind == "TaskPhase" and e.task is not None and e.attempt is not None:
            key = (run.id, e.task, e.attempt)
            if e.to_phase == "Running":
                self._starts[key] = e.at
            elif e.to_phase in ("Succeeded", "Failed", "Cancelled", "Skipped"):
                started = self._starts.pop(key, None)
                att = latest.get(e.task)
                if started is None and att is not None and att.attempt == e.attempt:
                    started = att.started_at  # it started before this process did
                self._attempt_span(e, run, spec, started or e.at)

    def _attempt_span(
        self, e: EventRecord, run: RunRecord, spec: WorkflowSpec, started: datetime
    ) -> None:
        trace_id, root_id = trace_ids(run.id)
        parent = trace.set_span_in_context(
            NonRecordingSpan(
                SpanContext(trace_id, root_id, is_remote=False, trace_flags=trace.TraceFlags(1))
            )
        )
        task = next((t for t in spec.all_tasks() if t.name == e.task), None)
        attributes: dict[str, str | int | bool] = {
            "maestro.task": e.task or "",
            "maestro.attempt": e.attempt or 0,
            "maestro.phase": e.to_phase or "",
            "maestro.reason": e.reason or "",
            "maestro.executor": task.kind if task else "unknown",
            "maestro.finally": any(t.name == e.task for t in spec.finally_),
        }
        span = self._tracer.start_span(
            f"task {e.task}",
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=attributes,
            start_time=_ns(started),
        )
        if e.to_phase == "Failed":
            span.set_status(Status(StatusCode.ERROR, e.message or e.reason or "failed"))
        span.end(end_time=_ns(e.at))

    def _run_span(self, e: EventRecord, run: RunRecord) -> None:
        token = self._ids.root.set(trace_ids(run.id))
        try:
            span = self._tracer.start_span(
                f"run {run.workflow_name or run.name}",
                context=trace.set_span_in_context(trace.INVALID_SPAN),
                kind=SpanKind.INTERNAL,
                attributes={
                    "maestro.namespace": run.namespace,
                    "maestro.run": run.name,
                    "maestro.run_id": run.id,
                    "maestro.workflow": run.workflow_name or "",
                    "maestro.phase": e.to_phase or "",
                    "maestro.reason": e.reason or "",
                },
                # From creation: the root covers every attempt, queueing included.
                start_time=_ns(run.created_at),
            )
        finally:
            self._ids.root.reset(token)
        if e.to_phase == "Failed":
            span.set_status(Status(StatusCode.ERROR, e.message or "failed"))
        span.end(end_time=_ns(e.at))
        for key in [k for k in self._starts if k[0] == run.id]:
            del self._starts[key]

    def shutdown(self) -> None:
        """Export what is buffered."""
        self._provider.shutdown()
