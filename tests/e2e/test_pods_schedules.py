"""Volumes, pod placement (a tainted kwok node) and bad input, on the local control plane.

kwok runs no containers: these tests prove what reaches the pod and where the scheduler
puts it, not what a process inside sees (the unit tests and docs/semantics.md cover the
mapping to Kubernetes fields, which Kubernetes then honours).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from test_operator import run, workflow

from fixtures.control_plane import ControlPlane, KubectlError
from fixtures.operator import OperatorProcess, apply, get, patch_spec, running_operator, wait_phase

pytestmark = pytest.mark.e2e

TAINTED_NODE = "kwok-tainted-0"


def pods_of(cp: ControlPlane, namespace: str, task: str) -> list[dict[str, Any]]:
    out = cp.kubectl("get", "pods", "-n", namespace, "-l", f"maestro.dev/task={task}", "-o", "json")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


@pytest.fixture(scope="module")
def tainted_node(control_plane: ControlPlane) -> Iterator[str]:
    """A second kwok node with a NoSchedule taint and the label pool=tainted."""
    capacity = {"cpu": "100", "memory": "100Gi", "pods": "100"}
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": TAINTED_NODE,
            # kwok manages (and marks Ready) nodes with this annotation.
            "annotations": {"kwok.x-k8s.io/node": "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {"kubernetes.io/hostname": TAINTED_NODE, "pool": "tainted", "type": "kwok"},
        },
        "spec": {"taints": [{"key": "dedicated", "value": "ci", "effect": "NoSchedule"}]},
        "status": {"capacity": capacity, "allocatable": capacity},
    }
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(node))
    control_plane.kubectl("wait", "--for=condition=Ready", "--timeout=60s", f"node/{TAINTED_NODE}")
    try:
        yield TAINTED_NODE
    finally:
        control_plane.kubectl("delete", "node", TAINTED_NODE, "--wait=false", check=False)


def test_configmap_volume_and_tolerations_place_the_pod_on_the_tainted_node(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, tainted_node: str
) -> None:
    control_plane.kubectl(
        "create", "configmap", "settings", "-n", namespace, "--from-literal=mode=fast"
    )
    volumes = [
        {"name": "cfg", "configMap": {"name": "settings"}},
        {"name": "scratch", "emptyDir": {}},
    ]
    placement = {
        "nodeSelector": {"pool": "tainted"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ci"}],
    }
    mounts = [
        {"name": "cfg", "mountPath": "/etc/app", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch", "subPath": "a"},
    ]
    tasks = [
        {"name": "on-tainted", "container": {"image": "busybox", "volumeMounts": mounts}},
        # Overrides the placement: lands on the ordinary node.
        {
            "name": "elsewhere",
            "container": {
                "image": "busybox",
                "podTemplate": {"nodeSelector": {"type": "kwok"}, "tolerations": []},
            },
        },
    ]
    apply(
        control_plane,
        namespace,
        workflow("placed", tasks, volumes=volumes, podTemplate=placement),
        run("placed-1", "placed"),
    )
    status = wait_phase(control_plane, namespace, "placed-1")["status"]
    assert status["phase"] == "Succeeded", status

    (pod,) = pods_of(control_plane, namespace, "on-tainted")
    assert pod["spec"]["nodeName"] == tainted_node
    assert pod["spec"]["volumes"][0] == {
        "name": "cfg",
        "configMap": {"name": "settings", "defaultMode": 420, "optional": False},
    }
    assert [v["name"] for v in pod["spec"]["volumes"]][:2] == ["cfg", "scratch"]
    assert pod["spec"]["containers"][0]["volumeMounts"][:2] == [
        {"name": "cfg", "mountPath": "/etc/app", "readOnly": True},
        {"name": "scratch", "mountPath": "/scratch", "subPath": "a"},
    ]
    (other,) = pods_of(control_plane, namespace, "elsewhere")
    assert other["spec"]["nodeName"] != tainted_node
    assert "volumes" not in other["spec"] or all(
        v["name"] not in ("cfg", "scratch") for v in other["spec"]["volumes"]
    )


def test_without_the_toleration_the_pod_stays_unscheduled(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, tainted_node: str
) -> None:
    task = {
        "name": "no-toleration",
        "container": {"image": "busybox", "podTemplate": {"nodeSelector": {"pool": "tainted"}}},
    }
    apply(control_plane, namespace, workflow("untolerated", [task]), run("untol-1", "untolerated"))
    deadline = time.monotonic() + 60
    reason = None
    while time.monotonic() < deadline and reason != "Unschedulable":
        for pod in pods_of(control_plane, namespace, "no-toleration"):
            for cond in pod.get("status", {}).get("conditions") or []:
                if cond["type"] == "PodScheduled" and cond["status"] == "False":
                    reason = cond.get("reason")
        time.sleep(0.5)
    assert reason == "Unschedulable"
    assert get(control_plane, namespace, "workflowrun", "untol-1")["status"]["phase"] == "Running"


# --- Bad input, rejected at apply (schema) or reported naming the field --------------------


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        (
            {"volumes": [{"name": "v", "emptyDir": {}}, {"name": "v", "emptyDir": {}}]},
            'spec.volumes[1]: Duplicate value: {"name":"v"}',
        ),
        (
            {"volumes": [{"name": "v", "emptyDir": {}, "configMap": {"name": "c"}}]},
            'spec.volumes[0]: Invalid value: "object": exactly one of persistentVolumeClaim',
        ),
        (
            {"volumes": [{"name": "v", "hostPath": {"path": "/"}}]},
            'unknown field "spec.volumes[0].hostPath"',
        ),
        ({"podTemplate": {"hostNetwork": True}}, 'unknown field "spec.podTemplate.hostNetwork"'),
        (
            {"podTemplate": {"tolerations": [{"effect": "Sometimes"}]}},
            "spec.podTemplate.tolerations[0].effect: Unsupported value",
        ),
    ],
)
def test_bad_workflow_fields_rejected_at_apply(
    control_plane: ControlPlane, namespace: str, crds: None, spec: dict[str, Any], named: str
) -> None:
    with pytest.raises(KubectlError) as err:
        apply(control_plane, namespace, workflow("bad", [{"name": "t", "approval": {}}], **spec))
    assert named in str(err.value)


@pytest.mark.parametrize(
    ("mount", "named"),
    [
        ({"name": "v", "mountPath": "/x", "subPath": "../etc"}, "volumeMounts[0].subPath"),
        ({"name": "v", "mountPath": "relative"}, "volumeMounts[0].mountPath"),
    ],
)
def test_bad_mounts_rejected_at_apply(
    control_plane: ControlPlane, namespace: str, crds: None, mount: dict[str, Any], named: str
) -> None:
    task = {"name": "t", "container": {"image": "busybox", "volumeMounts": [mount]}}
    volumes = [{"name": "v", "emptyDir": {}}]
    with pytest.raises(KubectlError) as err:
        apply(control_plane, namespace, workflow("bad", [task], volumes=volumes))
    assert f"spec.tasks[0].container.{named}" in str(err.value)


def test_unknown_volume_in_a_mount_is_named_in_the_workflows_status(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    task = {
        "name": "build",
        "container": {"image": "busybox", "volumeMounts": [{"name": "src", "mountPath": "/s"}]},
    }
    apply(control_plane, namespace, workflow("unknown-vol", [task], volumes=[]))
    deadline = time.monotonic() + 60
    ready: dict[str, Any] = {}
    while time.monotonic() < deadline and not ready:
        conditions = get(control_plane, namespace, "workflow", "unknown-vol").get("status") or {}
        ready = next((c for c in conditions.get("conditions") or [] if c["type"] == "Ready"), {})
        time.sleep(0.3)
    assert ready["status"] == "False"
    assert (
        "build: container.volumeMounts[0].name: unknown volume 'src' "
        "(spec.volumes and spec.workspaces: none)" in ready["message"]
    )


# --- WorkflowSchedules (the seconds test hook: a sixth, seconds, cron field) -------------


@pytest.fixture
def schedule_operator(
    control_plane: ControlPlane, crds: None, namespace: str, postgres_url: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The operator with the seconds-resolution test hook on."""
    with running_operator(
        control_plane, namespace, postgres_url, tmp_path, extra=["--allow-seconds-schedules"]
    ) as op:
        yield op


