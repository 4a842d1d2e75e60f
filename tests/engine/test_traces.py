"""The span tree RunTracer builds from a real run's event log (in-memory exporter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kit import Harness, sh, spec_of
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from maestro.operator.tracing import RunTracer, trace_id_hex


async def test_span_tree_of_a_run_with_a_retry_and_a_finally_task(
    h_sqlite: Harness, tmp_path: Path
) -> None:
    once = tmp_path / "failed-once"
    flaky = f"if [ -e {once} ]; then exit 0; fi; touch {once}; exit 3"
    spec = spec_of(
        [sh("build", flaky, retries={"limit": 1, "backoffSeconds": 0})],
        **{"finally": [sh("cleanup", "true")]},
    )
    run = await h_sqlite.run(spec)
    assert run.phase.value == "Succeeded"
    exporter = InMemorySpanExporter()
    tracer = RunTracer(SimpleSpanProcessor(exporter))
    assert tracer.trace_id(run.id) == trace_id_hex(run.id)
    latest = await h_sqlite.store.latest_attempts(run.id)
    for e in await h_sqlite.store.events(run.id):
        tracer.observe_event(e, run, latest, spec)
    spans = exporter.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert [r.name for r in roots] == ["run run"]
    root = roots[0]
    assert format(root.context.trace_id, "032x") == trace_id_hex(run.id)
    assert root.attributes is not None
    assert root.attributes["maestro.phase"] == "Succeeded"

    def key(span: Any) -> tuple[str, int]:
        return span.attributes["maestro.task"], span.attributes["maestro.attempt"]

    children = sorted((s for s in spans if s.parent is not None), key=key)
    assert [key(s) for s in children] == [("build", 1), ("build", 2), ("cleanup", 1)]
    for span in children:
        assert span.parent is not None
        assert span.parent.span_id == root.context.span_id
        assert span.context.trace_id == root.context.trace_id
        assert root.start_time <= span.start_time <= span.end_time <= root.end_time
    first, second, cleanup = (dict(s.attributes or {}) for s in children)
    assert (first["maestro.phase"], first["maestro.reason"]) == ("Failed", "Error")
    assert not children[0].status.is_ok
    assert second["maestro.phase"] == "Succeeded"
    assert first["maestro.executor"] == "container"
    assert (first["maestro.finally"], cleanup["maestro.finally"]) == (False, True)

    # A restarted operator sees only the events after it started: the same run still lands
    # under the same root span, and an attempt it saw start only in the store keeps its start.
    again = InMemorySpanExporter()
    other = RunTracer(SimpleSpanProcessor(again))
    events = await h_sqlite.store.events(run.id)
    cleanup_started = next(
        i for i, e in enumerate(events) if e.task == "cleanup" and e.to_phase == "Running"
    )
    for e in events[cleanup_started + 1 :]:
        other.observe_event(e, run, latest, spec)
    replayed = {s.name: s for s in again.get_finished_spans()}
    assert replayed["run run"].context.span_id == root.context.span_id
    assert replayed["run run"].context.trace_id == root.context.trace_id
    original = next(s for s in children if s.name == "task cleanup")
    assert replayed["task cleanup"].start_time == original.start_time
    assert replayed["task cleanup"].parent is not None
    assert replayed["task cleanup"].parent.span_id == root.context.span_id


def test_tracing_is_off_without_an_endpoint(monkeypatch: Any) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    tracer = RunTracer.configure(None)
    assert not tracer.enabled
    assert tracer.trace_id("some-run") is None
