"""The operator on a real API server (local control plane + kwok) and a real PostgreSQL."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.control_plane import ControlPlane
from fixtures.operator import REPO, OperatorProcess, apply, get, patch_spec, wait_phase
from fixtures.postgres import PostgresServer
from maestro.store import Store

pytestmark = pytest.mark.e2e

OUTPUT_REF = re.compile(r"tasks\.([a-z0-9-]+)\.outputs\.([\w-]+)")


def with_kwok_outputs(workflow: dict[str, Any]) -> dict[str, Any]:
    """kwok runs no command: give each task, as its termination message, every output
    another task reads (value 0, so comparisons in `when` hold)."""
    wf = copy.deepcopy(workflow)
    wanted: dict[str, dict[str, int]] = {}
    for key_task, key in OUTPUT_REF.findall(json.dumps(wf["spec"])):
        wanted.setdefault(key_task, {})[key] = 0
    for task in wf["spec"]["tasks"] + wf["spec"].get("finally", []):
        if "container" in task and task["name"] in wanted:
            annotations = (
                task["container"].setdefault("podMetadata", {}).setdefault("annotations", {})
            )
            annotations["maestro.dev/kwok-message"] = json.dumps(wanted[task["name"]])
    return wf


def workflow(name: str, tasks: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A Workflow manifest whose container tasks default to a busybox image."""
    full = []
    for t in tasks:
        t = dict(t)
        if not any(k in t for k in ("container", "http", "approval")):
            t["container"] = {"image": "busybox", "command": ["true"]}
        full.append(t)
    return {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"tasks": full, **spec},
    }


def run(name: str, workflow_name: str, **spec: Any) -> dict[str, Any]:
    """A WorkflowRun manifest referencing a Workflow."""
    return {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": name},
        "spec": {"workflowRef": {"name": workflow_name}, **spec},
    }


def fails(task: dict[str, Any], message: str = "boom") -> dict[str, Any]:
    """Make a container task's pod fail under kwok."""
    task = copy.deepcopy(task)
    task.setdefault("container", {"image": "busybox", "command": ["false"]})
    task["container"]["podMetadata"] = {
        "annotations": {"maestro.dev/kwok-result": "Failed", "maestro.dev/kwok-message": message}
    }
    return task


def slow(task: dict[str, Any], delay: str = "2s") -> dict[str, Any]:
    """Make a container task's pod take ``delay`` under kwok."""
    task = copy.deepcopy(task)
    task.setdefault("container", {"image": "busybox", "command": ["sleep", "2"]})
    task["container"]["podMetadata"] = {"annotations": {"maestro.dev/kwok-delay": delay}}
    return task