def schedule(name: str, workflow_name: str, cron: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowSchedule",
        "metadata": {"name": name},
        "spec": {"schedule": cron, "runTemplate": {"workflowRef": {"name": workflow_name}}, **spec},
    }


def task_taking(delay: str, result: str = "Succeeded") -> dict[str, Any]:
    annotations = {"maestro.dev/kwok-delay": delay}
    if result == "Failed":
        annotations["maestro.dev/kwok-result"] = "Failed"
    return {
        "name": "work",
        "container": {
            "image": "busybox",
            "command": ["true"],
            "podMetadata": {"annotations": annotations},
        },
    }


def schedule_runs(cp: ControlPlane, namespace: str, name: str) -> list[dict[str, Any]]:
    out = cp.kubectl(
        "get", "workflowruns", "-n", namespace, "-l", f"maestro.dev/schedule={name}", "-o", "json"
    )
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def phases(runs: list[dict[str, Any]]) -> list[str | None]:
    return [(r.get("status") or {}).get("phase") for r in runs]


ENDED = ("Succeeded", "Failed", "Cancelled")


@dataclass(frozen=True)
class Snapshot:
    """The schedule's runs as listed at ``at`` (epoch seconds)."""

    at: float
    runs: list[dict[str, Any]]


def watch_runs(cp: ControlPlane, namespace: str, name: str, seconds: float) -> list[Snapshot]:
    """Snapshots of the schedule's runs, taken for ``seconds``."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(Snapshot(time.time(), schedule_runs(cp, namespace, name)))
        time.sleep(0.5)
    return seen


# How long a finished run may stay before its schedule's next step deletes it: the test
# operator steps at least every second; the rest is slack for a loaded machine.
HISTORY_GRACE_SECONDS = 5.0


def kept_past_grace(snapshot: Snapshot, phase: str) -> int:
    """Runs in ``phase`` that the history limit has had time to delete: finished more than
    HISTORY_GRACE_SECONDS before the snapshot and not being deleted (a deleted run stays
    listed until the operator lets go of its finalizer)."""
    return sum(
        1
        for r in snapshot.runs
        if (status := r.get("status") or {}).get("phase") == phase
        and not r["metadata"].get("deletionTimestamp")
        and status.get("finishedAt")
        and datetime.fromisoformat(status["finishedAt"]).timestamp()
        < snapshot.at - HISTORY_GRACE_SECONDS
    )


def test_allow_runs_overlap_and_history_keeps_one_success(
    control_plane: ControlPlane, namespace: str, schedule_operator: OperatorProcess
) -> None:
    apply(
        control_plane,
        namespace,
        workflow("slow", [task_taking("4s")]),
        schedule("allow", "slow", "* * * * * */2", successfulRunsHistoryLimit=1),
    )
    seen = watch_runs(control_plane, namespace, "allow", 20)
    most_active = max(sum(p not in ENDED for p in phases(s.runs)) for s in seen)
    assert most_active >= 2, "Allow never ran two runs at once"
    names = {r["metadata"]["name"] for s in seen for r in s.runs}
    assert len(names) >= 5
    # The history limit (1): a second Succeeded run lives only until the schedule's next
    # step (two may end between steps on a loaded machine, so each is given the grace).
    assert max(kept_past_grace(s, "Succeeded") for s in seen) <= 1
    assert len(names) - len({r["metadata"]["name"] for r in seen[-1].runs}) >= 2, "none deleted"
    status = get(control_plane, namespace, "workflowschedule", "allow")["status"]
    assert status["lastScheduleTime"]
    assert status["nextScheduleTime"]
    assert status["lastRunName"].startswith("allow-")
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"


GATE = {"name": "gate", "approval": {}}  # a run that stays Running until approved


def test_forbid_waits_for_the_active_run_to_end(
    control_plane: ControlPlane, namespace: str, schedule_operator: OperatorProcess
) -> None:
    apply(
        control_plane,
        namespace,
        workflow("gated", [GATE]),
        schedule("forbid", "gated", "* * * * * *", concurrencyPolicy="Forbid"),
    )
    seen = watch_runs(control_plane, namespace, "forbid", 8)
    (first,) = seen[-1].runs
    assert max(len(s.runs) for s in seen) == 1
    ready = next(
        c
        for c in get(control_plane, namespace, "workflowschedule", "forbid")["status"]["conditions"]
        if c["type"] == "Ready"
    )
    assert ready["reason"] == "Forbidden"
    assert first["metadata"]["name"] in ready["message"]
    # Once it ends, the waiting time starts a new run.
    patch_spec(control_plane, namespace, first["metadata"]["name"], {"approvals": ["gate"]})
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline and len(schedule_runs(control_plane, namespace, "forbid")) < 2
    ):
        time.sleep(0.5)
    runs = schedule_runs(control_plane, namespace, "forbid")
    assert len(runs) >= 2
    assert sum(p not in ENDED for p in phases(runs)) <= 1


def test_replace_cancels_the_active_run(
    control_plane: ControlPlane, namespace: str, schedule_operator: OperatorProcess
) -> None:
    apply(
        control_plane,
        namespace,
        workflow("gated", [GATE]),
        schedule("replace", "gated", "* * * * * */3", concurrencyPolicy="Replace"),
    )

    def replaced(run: dict[str, Any]) -> bool:
        tasks = (run.get("status") or {}).get("tasks") or {}
        return bool(run["spec"].get("cancel")) and tasks.get("gate", {}).get("phase") == "Cancelled"

    deadline = time.monotonic() + 45
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = schedule_runs(control_plane, namespace, "replace")
        if sum(map(replaced, runs)) >= 2:
            break
        time.sleep(0.5)
    assert sum(map(replaced, runs)) >= 2, [r["metadata"]["name"] for r in runs]
    # Every run but the newest was told to cancel; the gate never waits in two runs.
    newest = max(runs, key=lambda r: r["metadata"]["name"])
    assert all(r["spec"].get("cancel") for r in runs if r is not newest)


def test_failed_history_limit_zero_deletes_failed_runs(
    control_plane: ControlPlane, namespace: str, schedule_operator: OperatorProcess
) -> None:
    apply(
        control_plane,
        namespace,
        workflow("failing", [task_taking("0s", "Failed")]),
        schedule("fails", "failing", "* * * * * */2", failedRunsHistoryLimit=0),
    )
    seen = watch_runs(control_plane, namespace, "fails", 16)
    created = {r["metadata"]["name"] for s in seen for r in s.runs}
    assert len(created) >= 3
    assert any("Failed" in phases(s.runs) for s in seen), "no run was seen Failed"
    # Each failed run is deleted on a later step: never do failed runs pile up.
    assert max(kept_past_grace(s, "Failed") for s in seen) == 0
    assert len(created) - len(seen[-1].runs) >= 2, "none deleted"


def test_bad_schedules_are_named(
    control_plane: ControlPlane, namespace: str, schedule_operator: OperatorProcess
) -> None:
    with pytest.raises(KubectlError) as err:
        apply(control_plane, namespace, schedule("bad", "wf", "* * * *"))
    assert "spec.schedule" in str(err.value)
    with pytest.raises(KubectlError) as err:
        apply(control_plane, namespace, schedule("bad", "wf", "* * * * *", concurrencyPolicy="No"))
    assert "spec.concurrencyPolicy" in str(err.value)
    # Shape passes the schema; the value is refused by the operator, naming the field.
    apply(control_plane, namespace, schedule("bad-minute", "wf", "61 * * * *"))
    deadline = time.monotonic() + 30
    ready: dict[str, Any] = {}
    while time.monotonic() < deadline and not ready:
        status = get(control_plane, namespace, "workflowschedule", "bad-minute").get("status") or {}
        ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
        time.sleep(0.3)
    assert ready["status"] == "False"
    assert "spec.schedule" in ready["message"]
    assert "'61 * * * *' is not a cron expression" in ready["message"]
    assert schedule_runs(control_plane, namespace, "bad-minute") == []


def maestro(cp: ControlPlane, namespace: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maestro", *args, "-n", namespace],
        capture_output=True,
        text=True,
        env={**os.environ, "KUBECONFIG": str(cp.kubeconfig), "COLUMNS": "200"},
        timeout=120,
        check=False,
    )


def test_schedule_cli_suspend_trigger_resume_list(
    control_plane: ControlPlane, namespace: str, schedule_operator: OperatorProcess
) -> None:
    apply(
        control_plane,
        namespace,
        workflow("quick", [task_taking("0s")]),
        schedule("cli", "quick", "* * * * * */2", suspend=True),
    )
    assert watch_runs(control_plane, namespace, "cli", 5)[-1].runs == []  # suspended: no runs

    out = maestro(control_plane, namespace, "schedule", "trigger", "cli")
    assert out.returncode == 0, out.stderr
    manual = out.stdout.strip()
    assert manual.startswith("cli-manual-")
    assert wait_phase(control_plane, namespace, manual)["status"]["phase"] == "Succeeded"
    assert [r["metadata"]["name"] for r in schedule_runs(control_plane, namespace, "cli")] == [
        manual
    ]

    out = maestro(control_plane, namespace, "schedule", "resume", "cli")
    assert out.returncode == 0, out.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(schedule_runs(control_plane, namespace, "cli")) < 2:
        time.sleep(0.5)
    assert len(schedule_runs(control_plane, namespace, "cli")) >= 2

    out = maestro(control_plane, namespace, "schedule", "suspend", "cli")
    assert out.returncode == 0, out.stderr
    time.sleep(3)  # let a tick in flight finish before counting
    before = {r["metadata"]["name"] for r in schedule_runs(control_plane, namespace, "cli")}
    after = {
        r["metadata"]["name"]
        for s in watch_runs(control_plane, namespace, "cli", 5)
        for r in s.runs
    }
    assert after <= before, f"runs created while suspended: {after - before}"

    listed = maestro(control_plane, namespace, "schedule", "list")
    assert listed.returncode == 0, listed.stderr
    assert "cli" in listed.stdout
    assert "* * * * * */2" in listed.stdout
    assert "true" in listed.stdout  # suspended


def test_validate_names_bad_schedule_fields(tmp_path: Path) -> None:
    bad = tmp_path / "s.yaml"
    bad.write_text(
        "apiVersion: maestro.dev/v1alpha1\nkind: WorkflowSchedule\nmetadata: {name: s}\n"
        "spec: {schedule: '*/1 * * *', timeZone: Mars/Base, runTemplate: {workflowRef: "
        "{name: wf}}}\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "maestro", "validate", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 1
    assert "spec.schedule: String should match pattern" in out.stderr
    assert "spec.timeZone: 'Mars/Base' is not an IANA time zone" in out.stderr


# --- Workspaces --------------------------------------------------------------------------


def grant_claims(cp: ControlPlane, namespace: str) -> None:
    """Let the namespace's default ServiceAccount (the runs') create claims."""
    cp.kubectl(
        "create",
        "role",
        "claims",
        "-n",
        namespace,
        "--verb=create",
        "--resource=persistentvolumeclaims",
    )
    cp.kubectl(
        "create",
        "rolebinding",
        "claims",
        "-n",
        namespace,
        "--role=claims",
        f"--serviceaccount={namespace}:default",
    )
    deadline = time.monotonic() + 30
    while True:
        proc = cp.kubectl(
            "auth",
            "can-i",
            "create",
            "persistentvolumeclaims",
            "-n",
            namespace,
            f"--as=system:serviceaccount:{namespace}:default",
            check=False,
        )
        if proc.stdout.strip() == "yes":
            return
        assert time.monotonic() < deadline, proc.stdout + proc.stderr
        time.sleep(0.2)


def shared_workspace_workflow(pv: str) -> dict[str, Any]:
    mount = {"volumeMounts": [{"name": "src", "mountPath": "/workspace"}]}
    tasks = [
        {"name": "checkout", "container": {"image": "busybox", **mount}},
        {"name": "build", "dependsOn": ["checkout"], "container": {"image": "busybox", **mount}},
        {
            "name": "test",
            "dependsOn": ["build"],
            "container": {
                "image": "busybox",
                **mount,
                "outputFiles": [{"name": "report", "workspace": "src", "path": "reports/j.xml"}],
            },
        },
    ]
    workspace = {
        "name": "src",
        "volumeClaimTemplate": {
            "spec": {
                "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": "1Gi"}},
                "storageClassName": "",
                "volumeName": pv,  # pre-bound: the test's PersistentVolume
            }
        },
    }
    return workflow("shared", tasks, workspaces=[workspace])


def test_tasks_share_a_run_scoped_workspace_claim_deleted_with_the_run(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    pv = f"{namespace}-pv"[:63]
    control_plane.kubectl(
        "apply",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolume",
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "",
                    "persistentVolumeReclaimPolicy": "Retain",
                    "hostPath": {"path": str(tmp_path / "pv")},
                },
            }
        ),
    )
    try:
        grant_claims(control_plane, namespace)
        apply(control_plane, namespace, shared_workspace_workflow(pv), run("shared-1", "shared"))
        status = wait_phase(control_plane, namespace, "shared-1")["status"]
        assert status["phase"] == "Succeeded", status

        # The declared file's path joined the outputs (kwok writes no termination message).
        assert status["tasks"]["test"]["outputs"] == {"report": "reports/j.xml"}
        claim = get(control_plane, namespace, "pvc", "shared-1-src")
        assert claim["spec"]["volumeName"] == pv
        assert claim["status"]["phase"] == "Bound"
        run_uid = get(control_plane, namespace, "workflowrun", "shared-1")["metadata"]["uid"]
        assert claim["metadata"]["ownerReferences"][0]["uid"] == run_uid
        for task in ("checkout", "build", "test"):
            (pod,) = pods_of(control_plane, namespace, task)
            volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
            assert volumes["src"]["persistentVolumeClaim"] == {"claimName": "shared-1-src"}

        # Deleting the run deletes its claim (garbage collector, through the owner).
        control_plane.kubectl("delete", "workflowrun", "shared-1", "-n", namespace)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            gone = control_plane.kubectl("get", "pvc", "shared-1-src", "-n", namespace, check=False)
            if gone.returncode != 0 and "NotFound" in gone.stderr:
                break
            time.sleep(0.5)
        assert "NotFound" in gone.stderr
    finally:
        control_plane.kubectl("delete", "pv", pv, "--wait=false", check=False)


def test_workspace_needs_the_service_account_to_create_claims(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    apply(control_plane, namespace, shared_workspace_workflow("none"), run("denied-1", "shared"))
    status = wait_phase(control_plane, namespace, "denied-1")["status"]
    assert status["phase"] == "Failed"
    assert (
        f"spec.workspaces: serviceaccount {namespace}/default may not create persistentvolumeclaims"
    ) in status["message"]
    gone = control_plane.kubectl("get", "pvc", "-n", namespace, "-o", "name")
    assert gone.stdout.strip() == ""


def test_two_workspaces_with_one_name_rejected_at_apply(
    control_plane: ControlPlane, namespace: str, crds: None
) -> None:
    wf = shared_workspace_workflow("pv")
    wf["spec"]["workspaces"] *= 2
    with pytest.raises(KubectlError) as err:
        apply(control_plane, namespace, wf)
    assert 'spec.workspaces[1]: Duplicate value: {"name":"src"}' in str(err.value)
    wf = shared_workspace_workflow("pv")
    wf["spec"]["volumes"] = [{"name": "src", "emptyDir": {}}]
    with pytest.raises(KubectlError) as err:
        apply(control_plane, namespace, wf)
    assert "a workspace and a volume cannot share a name" in str(err.value)
