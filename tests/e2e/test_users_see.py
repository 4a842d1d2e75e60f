"""What users see: health for GitOps tools, messages, approvals and the CLI (issue 13).

Each test is one defect a new user met, on the local control plane with the real
operator, PostgreSQL, `maestro` processes and outside clients (kstatus from
sigs.k8s.io/cli-utils and Argo CD's Lua VM, see fixtures/health.py).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_cli_cluster import maestro
from test_operator import events, fails, run, slow, store_history, workflow

from fixtures.control_plane import ControlPlane
from fixtures.health import Health
from fixtures.operator import OperatorProcess, apply, get, patch_spec, wait_phase

pytestmark = pytest.mark.e2e

RUN_KIND = "maestro.dev_WorkflowRun"
WORKFLOW_KIND = "maestro.dev_Workflow"
ADMIN = "maestro-e2e-admin"  # the user of the plane's kubeconfig (its client certificate)


def runs(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        cp.kubectl("get", "workflowruns", "-n", namespace, "-o", "json").stdout
    )["items"]
    return items


def workflows(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads(
        cp.kubectl("get", "workflows", "-n", namespace, "-o", "json").stdout
    )["items"]
    return items


def observed(obj: dict[str, Any]) -> bool:
    """Status and every condition describe the object's current generation."""
    gen = obj["metadata"]["generation"]
    status = obj.get("status") or {}
    conds = status.get("conditions") or []
    return (
        status.get("observedGeneration") == gen
        and bool(conds)
        and all(c.get("observedGeneration") == gen for c in conds)
    )


def wait_observed(cp: ControlPlane, namespace: str, kind: str, timeout: float = 60) -> None:
    """Until every object of ``kind`` shows its latest generation (bounded, generous)."""
    deadline = time.monotonic() + timeout
    while True:
        items = runs(cp, namespace) if kind == "run" else workflows(cp, namespace)
        behind = [
            (o["metadata"]["name"], o["metadata"]["generation"], o.get("status"))
            for o in items
            if not observed(o)
        ]
        if not behind:
            return
        assert time.monotonic() < deadline, f"never observed their generation: {behind}"
        time.sleep(0.5)


def wait_task(cp: ControlPlane, namespace: str, name: str, task: str, phase: str) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:
        obj = get(cp, namespace, "workflowrun", name)
        if ((obj.get("status") or {}).get("tasks") or {}).get(task, {}).get("phase") == phase:
            return obj
        assert time.monotonic() < deadline, obj.get("status")
        time.sleep(0.3)


# Measured (and documented in docs/gitops.md and docs/status.md): run -> (phase, kstatus,
# Argo CD health with the Lua check of docs/gitops.md).
EXPECTED_RUNS = {
    "ok": ("Succeeded", "Current", "Healthy"),
    "bad": ("Failed", "Failed", "Degraded"),
    "stopped": ("Cancelled", "Failed", "Degraded"),
    "running": ("Running", "InProgress", "Progressing"),
    "paused": ("Suspended", "InProgress", "Suspended"),
    "waiting": ("Pending", "Failed", "Degraded"),
    "on-invalid": ("Pending", "Failed", "Degraded"),
    "refused": ("Failed", "Failed", "Degraded"),
}
EXPECTED_WORKFLOWS = {
    "quick": ("Current", "Healthy"),
    "broken": ("Current", "Healthy"),  # valid: that its task fails is the runs' business
    "long": ("Current", "Healthy"),
    "cyclic": ("Failed", "Degraded"),
}


def _assert_health(cp: ControlPlane, namespace: str, health: Health) -> None:
    items = runs(cp, namespace)
    phases = {o["metadata"]["name"]: (o.get("status") or {}).get("phase") for o in items}
    kstatus, argo = health.kstatus(items), health.argo(items, RUN_KIND)
    got = {n: (phases[n], kstatus[n], argo[n]) for n in phases}
    assert got == EXPECTED_RUNS
    wfs = workflows(cp, namespace)
    wf_k, wf_a = health.kstatus(wfs), health.argo(wfs, WORKFLOW_KIND)
    assert {n: (wf_k[n], wf_a[n]) for n in wf_k} == EXPECTED_WORKFLOWS


