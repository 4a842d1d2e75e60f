"""Alert rules (promtool), the dashboard, and the metrics both of them read."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from maestro.operator.logs import JsonFormatter, RunContextFilter, bind_run
from maestro.operator.metrics import Metrics
from maestro.store import Store

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "manifests/monitoring"
CHART_FILES = REPO / "charts/maestro/files"
PROMQL_WORDS = {
    "sum", "max", "min", "by", "rate", "histogram_quantile", "le", "or", "without", "on",
    "increase", "job", "phase", "reason", "kind", "instance",
}  # fmt: skip


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """Debian's promtool (package prometheus, installed by hack/install-deps.sh)."""
    assert shutil.which("promtool"), "promtool missing: run hack/install-deps.sh"
    return subprocess.run(
        ["promtool", *args], cwd=MONITORING, capture_output=True, text=True, check=False
    )


def test_promtool_checks_the_rules() -> None:
    proc = promtool("check", "rules", "prometheus-rules.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    proc = promtool("test", "rules", "prometheus-rules.test.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    tests = yaml.safe_load((MONITORING / "prometheus-rules.test.yaml").read_text())
    firing = {
        t["alertname"]
        for group in tests["tests"]
        for t in group["alert_rule_test"]
        if t["exp_alerts"]
    }
    assert firing == alerts


@pytest.mark.parametrize("name", ["prometheus-rules.yaml", "grafana-dashboard.json"])
def test_manifests_copy_matches_the_chart(name: str) -> None:
    assert (MONITORING / name).read_bytes() == (CHART_FILES / name).read_bytes(), (
        f"manifests/monitoring/{name} differs from charts/maestro/files/{name}: copy it over"
    )


def test_every_alert_has_a_runbook() -> None:
    docs = (REPO / "docs/operator.md").read_text()
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    for rule in (r for g in rules["groups"] for r in g["rules"]):
        anchor = rule["annotations"]["runbook_url"].rsplit("#", 1)[1]
        assert f"### {rule['alert']}" in docs
        assert anchor == rule["alert"].lower()


def referenced_metrics() -> set[str]:
    """Metric names the dashboard and the alert rules query."""
    dash = json.loads((CHART_FILES / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    names = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}|\[[^]]*\]|\"[^\"]*\"", "", expr)
        names |= {w for w in re.findall(r"[a-z_][a-z0-9_]*", expr) if w not in PROMQL_WORDS}
    return names - {"up"}  # Prometheus's own


async def test_dashboard_and_rules_read_only_exported_metrics(tmp_path: Path) -> None:
    store = await Store.open(f"sqlite:///{tmp_path}/m.db", migrate=True)
    try:
        metrics = Metrics(store, api_writes=lambda: 3.0, watching=lambda: True)
        await metrics.refresh()
        families = list(metrics.registry.collect())
    finally:
        await store.close()
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}
    # Families with labels have no samples before a first value: name them by their type.
    exported = {f.name + sfx for f in families for sfx in suffixes.get(f.type, [""])}
    assert referenced_metrics() - exported == set()
    assert {"maestro_runs", "maestro_queue_depth", "maestro_api_writes_total"} <= exported


async def test_json_lines_carry_the_bound_run() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RunContextFilter())
    log = logging.getLogger("maestro.test-logs")
    log.addHandler(handler)
    log.propagate = False

    async def drive(name: str, run_id: str) -> None:
        bind_run("team-a", name, run_id)
        await asyncio.sleep(0)  # interleave the two runs
        log.warning("pass", extra={"task": "build"})
        log.warning("done")

    try:
        await asyncio.gather(drive("r1", "id-1"), drive("r2", "id-2"))
        log.warning("not about a run")
    finally:
        log.removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    by_run = {(e.get("run"), e.get("run_id"), e.get("task"), e["message"]) for e in lines}
    assert by_run == {
        ("r1", "id-1", "build", "pass"),
        ("r1", "id-1", None, "done"),
        ("r2", "id-2", "build", "pass"),
        ("r2", "id-2", None, "done"),
        (None, None, None, "not about a run"),
    }
    assert all(e["namespace"] == "team-a" for e in lines if e.get("run"))
