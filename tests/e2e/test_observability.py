"""Observability on the local control plane: Prometheus scraping the operator, metrics
against the store, one run's JSON log lines, and the OTLP traces of a run."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from test_operator import fails, run, workflow

from fixtures.control_plane import ControlPlane
from fixtures.operator import REPO, OperatorProcess, apply, free_port, wait_phase
from maestro.api.phases import RunPhase
from maestro.store import Store

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("crds")]

RULES = REPO / "manifests/monitoring/prometheus-rules.yaml"
DASHBOARD = REPO / "charts/maestro/files/grafana-dashboard.json"
FINISHED = ("Succeeded", "Failed", "Cancelled")


def start_operator(
    control_plane: ControlPlane, namespace: str, postgres_url: str, tmp_path: Path, *extra: str
) -> OperatorProcess:
    """An operator on this test's namespace, with extra command-line flags."""
    op = OperatorProcess(control_plane.kubeconfig, postgres_url, namespace, tmp_path, list(extra))
    op.start()
    return op


def apply_runs(control_plane: ControlPlane, namespace: str) -> None:
    """A mix: success with a dependency, a retried failure with a finally task, a run whose
    Workflow is missing (Pending, not in the store), and one rejected (Failed, not stored)."""
    apply(
        control_plane,
        namespace,
        workflow("chain", [{"name": "a"}, {"name": "b", "dependsOn": ["a"]}]),
        workflow(
            "flaky",
            [fails({"name": "build", "retries": {"limit": 1, "backoffSeconds": 0.2}}, "boom")],
            **{
                "finally": [
                    {"name": "cleanup", "container": {"image": "busybox", "command": ["true"]}}
                ]
            },
        ),
        run("ok", "chain"),
        run("bad", "flaky"),
        run("waiting", "missing"),
        run("rejected", "chain", params={"undeclared": "x"}),
    )