def test_gitops_health_in_every_phase_and_after_spec_edits(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, health: Health
) -> None:
    cp = control_plane
    long = [slow({"name": "a"}, "300s"), {"name": "b", "dependsOn": ["a"]}]
    cyclic = [{"name": "a", "dependsOn": ["b"]}, {"name": "b", "dependsOn": ["a"]}]
    apply(
        cp,
        namespace,
        workflow("quick", [{"name": "a"}]),
        workflow("broken", [fails({"name": "a"})]),
        workflow("long", long),
        workflow("cyclic", cyclic),
        run("ok", "quick"),
        run("bad", "broken"),
        run("running", "long"),
        run("paused", "long", suspend=True),
        run("stopped", "long"),
        run("waiting", "missing"),
        run("on-invalid", "cyclic"),
        run("refused", "quick", params={"undeclared": "x"}),
    )
    for name, (phase, _, _) in EXPECTED_RUNS.items():
        if name != "stopped":
            wait_phase(cp, namespace, name, (phase,))
    wait_phase(cp, namespace, "stopped", ("Running",))
    patch_spec(cp, namespace, "stopped", {"cancel": True})
    wait_phase(cp, namespace, "stopped", ("Cancelled",))
    wait_observed(cp, namespace, "run")
    wait_observed(cp, namespace, "workflow")
    _assert_health(cp, namespace, health)

    # Every kind of edit a person or a GitOps sync makes, on every run, finished or not:
    # each bumps metadata.generation; health must come back to the same answer.
    before = {o["metadata"]["name"]: o["metadata"]["generation"] for o in runs(cp, namespace)}
    for name in EXPECTED_RUNS:
        patch_spec(cp, namespace, name, {"approvals": ["late-edit"]})
    patch_spec(cp, namespace, "ok", {"cancel": True})  # `maestro cancel` of a finished run
    patch_spec(cp, namespace, "bad", {"suspend": True})
    cp.kubectl(
        "patch", "-n", namespace, "workflow", "quick", "--type", "merge",
        "-p", json.dumps({"spec": {"concurrency": 3}}),
    )  # fmt: skip
    after = {o["metadata"]["name"]: o["metadata"]["generation"] for o in runs(cp, namespace)}
    assert all(after[n] > before[n] for n in before), (before, after)
    wait_observed(cp, namespace, "run")
    wait_observed(cp, namespace, "workflow")
    _assert_health(cp, namespace, health)
    # "late-edit" names no approval gate: nothing is recorded or announced for it.
    assert "TaskApproved" not in {e["reason"] for e in events(cp, namespace)}
    # The late cancel changed nothing in the finished run.
    assert get(cp, namespace, "workflowrun", "ok")["status"]["message"] == "all tasks completed"


