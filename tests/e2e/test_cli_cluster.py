"""The cluster verbs of the CLI against the real API server and operator."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_operator import fails, run, slow, workflow

from fixtures.control_plane import ControlPlane
from fixtures.operator import REPO, OperatorProcess, apply, get, wait_phase

pytestmark = pytest.mark.e2e


def maestro(
    cp: ControlPlane,
    namespace: str | None,
    *args: str,
    columns: int = 200,
    kubeconfig: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """The real CLI as a process; ``namespace`` None leaves -n out (kubectl's defaults)."""
    ns = ["-n", namespace] if namespace is not None else []
    return subprocess.run(
        [sys.executable, "-m", "maestro", *args, *ns],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={
            **os.environ,
            "KUBECONFIG": str(kubeconfig or cp.kubeconfig),
            "COLUMNS": str(columns),
        },
        timeout=180,
        check=False,
    )


def test_submit_get_watch(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    wf = workflow("params", [{"name": "a"}], params=[{"name": "env", "default": "dev"}])
    apply(control_plane, namespace, wf)
    submitted = maestro(control_plane, namespace, "submit", "params", "-p", "env=prod")
    assert submitted.returncode == 0, submitted.stderr
    name = submitted.stdout.strip()
    assert name.startswith("params-")
    assert get(control_plane, namespace, "workflowrun", name)["spec"]["params"] == {"env": "prod"}
    watched = maestro(control_plane, namespace, "watch", name, "--interval", "0.3")
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert "Succeeded" in watched.stdout
    listing = maestro(control_plane, namespace, "get")
    assert name in listing.stdout
    assert "Succeeded" in listing.stdout
    one = maestro(control_plane, namespace, "get", name)
    assert "1/1" in one.stdout
    missing = maestro(control_plane, namespace, "get", "nope")
    assert missing.returncode == 1
    assert "not found" in missing.stderr


def test_approve_and_logs(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    tasks = [
        {"name": "gate", "approval": {"message": "ok?"}},
        {"name": "after", "dependsOn": ["gate"]},
    ]
    apply(control_plane, namespace, workflow("gated", tasks), run("r1", "gated"))
    deadline = time.monotonic() + 60
    while "waiting for approval" not in (
        get(control_plane, namespace, "workflowrun", "r1").get("status") or {}
    ).get("message", ""):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    approved = maestro(control_plane, namespace, "approve", "r1", "gate")
    assert approved.returncode == 0, approved.stderr
    assert wait_phase(control_plane, namespace, "r1")["status"]["phase"] == "Succeeded"
    logs = maestro(control_plane, namespace, "logs", "r1", "after")
    assert "==> after attempt 1" in logs.stdout
    # kwok pods have no logs: fetching nothing is an error, said in one line.
    assert logs.returncode == 1, logs.stdout
    assert (
        logs.stderr.strip() == "Error: no logs could be fetched for run 'r1' task 'after' (1 pods)"
    )


def test_cancel(control_plane: ControlPlane, namespace: str, operator: OperatorProcess) -> None:
    apply(
        control_plane,
        namespace,
        workflow("long", [slow({"name": "a"}, "60s"), {"name": "b", "dependsOn": ["a"]}]),
        run("r1", "long"),
    )
    wait_phase(control_plane, namespace, "r1", ("Running",))
    assert maestro(control_plane, namespace, "cancel", "r1").returncode == 0
    status = wait_phase(control_plane, namespace, "r1")["status"]
    assert status["phase"] == "Cancelled"
    assert status["tasks"]["a"]["phase"] == "Cancelled"
    assert status["tasks"]["b"]["phase"] == "Cancelled"


def test_retry_reuses_succeeded_tasks(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    out = {
        "container": {
            "image": "x",
            "podMetadata": {"annotations": {"maestro.dev/kwok-message": '{"v": 7}'}},
        }
    }
    tasks = [{"name": "ok", **out}, fails({"name": "flaky", "dependsOn": ["ok"]})]
    apply(control_plane, namespace, workflow("retryable", tasks), run("r1", "retryable"))
    assert wait_phase(control_plane, namespace, "r1")["status"]["phase"] == "Failed"
    # The retry runs the old snapshot again (flaky fails again),
    # but must not run `ok` a second time.
    retried = maestro(control_plane, namespace, "retry", "r1")
    assert retried.returncode == 0, retried.stderr
    name = retried.stdout.strip()
    status = wait_phase(control_plane, namespace, name)["status"]
    assert status["tasks"]["ok"]["phase"] == "Succeeded"
    assert status["tasks"]["ok"]["reason"] == "Reused"
    assert status["tasks"]["ok"]["outputs"] == {"v": 7}
    assert status["tasks"]["flaky"]["phase"] == "Failed"
    pods = control_plane.kubectl(
        "get", "pods", "-n", namespace, "-l", "maestro.dev/run-id", "-o", "name"
    ).stdout.split()
    assert sorted(pods) == sorted(["pod/r1-ok-1", "pod/r1-flaky-1", f"pod/{name}-flaky-1"])