def task_pods(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    """Task pods Maestro created in ``namespace``."""
    out = cp.kubectl(
        "get", "pods", "-n", namespace, "-l", "maestro.dev/run-id", "-o", "json"
    ).stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def events(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    """Kubernetes Events in ``namespace``."""
    items: list[dict[str, Any]] = json.loads(
        cp.kubectl("get", "events", "-n", namespace, "-o", "json").stdout
    )["items"]
    return items


def store_history(url: str, namespace: str, uid: str) -> tuple[Any, list[Any], list[Any]]:
    """The run, its attempts and its events as the store has them."""

    async def read() -> tuple[Any, list[Any], list[Any]]:
        store = await Store.open(url)
        try:
            found = await store.find_run(namespace, uid)
            assert found is not None, "the store has no run for this WorkflowRun"
            return found, await store.attempts(found.id), await store.events(found.id)
        finally:
            await store.close()

    return asyncio.run(read())


@pytest.mark.parametrize(
    "example", ["hello.yaml", "fan-out-fan-in.yaml", "sdlc-parallel.yaml", "approval-gate.yaml"]
)
def test_examples_run_to_success(
    control_plane: ControlPlane,
    namespace: str,
    operator: OperatorProcess,
    postgres_url: str,
    example: str,
) -> None:
    wf = with_kwok_outputs(yaml.safe_load((REPO / "examples" / example).read_text()))
    name = wf["metadata"]["name"]
    apply(control_plane, namespace, wf, run("r1", name))
    if example == "approval-gate.yaml":
        waiting = wait_phase(control_plane, namespace, "r1", ("Running",))
        deadline = time.monotonic() + 60
        while "approve-release" not in (waiting.get("status") or {}).get("tasks", {}) or (
            waiting["status"]["tasks"]["approve-release"]["phase"] != "Running"
        ):
            assert time.monotonic() < deadline, waiting.get("status")
            time.sleep(0.3)
            waiting = get(control_plane, namespace, "workflowrun", "r1")
        assert "waiting for approval of approve-release" in waiting["status"]["message"]
        patch_spec(control_plane, namespace, "r1", {"approvals": ["approve-release"]})
    control_plane.kubectl(
        "wait", "-n", namespace, "--for=condition=Succeeded", "--timeout=120s", "workflowrun/r1"
    )
    obj = get(control_plane, namespace, "workflowrun", "r1")
    status = obj["status"]
    assert status["phase"] == "Succeeded"
    task_names = [t["name"] for t in wf["spec"]["tasks"] + wf["spec"].get("finally", [])]
    assert set(status["tasks"]) == set(task_names)
    assert status["progress"] == f"{len(task_names)}/{len(task_names)}"
    assert status["observedGeneration"] == obj["metadata"]["generation"]
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds == {
        "Ready": "True",
        "Succeeded": "True",
        "Reconciling": "False",
        "Stalled": "False",
    }
    assert status["workflowSpec"]["tasks"][0]["name"] == wf["spec"]["tasks"][0]["name"]
    reasons = {e["reason"] for e in events(control_plane, namespace)}
    assert {"RunStarted", "RunSucceeded"} <= reasons
    found, attempts, history = store_history(postgres_url, namespace, obj["metadata"]["uid"])
    assert found.phase.value == "Succeeded"
    assert {a.task for a in attempts} == set(task_names)
    assert history[-1].kind == "RunPhase"
    assert history[-1].to_phase == "Succeeded"
    container_tasks = [
        t for t in wf["spec"]["tasks"] + wf["spec"].get("finally", []) if "container" in t
    ]
    ran = [t for t in container_tasks if status["tasks"][t["name"]]["phase"] == "Succeeded"]
    assert len(task_pods(control_plane, namespace)) == len(ran)


def test_failing_task_retries_then_fails_the_run(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, postgres_url: str
) -> None:
    build = fails(
        {"name": "build", "retries": {"limit": 2, "backoffSeconds": 0.5}}, "compile error"
    )
    wf = workflow("retrying", [build, {"name": "after", "dependsOn": ["build"]}])
    apply(control_plane, namespace, wf, run("r1", "retrying"))
    obj = wait_phase(control_plane, namespace, "r1")
    status = obj["status"]
    assert status["phase"] == "Failed"
    assert "task 'build' failed" in status["message"]
    assert "compile error" in status["message"]
    assert status["tasks"]["build"]["attempts"] == 3
    assert status["tasks"]["after"]["phase"] == "Skipped"
    assert status["tasks"]["after"]["reason"] == "UpstreamFailed"
    assert sorted(j["metadata"]["name"] for j in task_pods(control_plane, namespace)) == [
        "r1-build-1",
        "r1-build-2",
        "r1-build-3",
    ]
    _, attempts, _ = store_history(postgres_url, namespace, obj["metadata"]["uid"])
    assert [(a.attempt, a.phase.value) for a in attempts if a.task == "build"] == [
        (1, "Failed"),
        (2, "Failed"),
        (3, "Failed"),
    ]
    conds = {c["type"]: c["status"] for c in status["conditions"]}
    assert conds["Succeeded"] == "False"
    assert conds["Stalled"] == "True"
    assert "TaskFailed" in {e["reason"] for e in events(control_plane, namespace)}


@pytest.mark.parametrize("fail_fast", [True, False])
def test_fail_fast(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, fail_fast: bool
) -> None:
    tasks = [
        fails({"name": "bad"}),
        slow({"name": "long"}, "3s"),
        {"name": "after-long", "dependsOn": ["long"]},
        {"name": "after-bad", "dependsOn": ["bad"]},
    ]
    apply(control_plane, namespace, workflow("ff", tasks, failFast=fail_fast), run("r1", "ff"))
    status = wait_phase(control_plane, namespace, "r1")["status"]
    assert status["phase"] == "Failed"
    assert status["tasks"]["long"]["phase"] == "Succeeded"  # running tasks always finish
    assert status["tasks"]["after-bad"]["reason"] == "UpstreamFailed"
    if fail_fast:
        assert status["tasks"]["after-long"]["phase"] == "Skipped"
        assert status["tasks"]["after-long"]["reason"] == "FailFast"
    else:
        assert status["tasks"]["after-long"]["phase"] == "Succeeded"


def test_operator_killed_mid_run_resumes_without_duplicates(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    chain = [slow({"name": "a"}, "2s")]
    chain += [slow({"name": n, "dependsOn": [p]}, "2s") for p, n in zip("abc", "bcd", strict=True)]
    chain.append({"name": "e", "dependsOn": ["d"]})
    apply(control_plane, namespace, workflow("chain", chain), run("r1", "chain"))
    deadline = time.monotonic() + 60
    while len(task_pods(control_plane, namespace)) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    operator.kill(signal.SIGKILL)
    time.sleep(3)  # pods go on finishing while no operator runs
    operator.start()
    status = wait_phase(control_plane, namespace, "r1")["status"]
    assert status["phase"] == "Succeeded", status
    names = sorted(j["metadata"]["name"] for j in task_pods(control_plane, namespace))
    assert names == ["r1-a-1", "r1-b-1", "r1-c-1", "r1-d-1", "r1-e-1"]
    assert all(t["attempts"] == 1 for t in status["tasks"].values())


def test_database_outage_turns_readiness_off_and_runs_continue(
    control_plane: ControlPlane,
    namespace: str,
    operator: OperatorProcess,
    postgres_server: PostgresServer,
) -> None:
    tasks = [slow({"name": "a"}, "1s"), slow({"name": "b", "dependsOn": ["a"]}, "1s")]
    apply(control_plane, namespace, workflow("outage", tasks))
    postgres_server.stop()
    try:
        code, body = operator.get("/readyz")
        assert code == 503
        assert "database" in json.loads(body)
        assert operator.get("/healthz")[0] == 200  # liveness must not restart the pod
        apply(control_plane, namespace, run("r1", "outage"))
        time.sleep(2)
    finally:
        postgres_server.start()
    operator.wait_ready()
    status = wait_phase(control_plane, namespace, "r1")["status"]
    assert status["phase"] == "Succeeded", status


def test_operator_without_database_exits_with_one_line(control_plane: ControlPlane) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "maestro",
            "operator",
            "--database-url",
            "postgresql://maestro:hunter2@127.0.0.1:1/maestro",
            "--kubeconfig",
            str(control_plane.kubeconfig),
            "--connect-timeout",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "cannot start" in lines[0]
    assert "127.0.0.1:1" in lines[0]
    assert "hunter2" not in proc.stderr + proc.stdout
    assert time.monotonic() - started < 30  # bounded by the connect timeout, not hanging


def test_deleting_a_running_run_stops_its_pods_and_records_cancel(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, postgres_url: str
) -> None:
    apply(control_plane, namespace, workflow("del", [slow({"name": "a"}, "60s")]), run("r1", "del"))
    deadline = time.monotonic() + 60
    while not task_pods(control_plane, namespace):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    uid = get(control_plane, namespace, "workflowrun", "r1")["metadata"]["uid"]
    control_plane.kubectl("delete", "-n", namespace, "workflowrun", "r1", "--timeout=60s")
    deadline = time.monotonic() + 60
    while task_pods(control_plane, namespace):
        assert time.monotonic() < deadline, "the run's pod outlived it"
        time.sleep(0.3)
    found, attempts, _ = store_history(postgres_url, namespace, uid)
    assert found.phase.value == "Cancelled"
    assert found.message == "the WorkflowRun was deleted"
    assert [a.phase.value for a in attempts] == ["Cancelled"]


def test_missing_workflow_keeps_run_pending_with_reason(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    apply(control_plane, namespace, run("r1", "not-yet"))
    obj = wait_phase(control_plane, namespace, "r1", ("Pending",))
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "WorkflowNotFound"
    assert "'not-yet' does not exist" in ready["message"]
    apply(control_plane, namespace, workflow("not-yet", [{"name": "a"}]))
    assert wait_phase(control_plane, namespace, "r1", timeout=90)["status"]["phase"] == "Succeeded"


def test_invalid_workflow_condition_names_the_problem(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    wf = workflow("cyclic", [{"name": "a", "dependsOn": ["b"]}, {"name": "b", "dependsOn": ["a"]}])
    apply(control_plane, namespace, wf)
    deadline = time.monotonic() + 30
    while True:
        status = get(control_plane, namespace, "workflow", "cyclic").get("status") or {}
        if status.get("conditions"):
            break
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ready = status["conditions"][0]
    assert ready["status"] == "False"
    assert "dependency cycle: a -> b -> a" in ready["message"]


def test_schema_rejects_bad_run_at_apply_time(
    control_plane: ControlPlane, namespace: str, crds: None
) -> None:
    bad = run("r1", "x")
    bad["spec"]["workflowSpec"] = {"tasks": [{"name": "a", "container": {"image": "x"}}]}
    proc = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=yaml.safe_dump(bad), check=False
    )
    assert proc.returncode != 0
    assert "exactly one of workflowRef and workflowSpec must be set" in proc.stderr


def test_many_concurrent_runs_complete(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    runs_count, width = 50, 20
    tasks = [{"name": "start"}]
    tasks += [{"name": f"t{i}", "dependsOn": ["start"]} for i in range(width - 2)]
    tasks.append({"name": "end", "dependsOn": [f"t{i}" for i in range(width - 2)]})
    apply(control_plane, namespace, workflow("wide", tasks))
    apply(control_plane, namespace, *(run(f"r{i}", "wide") for i in range(runs_count)))
    deadline = time.monotonic() + 900
    while True:
        items = json.loads(
            control_plane.kubectl("get", "workflowruns", "-n", namespace, "-o", "json").stdout
        )["items"]
        phases = [(i.get("status") or {}).get("phase") for i in items]
        if all(p in ("Succeeded", "Failed", "Cancelled") for p in phases):
            break
        assert time.monotonic() < deadline, f"not finished: {phases}"
        time.sleep(2)
    assert phases == ["Succeeded"] * runs_count
    assert len(task_pods(control_plane, namespace)) == runs_count * width
    patches = operator.metric("maestro_status_patches_total")
    print(f"\n{runs_count} runs x {width} tasks: {patches / runs_count:.1f} status patches per run")
    assert patches > 0


def test_ttl_deletes_finished_run_and_store_keeps_history(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, postgres_url: str
) -> None:
    apply(control_plane, namespace, workflow("ttl", [{"name": "a"}]))
    apply(control_plane, namespace, run("r1", "ttl", ttlSecondsAfterFinished=2))
    uid = get(control_plane, namespace, "workflowrun", "r1")["metadata"]["uid"]
    deadline = time.monotonic() + 90
    while (
        control_plane.kubectl("get", "-n", namespace, "workflowrun", "r1", check=False).returncode
        == 0
    ):
        assert time.monotonic() < deadline, "the run outlived its TTL"
        time.sleep(0.5)
    found, attempts, history = store_history(postgres_url, namespace, uid)
    assert found.phase.value == "Succeeded"
    assert [a.task for a in attempts] == ["a"]
    assert history


def test_suspend_and_resume(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    tasks = [slow({"name": "a"}, "2s"), {"name": "b", "dependsOn": ["a"]}]
    apply(control_plane, namespace, workflow("pausable", tasks), run("r1", "pausable"))
    wait_phase(control_plane, namespace, "r1", ("Running",))
    patch_spec(control_plane, namespace, "r1", {"suspend": True})
    suspended = wait_phase(control_plane, namespace, "r1", ("Suspended",))
    time.sleep(4)  # a finishes meanwhile; b must not start while suspended
    status = get(control_plane, namespace, "workflowrun", "r1")["status"]
    assert status["phase"] == "Suspended", suspended["status"]
    assert status["tasks"]["b"]["phase"] == "Pending"
    assert "RunSuspended" in {e["reason"] for e in events(control_plane, namespace)}
    patch_spec(control_plane, namespace, "r1", {"suspend": False})
    assert wait_phase(control_plane, namespace, "r1")["status"]["phase"] == "Succeeded"


def test_metrics_and_probes(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    apply(control_plane, namespace, workflow("m", [{"name": "a"}, fails({"name": "b"})]))
    apply(control_plane, namespace, run("r1", "m"))
    wait_phase(control_plane, namespace, "r1")
    assert operator.get("/healthz") == (200, '{"status": "ok"}')
    assert operator.get("/readyz")[0] == 200
    text = operator.get("/metrics")[1]
    assert 'maestro_task_attempts_total{result="Succeeded"} 1.0' in text
    assert 'maestro_task_attempts_total{result="Failed"} 1.0' in text
    assert 'maestro_runs{phase="Failed"} 1.0' in text
    assert operator.metric("maestro_status_patches_total") >= 1
    assert operator.metric("maestro_reconcile_seconds_count") >= 1
    assert operator.metric("maestro_api_writes") >= 3  # two pods and a status patch at least