def test_started_column_shows_how_long_a_run_has_been_running(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    apply(
        control_plane,
        namespace,
        workflow("long", [slow({"name": "a"}, "300s")]),
        run("r1", "long"),
    )
    started = wait_phase(control_plane, namespace, "r1", ("Running",))["status"]["startedAt"]
    # Until the run has been running for at least 3 s by the API server's clock.
    while True:
        age = control_plane.kubectl(
            "get", "mwr", "r1", "-n", namespace, "-o",
            "custom-columns=S:.status.startedAt", "--no-headers",
        ).stdout.strip()  # fmt: skip
        assert age == started
        table = control_plane.kubectl("get", "mwr", "r1", "-n", namespace).stdout
        header, row = table.splitlines()
        columns = dict(zip(header.split(), row.split(), strict=False))
        if columns["STARTED"] not in ("0s", "1s", "2s"):
            break
        time.sleep(0.5)
    assert re.fullmatch(r"\d+s", columns["STARTED"]), table
    # A running run has no duration yet: an empty cell rather than a stale "0s".
    duration = control_plane.kubectl(
        "get", "mwr", "r1", "-n", namespace, "-o",
        "custom-columns=D:.status.duration", "--no-headers",
    ).stdout.strip()  # fmt: skip
    assert duration == "<none>"


def test_edit_of_a_run_refused_at_start_is_observed(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    apply(
        control_plane,
        namespace,
        workflow("quick", [{"name": "a"}]),
        run("r1", "quick", params={"typo": "x"}),
    )
    wait_phase(control_plane, namespace, "r1", ("Failed",))
    patch_spec(control_plane, namespace, "r1", {"approvals": ["x"]})
    wait_observed(control_plane, namespace, "run", timeout=30)


def test_retry_reruns_finally_tasks_and_reuses_only_succeeded_main_tasks(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    tasks = [{"name": "ok"}, fails({"name": "flaky", "dependsOn": ["ok"]})]
    final = [{"name": n, "container": {"image": "busybox"}} for n in ("cleanup", "notify")]
    wf = workflow("retryable", tasks, **{"finally": final})
    apply(control_plane, namespace, wf, run("r1", "retryable"))
    first = wait_phase(control_plane, namespace, "r1")["status"]
    assert first["tasks"]["cleanup"]["phase"] == "Succeeded"
    retried = maestro(control_plane, namespace, "retry", "r1")
    assert retried.returncode == 0, retried.stderr
    name = retried.stdout.strip()
    status = wait_phase(control_plane, namespace, name)["status"]
    assert status["tasks"]["ok"]["reason"] == "Reused"
    for task in ("flaky", "cleanup", "notify"):
        assert status["tasks"][task].get("reason") != "Reused", status["tasks"][task]
        assert status["tasks"][task]["podName"].startswith(name), status["tasks"][task]
    assert status["tasks"]["cleanup"]["phase"] == "Succeeded"


def test_timeouts_say_what_happened(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, postgres_url: str
) -> None:
    apply(
        control_plane,
        namespace,
        workflow("slowpoke", [{**slow({"name": "slow"}, "300s"), "timeoutSeconds": 2}]),
        workflow("gated", [{"name": "gate", "approval": {}, "timeoutSeconds": 2}]),
        run("r1", "slowpoke"),
        run("r2", "gated"),
    )
    expected = {
        "r1": "task 'slow' failed: attempt 1 timed out after 2s",
        "r2": "task 'gate' failed: approval timed out after 2s",
    }
    for name, message in expected.items():
        obj = wait_phase(control_plane, namespace, name)
        assert obj["status"]["phase"] == "Failed"
        assert obj["status"]["message"] == message  # status
        stored, _, _ = store_history(postgres_url, namespace, obj["metadata"]["uid"])
        assert stored.message == message  # the store
        posted = {
            e["message"]
            for e in events(control_plane, namespace)
            if e["reason"] == "RunFailed" and e["involvedObject"]["name"] == name
        }
        assert posted == {message}  # the RunFailed Event


def _gated(name: str = "gated") -> dict[str, Any]:
    tasks = [
        {"name": "gate", "approval": {"message": "Ship {{ params.version }} to prod?"}},
        {"name": "after", "dependsOn": ["gate"]},
    ]
    return workflow(name, tasks, params=[{"name": "version"}])


def test_approvals_show_the_message_and_record_who_approved(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, postgres_url: str
) -> None:
    cp = control_plane
    apply(
        cp,
        namespace,
        _gated(),
        *(run(n, "gated", params={"version": "1.2"}) for n in ("r1", "r2", "r3")),
    )
    for name in ("r1", "r2", "r3"):
        obj = wait_task(cp, namespace, name, "gate", "Running")
    asked = "waiting for approval: Ship 1.2 to prod?"
    assert obj["status"]["tasks"]["gate"]["message"] == asked  # status
    shown = maestro(cp, namespace, "get", "r1")
    assert asked in shown.stdout  # maestro get

    # From the CLI: the caller's user as the API server knows it, with a comment.
    approved = maestro(cp, namespace, "approve", "r1", "gate", "-m", "checked the canary")
    assert approved.returncode == 0, approved.stderr
    assert approved.stdout.strip() == f"approved gate in r1 as {ADMIN}"
    # From a spec edit: its field manager, or an explicit `by`.
    patch_spec(cp, namespace, "r2", {"approvals": ["gate"]})
    patch_spec(
        cp, namespace, "r3", {"approvals": ["gate"], "approvalNotes": {"gate": {"by": "bot"}}}
    )
    who = {"r1": ADMIN, "r2": "kubectl-patch", "r3": "bot"}
    posted = {}
    for name, actor in who.items():
        obj = wait_phase(cp, namespace, name)
        assert obj["status"]["phase"] == "Succeeded"
        _, _, history = store_history(postgres_url, namespace, obj["metadata"]["uid"])
        approvals = [(e.task, e.actor) for e in history if e.kind == "Approved"]
        assert approvals == [("gate", actor)]
        posted[name] = [
            e["message"]
            for e in events(cp, namespace)
            if e["reason"] == "TaskApproved" and e["involvedObject"]["name"] == name
        ]
    assert posted == {
        "r1": [f"gate approved by {ADMIN}: checked the canary"],
        "r2": ["gate approved by kubectl-patch"],
        "r3": ["gate approved by bot"],
    }
    run_id = get(cp, namespace, "workflowrun", "r1")["status"]["runId"]
    shown = maestro(cp, None, "history", run_id, "--database-url", postgres_url)
    assert shown.returncode == 0, shown.stderr
    # The events table: kind, who and the comment on one line.
    assert any(
        "Approved" in line and ADMIN in line and "checked the canary" in line
        for line in shown.stdout.splitlines()
    ), shown.stdout


def test_cancel_says_who_cancelled(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    cp = control_plane
    apply(cp, namespace, _gated(), *(run(n, "gated", params={"version": "1"}) for n in "ab"))
    wait_task(cp, namespace, "a", "gate", "Running")
    wait_task(cp, namespace, "b", "gate", "Running")
    assert maestro(cp, namespace, "cancel", "a").returncode == 0
    patch_spec(cp, namespace, "b", {"cancel": True})
    assert wait_phase(cp, namespace, "a")["status"]["message"] == f"cancelled by {ADMIN}"
    assert wait_phase(cp, namespace, "b")["status"]["message"] == "cancelled by kubectl-patch"


def _context_kubeconfig(cp: ControlPlane, namespace: str, tmp_path: Path) -> Path:
    config = yaml.safe_load(cp.kubeconfig.read_text())
    for ctx in config["contexts"]:
        ctx["context"]["namespace"] = namespace
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


def test_cli_follows_kubectl_conventions(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    cp = control_plane
    tasks = [{"name": "deploy", "dependsOn": ["build"]}, {"name": "build"}]
    ordered = workflow(
        "ordered",
        tasks,
        **{"finally": [{"name": "a-cleanup", "container": {"image": "busybox"}}]},
        params=[{"name": "env"}],
    )
    apply(cp, namespace, ordered)
    # Namespace from the kubeconfig's current context, as kubectl does.
    kubeconfig = _context_kubeconfig(cp, namespace, tmp_path)
    submitted = maestro(
        cp, None, "submit", "ordered", "-p", "env=prod", "--wait", kubeconfig=kubeconfig
    )
    assert submitted.returncode == 0, submitted.stderr
    name = submitted.stdout.strip()
    listed = maestro(cp, None, "get", "-o", "json", kubeconfig=kubeconfig)
    assert [o["metadata"]["name"] for o in json.loads(listed.stdout)["items"]] == [name]
    everywhere = maestro(cp, None, "get", "-A", "-o", "yaml")
    assert name in {o["metadata"]["name"] for o in yaml.safe_load(everywhere.stdout)["items"]}
    one = maestro(cp, namespace, "get", name, "-o", "json")
    assert json.loads(one.stdout)["status"]["phase"] == "Succeeded"

    # DAG order, finally last; every line fits 80 columns, names unbroken.
    table = maestro(cp, namespace, "get", name, columns=80).stdout
    cells = [line.split()[1] for line in table.splitlines() if line.startswith("│")]
    assert [c for c in cells if c != "│"] == ["build", "deploy", "a-cleanup"], table
    out = maestro(cp, namespace, "get", columns=80).stdout
    assert max(map(len, out.splitlines())) <= 80, out
    assert re.search(rf"\b{name}\b", out), out
    # With -A the (long) test namespaces come first: only the message may be cut.
    everywhere_table = maestro(cp, namespace, "get", "-A", columns=80).stdout
    assert re.search(rf"\b{namespace}\s+{name}\b", everywhere_table), everywhere_table
    # -o wide is kubectl's: every column whole, whatever the width.
    wide = maestro(cp, namespace, "get", "-o", "wide", columns=80).stdout
    run_id = get(cp, namespace, "workflowrun", name)["status"]["runId"]
    assert run_id in wide, wide
    assert "all tasks completed" in wide, wide

    # Every mistake: non-zero exit and one clear line.
    mistakes = {
        ("approve", name, "nope"): f"Error: run '{name}' already Succeeded: nothing to approve",
        ("submit", "no-such-workflow"): (
            f"Error: workflow 'no-such-workflow' not found in namespace '{namespace}'"
        ),
        ("submit", "ordered", "-p", "env=x", "-p", "colour=red"): (
            "Error: workflow 'ordered': params.colour: not declared by the workflow (declared: env)"
        ),
        ("submit", "ordered"): (
            "Error: workflow 'ordered': params.env: required (no default) but not given"
        ),
        ("cancel", name): f"Error: run '{name}' already Succeeded: nothing to cancel",
        ("logs", name): f"Error: no logs could be fetched for run '{name}' (3 pods)",
        ("get", "no-such-run"): f"Error: workflowrun {namespace}/no-such-run not found",
    }
    for args, line in mistakes.items():
        proc = maestro(cp, namespace, *args)
        assert proc.returncode == 1, (args, proc.stdout, proc.stderr)
        assert proc.stderr.strip().splitlines()[-1] == line, (args, proc.stderr)
    assert [o["metadata"]["name"] for o in runs(cp, namespace)] == [name]  # none created

    # approve of a task that does not exist, on a run still waiting.
    apply(cp, namespace, _gated(), run("waits", "gated", params={"version": "1"}))
    wait_task(cp, namespace, "waits", "gate", "Running")
    for task, line in {
        "nope": "Error: run 'waits' has no task 'nope' (approval gates: gate)",
        "after": "Error: run 'waits' task 'after' is not an approval gate (approval gates: gate)",
    }.items():
        proc = maestro(cp, namespace, "approve", "waits", task)
        assert (proc.returncode, proc.stderr.strip()) == (1, line)
    assert "approvals" not in get(cp, namespace, "workflowrun", "waits")["spec"]


def test_submit_watch_exits_non_zero_when_the_run_fails(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    apply(control_plane, namespace, workflow("broken", [fails({"name": "a"})]))
    watched = maestro(control_plane, namespace, "submit", "broken", "--watch", "--interval", "0.3")
    assert watched.returncode == 1, watched.stderr
    assert "Failed" in watched.stdout


def test_logs_follow_waits_for_the_run(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    tasks = [slow({"name": "a"}, "3s"), {"name": "b", "dependsOn": ["a"]}]
    apply(control_plane, namespace, workflow("two", tasks), run("r1", "two"))
    wait_phase(control_plane, namespace, "r1", ("Running",))
    followed = maestro(control_plane, namespace, "logs", "-f", "r1")
    # It returned only once the run ended, having gone through both pods in order.
    assert get(control_plane, namespace, "workflowrun", "r1")["status"]["phase"] == "Succeeded"
    headers = [line.split()[1] for line in followed.stdout.splitlines() if line.startswith("==>")]
    assert headers == ["a", "b"], followed.stdout
