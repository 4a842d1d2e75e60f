"""The DAG language on a real control plane: a 100-instance fan-out, a child workflow
owned by its parent, and a cache hit on the second run."""

from __future__ import annotations

import pytest
from test_operator import run, with_kwok_outputs, workflow

from fixtures.control_plane import ControlPlane
from fixtures.operator import OperatorProcess, apply, get, wait_phase

pytestmark = pytest.mark.e2e


def test_fan_out_child_workflow_and_cache_hit(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    child = with_kwok_outputs(
        workflow(
            "child",
            [{"name": "work"}],
            outputs=[{"name": "v", "value": "{{ tasks.work.outputs.v }}"}],
        )
    )
    parent = workflow(
        "parent",
        [
            {
                "name": "fan",
                "forEach": {"items": list(range(100)), "concurrency": 50},
                "cache": {"key": "e2e-fan-{{ item }}", "maxAge": "1h"},
            },
            {"name": "call", "dependsOn": ["fan"], "workflow": {"name": "child"}},
        ],
        outputs=[{"name": "got", "value": "{{ tasks.call.outputs.v }}"}],
    )
    # The helper gives tasks without an executor a container: not the workflow task.
    del parent["spec"]["tasks"][1]["container"]
    apply(control_plane, namespace, child, parent, run("r1", "parent"))
    first = wait_phase(control_plane, namespace, "r1", timeout=300)
    status = first["status"]
    assert status["phase"] == "Succeeded", status.get("message")
    assert status["outputs"] == {"got": 0}
    instances = [n for n in status["tasks"] if n.startswith("fan[")]
    assert len(instances) == 100
    assert status["tasks"]["fan"]["message"] == "100/100 instances ended"
    # The child run: a WorkflowRun of its own, owned by the parent.
    child_name = status["tasks"]["call"]["childRun"]
    child_run = get(control_plane, namespace, "workflowrun", child_name)
    assert child_run["status"]["phase"] == "Succeeded"
    owners = child_run["metadata"]["ownerReferences"]
    assert [(o["kind"], o["name"], o["uid"]) for o in owners] == [
        ("WorkflowRun", "r1", first["metadata"]["uid"])
    ]
    # The second run reuses every instance's outputs from the first.
    apply(control_plane, namespace, run("r2", "parent"))
    second = wait_phase(control_plane, namespace, "r2", timeout=300)["status"]
    assert second["phase"] == "Succeeded", second.get("message")
    reasons = {second["tasks"][f"fan[{i}]"]["reason"] for i in range(100)}
    assert reasons == {"Cached"}
    assert second["tasks"]["fan[7]"]["cachedFrom"]["task"] == "fan[7]"