def metric_samples(text: str, name: str) -> dict[str, float]:
    """``{label-set: value}`` of one metric family in Prometheus text format."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            found[m.group(1) or ""] = float(m.group(2))
    return found


def store_phases(postgres_url: str, namespace: str) -> dict[str, int]:
    """Runs per phase, read from the store directly."""

    async def read() -> dict[str, int]:
        store = await Store.open(postgres_url)
        try:
            runs = await store.list_runs(namespace=namespace)
        finally:
            await store.close()
        counts: dict[str, int] = {}
        for r in runs:
            counts[r.phase.value] = counts.get(r.phase.value, 0) + 1
        return counts

    return asyncio.run(read())


def test_metrics_match_the_store_and_the_cluster(
    control_plane: ControlPlane, namespace: str, postgres_url: str, tmp_path: Path
) -> None:
    op = start_operator(control_plane, namespace, postgres_url, tmp_path)
    try:
        apply_runs(control_plane, namespace)
        for name in ("ok", "bad", "rejected"):
            wait_phase(control_plane, namespace, name)
        wait_phase(control_plane, namespace, "waiting", ("Pending",))
        text = op.get("/metrics")[1]
    finally:
        op.kill(signal.SIGTERM)
    runs = metric_samples(text, "maestro_runs")
    exported = {k.split('"')[1]: int(v) for k, v in runs.items()}
    # What kubectl shows, phase by phase, is what the gauge says.
    listed = json.loads(
        control_plane.kubectl("get", "-n", namespace, "workflowruns", "-o", "json").stdout
    )["items"]
    shown: dict[str, int] = {}
    for item in listed:
        phase = item["status"]["phase"]
        shown[phase] = shown.get(phase, 0) + 1
    assert shown == {"Succeeded": 1, "Failed": 2, "Pending": 1}
    assert {p: n for p, n in exported.items() if n} == shown
    assert set(exported) == {p.value for p in RunPhase}
    # The store holds the two runs that started; the other two are counted as not stored.
    assert store_phases(postgres_url, namespace) == {"Succeeded": 1, "Failed": 1}
    # Nothing is running: nothing is queued.
    assert metric_samples(text, "maestro_queue_depth") == {"": 0.0}
    finished = metric_samples(text, "maestro_runs_finished_total")
    assert finished['{phase="Failed"}'] == 2.0
    assert finished['{phase="Succeeded"}'] == 1.0
    assert sum(metric_samples(text, "maestro_task_failures_total").values()) == 2.0
    assert metric_samples(text, "maestro_store_up") == {"": 1.0}
    ages = metric_samples(text, "maestro_run_oldest_age_seconds")
    assert ages['{phase="Pending"}'] > 0  # the run waiting for its Workflow
    assert ages['{phase="Running"}'] == 0.0
    assert metric_samples(text, "maestro_dependent_start_latency_seconds_count") == {"": 1.0}
    # Never a run id or name as a label value.
    for line in text.splitlines():
        assert not re.search(r'="(ok|bad|waiting|rejected|[0-9a-f-]{36})"', line), line


class Prometheus:
    """A real Prometheus (Debian's package) scraping one target every second."""

    def __init__(self, tmp_path: Path, target: str) -> None:
        """Write its configuration; :meth:`start` runs it."""
        self.port = free_port()
        self.dir = tmp_path / "prometheus"
        self.dir.mkdir()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [{"job_name": "maestro", "static_configs": [{"targets": [target]}]}],
        }
        (self.dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Run it on loopback and wait until it answers."""
        self.proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=(self.dir / "log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                    return
            except OSError:
                assert self.proc.poll() is None, (self.dir / "log").read_text()
                assert time.monotonic() < deadline, (self.dir / "log").read_text()
                time.sleep(0.2)

    def api(self, path: str, **params: str) -> Any:
        """GET one API path; the ``data`` of a successful answer."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as rsp:
            body = json.loads(rsp.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[Any]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        result: list[Any] = data["result"]
        return result

    def stop(self) -> None:
        """SIGTERM and reap."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


@pytest.fixture
def prometheus_and_operator(
    control_plane: ControlPlane, namespace: str, postgres_url: str, tmp_path: Path
) -> Iterator[tuple[Prometheus, OperatorProcess]]:
    """An operator and a Prometheus scraping it (job ``maestro``)."""
    op = start_operator(control_plane, namespace, postgres_url, tmp_path)
    prom = Prometheus(tmp_path, f"127.0.0.1:{op.port}")
    try:
        prom.start()
        # Prometheus applies its targets a few seconds after it is ready: wait for a first
        # scrape, so counters are seen at 0 before the runs move them.
        deadline = time.monotonic() + 60
        while not prom.query('up{job="maestro"} == 1'):
            assert time.monotonic() < deadline, "Prometheus never scraped the operator"
            time.sleep(0.5)
        yield prom, op
    finally:
        prom.stop()
        op.kill(signal.SIGTERM)


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every dashboard target, Grafana variables filled in."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            expr = target["expr"].replace("$__rate_interval", "30s").replace("$job", "maestro")
            out.append((panel["title"], expr))
    return out


def alert_rules() -> list[dict[str, Any]]:
    """Every alerting rule of the rules file."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r for g in groups for r in g["rules"] if "alert" in r]


def signals(expr: str) -> list[str]:
    """What an alert compares to its threshold: ``a > 2`` gives ``a``; ``(x) or (y)`` both."""
    parts = re.split(r"\)\s+or\s+\(", expr.strip().strip("()")) if " or " in expr else [expr]
    return [re.sub(r"\s*(==|>|<)\s*[0-9.]+\s*$", "", p.strip()) for p in parts]


def test_prometheus_dashboard_and_alert_queries(
    control_plane: ControlPlane,
    namespace: str,
    prometheus_and_operator: tuple[Prometheus, OperatorProcess],
) -> None:
    prom, _ = prometheus_and_operator
    apply_runs(control_plane, namespace)
    for name in ("ok", "bad", "rejected"):
        wait_phase(control_plane, namespace, name)
    # Two more scrapes after the last change, so every rate has two points past it.
    time.sleep(3)
    assert prom.query('up{job="maestro"}')[0]["value"][1] == "1"

    empty = [(title, expr) for title, expr in dashboard_queries() if not prom.query(expr)]
    assert empty == [], "dashboard panels without data"

    # Two of the three finished runs failed: only the failure-rate alert has data (it is
    # pending, for 15m); a healthy operator with young runs trips nothing else.
    expected = {"MaestroRunFailureRateHigh"}
    rules = {r["name"]: r for g in prom.api("rules")["groups"] for r in g["rules"]}
    assert set(rules) == {r["alert"] for r in alert_rules()}
    for rule in alert_rules():
        loaded = rules[rule["alert"]]
        assert loaded["health"] == "ok", loaded  # Prometheus evaluated it without error
        result = prom.query(rule["expr"])
        if rule["alert"] in expected:
            assert result, rule["alert"]
            assert loaded["state"] == "pending", loaded
        else:
            assert result == [], rule["alert"]
            assert loaded["state"] == "inactive", loaded
        # What each alert compares to its threshold has data.
        for part in signals(rule["expr"]):
            assert prom.query(part), (rule["alert"], part)


def test_json_logs_tell_one_runs_story(
    control_plane: ControlPlane, namespace: str, postgres_url: str, tmp_path: Path
) -> None:
    op = start_operator(control_plane, namespace, postgres_url, tmp_path, "--log-format", "json")
    try:
        apply_runs(control_plane, namespace)
        bad = wait_phase(control_plane, namespace, "bad")
        ok = wait_phase(control_plane, namespace, "ok")
    finally:
        op.kill(signal.SIGTERM)
    lines = [json.loads(line) for line in op.log().splitlines() if line.startswith("{")]
    assert len(lines) == len(op.log().splitlines()), op.log()[-3000:]  # every line is JSON
    run_id = bad["status"]["runId"]
    story = [e for e in lines if e.get("run_id") == run_id]
    assert {(e["namespace"], e["run"]) for e in story} == {(namespace, "bad")}
    changes = {
        (e["task"], e["attempt"], e["message"].split(": ")[1].split(" (")[0])
        for e in story
        if e.get("event") == "TaskPhase"
    }
    assert {
        ("build", 1, "Running -> Failed"),
        ("build", 2, "Running -> Failed"),
        ("cleanup", 1, "Running -> Succeeded"),
    } <= changes
    assert any("boom" in e["message"] for e in story if e.get("task") == "build")
    assert any(e.get("event") == "RunPhase" and "-> Failed" in e["message"] for e in story)
    assert not any(e.get("run_id") == ok["status"]["runId"] for e in story)


class OtlpReceiver(ThreadingHTTPServer):
    """An in-process OTLP/HTTP endpoint keeping every span it is sent."""

    def __init__(self) -> None:
        """Listen on a free loopback port."""
        self.spans: list[Any] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                request = ExportTraceServiceRequest.FromString(body)
                for rs in request.resource_spans:
                    for ss in rs.scope_spans:
                        receiver.spans.extend(ss.spans)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


def test_traces_of_a_run_with_a_retry_and_a_finally_task(
    control_plane: ControlPlane,
    namespace: str,
    postgres_url: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = OtlpReceiver()
    thread = threading.Thread(target=receiver.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    endpoint = f"http://127.0.0.1:{receiver.server_address[1]}"
    op = start_operator(
        control_plane, namespace, postgres_url, tmp_path, "--otlp-endpoint", endpoint
    )
    try:
        apply_runs(control_plane, namespace)
        status = wait_phase(control_plane, namespace, "bad")["status"]
        wait_phase(control_plane, namespace, "ok")
        trace_id = status["traceId"]
        deadline = time.monotonic() + 30
        while True:
            mine = [s for s in receiver.spans if s.trace_id.hex() == trace_id]
            if any(not s.parent_span_id for s in mine) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        op.kill(signal.SIGTERM)
        receiver.shutdown()
    roots = [s for s in mine if not s.parent_span_id]
    assert [r.name for r in roots] == ["run flaky"]
    root = roots[0]

    def attrs(span: Any) -> dict[str, Any]:
        return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}

    assert attrs(root)["maestro.run_id"] == status["runId"]
    assert attrs(root)["maestro.phase"] == "Failed"
    children = sorted(
        (attrs(s)["maestro.task"], attrs(s)["maestro.attempt"], s) for s in mine if s.parent_span_id
    )
    assert [(t, a) for t, a, _ in children] == [("build", 1), ("build", 2), ("cleanup", 1)]
    for _, _, span in children:
        assert span.parent_span_id == root.span_id
        assert root.start_time_unix_nano <= span.start_time_unix_nano
        assert span.end_time_unix_nano <= root.end_time_unix_nano
    build1, build2, cleanup = (attrs(s) for _, _, s in children)
    assert build1["maestro.phase"] == build2["maestro.phase"] == "Failed"
    assert build1["maestro.executor"] == "container"
    assert build1["maestro.finally"] is False
    assert cleanup["maestro.phase"] == "Succeeded"
    assert cleanup["maestro.finally"] is True
    # The other run is a trace of its own.
    assert all(s.trace_id.hex() == trace_id for s in mine)
    assert len({s.trace_id.hex() for s in receiver.spans}) == 2

    async def stored_trace_id() -> str | None:
        store = await Store.open(postgres_url)
        try:
            return (await store.get_run(status["runId"])).trace_id
        finally:
            await store.close()

    assert asyncio.run(stored_trace_id()) == trace_id


def test_chart_renders_the_rules_and_the_dashboard(control_plane: ControlPlane) -> None:
    chart = str(REPO / "charts/maestro")
    off = control_plane.helm("template", "r", chart).stdout
    assert "PrometheusRule" not in off
    assert "grafana_dashboard" not in off
    rendered = control_plane.helm(
        "template",
        "r",
        chart,
        "--set",
        "prometheusRule.enabled=true",
        "--set",
        "prometheusRule.labels.release=prom",
        "--set",
        "grafanaDashboard.enabled=true",
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["metadata"]["labels"]["release"] == "prom"
    # The rules reach the cluster unrendered: their own {{ $labels }} templates intact.
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    (dash,) = [d for d in docs if d["kind"] == "ConfigMap" and "dashboard" in d["metadata"]["name"]]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dash["data"]["maestro-operator.json"]) == json.loads(DASHBOARD.read_text())
