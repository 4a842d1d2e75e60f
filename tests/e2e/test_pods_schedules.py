"""Volumes, pod placement (a tainted kwok node) and bad input, on the local control plane.

kwok runs no containers: these tests prove what reaches the pod and where the scheduler
puts it, not what a process inside sees (the unit tests and docs/semantics.md cover the
mapping to Kubernetes fields, which Kubernetes then honours).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from fixtures.control_plane import ControlPlane, KubectlError
from fixtures.operator import OperatorProcess, apply, get, wait_phase

pytestmark = pytest.mark.e2e

TAINTED_NODE = "kwok-tainted-0"


def workflow(name: str, tasks: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"tasks": tasks, **spec},
    }


def run(name: str, workflow_name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": name},
        "spec": {"workflowRef": {"name": workflow_name}, **spec},
    }


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
        "build: container.volumeMounts[0].name: unknown volume 'src' (spec.volumes: none)"
        in ready["message"]
    )
