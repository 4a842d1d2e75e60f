"""Every run ends (issue 12): poison inputs, API faults and lost records, on the local plane.

Each poison run must reach a finished phase within 30 s with a message naming the
problem, while a canary run in the same namespace finishes normally.
"""

from __future__ import annotations

import asyncio
import http.server
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_operator import events, fails, run, slow, store_history, task_pods, workflow

from fixtures.control_plane import ControlPlane, KubectlError, apiserver_down, wait_until_settled
from fixtures.operator import OperatorProcess, apply, get, running_operator, wait_phase
from maestro.executors.container import pod_name
from maestro.store import Store

pytestmark = pytest.mark.e2e

POISON_SECONDS = 30  # the bound the issue sets for a poison run to finish


def inline_run(name: str, tasks: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    """A WorkflowRun with its workflow inline (a bad Workflow would only keep it Pending)."""
    wf_spec = workflow("inline", tasks)["spec"]
    return {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": name},
        "spec": {"workflowSpec": {**wf_spec, **spec.pop("workflow", {})}, **spec},
    }


def templated(params: dict[str, str]) -> dict[str, Any]:
    """Fields for inline_run: params declared by the workflow, values given by the run."""
    return {"workflow": {"params": [{"name": k} for k in params]}, "params": params}


DASH_AT_63 = "a" * 62 + "-" + "b" * 8  # '-' at position 63 of the run name
DOT_AT_CUT = "r" * 51 + "." + "s" * 20  # '.' where the hashed pod name is cut
BAD_ANNOTATION = {"podMetadata": {"annotations": {"not a valid key!": "x"}}}

POISON: dict[str, tuple[dict[str, Any], str, str]] = {
    # name: (WorkflowRun, expected phase, text the message must contain)
    "long-name-dash": (inline_run(DASH_AT_63, [{"name": "t"}]), "Succeeded", ""),
    "long-name-dot": (inline_run(DOT_AT_CUT, [{"name": "t"}]), "Succeeded", ""),
    "pod-refused-by-api": (
        inline_run(
            "refused",
            [{"name": "t", "container": {"image": "busybox", "command": ["true"], **BAD_ANNOTATION}}],  # noqa: E501
        ),
        "Failed",
        "is invalid: metadata.annotations: Invalid value",
    ),
    "empty-image": (
        inline_run(
            "empty-image",
            [{"name": "t", "container": {"image": "{{ params.image }}"}}],
            **templated({"image": ""}),
        ),
        "Failed",
        "task 't' cannot start: after templating, container.image",
    ),
    "empty-url": (
        inline_run("empty-url", [{"name": "t", "http": {"url": "{{ params.url }}"}}],
                   **templated({"url": ""})),
        "Failed",
        "task 't' cannot start: after templating, http.url",
    ),
    "malformed-url": (
        inline_run("bad-url", [{"name": "t", "http": {"url": "{{ params.url }}"}}],
                   **templated({"url": "http://[::1"})),
        "Failed",
        "http.url: 'http://[::1' is not a valid URL",
    ),
    "non-ascii-header": (
        inline_run(
            "bad-header",
            [{"name": "t", "http": {"url": "http://127.0.0.1:9/",
                                    "headers": [{"name": "X-A", "value": "{{ params.h }}"}]}}],
            **templated({"h": "caf\u00e9"}),
        ),
        "Failed",
        "http.headers['X-A']: value has characters other than printable ASCII",
    ),
    "static-malformed-url": (
        inline_run("static-url", [{"name": "t", "http": {"url": "http://[::1"}}]),
        "Failed",
        "http.url: 'http://[::1' is not a valid URL",
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(POISON))
def test_poison_run_ends_with_a_message_while_a_canary_finishes(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, case: str
) -> None:
    poison, phase, message = POISON[case]
    name = poison["metadata"]["name"]
    apply(control_plane, namespace, workflow("canary", [slow({"name": "c"}, "3s")]))
    apply(control_plane, namespace, run("canary", "canary"), poison)
    obj = wait_phase(control_plane, namespace, name, timeout=POISON_SECONDS)
    status = obj["status"]
    assert status["phase"] == phase, status
    shown = " ".join([status.get("message") or ""] + [
        t.get("message") or "" for t in (status.get("tasks") or {}).values()
    ])  # fmt: skip
    assert message in shown, status
    if phase == "Succeeded":
        assert status["tasks"]["t"]["podName"] == pod_name(name, "t", 1)
    canary = wait_phase(control_plane, namespace, "canary", timeout=60)["status"]
    assert canary["phase"] == "Succeeded", canary
    assert "Traceback" not in operator.log()


def test_reserved_pod_label_is_refused_at_apply(
    control_plane: ControlPlane, namespace: str, crds: None
) -> None:
    task = {
        "name": "t",
        "container": {"image": "busybox", "podMetadata": {"labels": {"job-name": "mine"}}},
    }
    with pytest.raises(KubectlError, match="reserved"):
        apply(control_plane, namespace, inline_run("label", [task]))
    with pytest.raises(KubectlError, match="reserved"):
        apply(control_plane, namespace, workflow("label", [task]))


def test_cancel_ends_a_run_waiting_for_its_workflow(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    apply(control_plane, namespace, run("r1", "never-there"))
    wait_phase(control_plane, namespace, "r1", ("Pending",), timeout=30)
    control_plane.kubectl(
        "patch", "-n", namespace, "workflowrun", "r1", "--type", "merge",
        "-p", '{"spec": {"cancel": true}}',
    )  # fmt: skip
    status = wait_phase(control_plane, namespace, "r1", timeout=30)["status"]
    assert status["phase"] == "Cancelled"
    assert "never-there" in status["message"]


class _SlowOk(http.server.BaseHTTPRequestHandler):
    """Answers every request with a JSON object after DELAY seconds."""

    DELAY = 5.0

    def do_GET(self) -> None:
        time.sleep(self.DELAY)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def loopback_operator(
    control_plane: ControlPlane, crds: None, namespace: str, postgres_url: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The operator, with egress to the test's HTTP server on 127.0.0.1 allowed."""
    with running_operator(
        control_plane, namespace, postgres_url, tmp_path, extra=["--egress-allow", "127.0.0.1/32"]
    ) as op:
        yield op


def test_runs_finish_soon_after_a_15s_apiserver_outage(
    control_plane: ControlPlane, namespace: str, loopback_operator: OperatorProcess
) -> None:
    if control_plane.external:
        pytest.skip("kills the API server of the local control plane")
    operator = loopback_operator
    # HTTP tasks answer while the API server is down: what is measured is how soon the
    # operator writes their runs' status once it is back. (Task pods also need the
    # scheduler and kwok to reconnect, which is not Maestro's time.)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _SlowOk)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/slow"
        apply(control_plane, namespace, workflow("outage", [{"name": "a", "http": {"url": url}}]))
        names = [f"r{i}" for i in range(8)]
        apply(control_plane, namespace, *(run(n, "outage") for n in names))
        for n in names:
            wait_phase(control_plane, namespace, n, ("Running",), timeout=60)
        with apiserver_down(control_plane):
            time.sleep(15)
        back = time.monotonic()
        for n in names:
            left = max(1.0, 20 - (time.monotonic() - back))
            status = wait_phase(control_plane, namespace, n, timeout=left)["status"]
            assert status["phase"] == "Succeeded", (n, status)
    finally:
        server.shutdown()
        server.server_close()
        wait_until_settled(control_plane)
    assert "Traceback" not in operator.log()


@pytest.mark.parametrize("operator_down", [True, False], ids=["operator-down", "operator-up"])
def test_deleted_pod_is_a_failed_attempt_never_created_again(
    control_plane: ControlPlane,
    namespace: str,
    operator: OperatorProcess,
    postgres_url: str,
    operator_down: bool,
) -> None:
    # Down: the restarted operator finds the pod missing (a GET says 404). Up: the pod
    # watch sees it deleted while it runs.
    task = slow({"name": "a", "retries": {"limit": 1, "backoffSeconds": 0}}, "5s")
    apply(control_plane, namespace, workflow("vanish", [task]), run("r1", "vanish"))
    deadline = time.monotonic() + 60
    while not task_pods(control_plane, namespace):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    if operator_down:
        operator.kill(signal.SIGKILL)
    control_plane.kubectl("delete", "pod", "-n", namespace, "r1-a-1", "--wait=true")
    if operator_down:
        operator.start()
    status = wait_phase(control_plane, namespace, "r1", timeout=60)["status"]
    assert status["phase"] == "Succeeded", status
    uid = get(control_plane, namespace, "workflowrun", "r1")["metadata"]["uid"]
    _, attempts, _ = store_history(postgres_url, namespace, uid)
    assert [(a.attempt, a.phase.value, a.reason) for a in attempts] == [
        (1, "Failed", "Deleted"),
        (2, "Succeeded", "Succeeded"),
    ]
    assert [a.job_name for a in attempts] == ["r1-a-1", "r1-a-2"]
    assert [p["metadata"]["name"] for p in task_pods(control_plane, namespace)] == ["r1-a-2"]
    assert status["tasks"]["a"]["attempts"] == 2
    assert status["tasks"]["a"]["podName"] == "r1-a-2"


def _failed_in_store(url: str, namespace: str, uid: str) -> int:
    async def count() -> int:
        store = await Store.open(url)
        try:
            found = await store.find_run(namespace, uid)
            if found is None:
                return 0
            latest = await store.latest_attempts(found.id)
            return sum(a.phase.value == "Failed" for a in latest.values())
        finally:
            await store.close()

    return asyncio.run(count())


def test_task_failed_events_are_posted_once_across_sigkill(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, postgres_url: str
) -> None:
    names = [f"t{i}" for i in range(5)]
    apply(
        control_plane,
        namespace,
        workflow("failing", [fails({"name": n}, f"boom-{n}") for n in names], failFast=False),
        run("r1", "failing"),
    )
    deadline = time.monotonic() + 60
    uid = ""
    while True:
        assert time.monotonic() < deadline, "the tasks did not fail"
        uid = (
            uid or (get(control_plane, namespace, "workflowrun", "r1").get("metadata") or {})["uid"]
        )
        if _failed_in_store(postgres_url, namespace, uid) == len(names):
            break
        time.sleep(0.05)
    operator.kill(signal.SIGKILL)  # right after the failures were stored
    operator.start()
    assert wait_phase(control_plane, namespace, "r1")["status"]["phase"] == "Failed"
    deadline = time.monotonic() + 30
    while True:
        failed = [
            e for e in events(control_plane, namespace)
            if e["involvedObject"]["name"] == "r1" and e["reason"] == "TaskFailed"
        ]  # fmt: skip
        if len(failed) >= len(names) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    per_task = sorted(e["message"].split(" ", 1)[0] for e in failed)
    assert per_task == names, [e["message"] for e in failed]
    assert all(e.get("count", 1) == 1 for e in failed)


def test_namespace_deletion_records_runs_as_cancelled(
    control_plane: ControlPlane, namespace: str, crds: None, postgres_url: str, tmp_path: Path
) -> None:
    # Cluster-wide, as the chart installs it: a Kopf watch of one namespace goes quiet
    # once that namespace terminates (see docs/operator.md), a cluster-wide one does not.
    op = OperatorProcess(control_plane.kubeconfig, postgres_url, None, tmp_path)
    op.start()
    try:
        apply(control_plane, namespace, workflow("long", [slow({"name": "a"}, "120s")]))
        apply(control_plane, namespace, run("r1", "long"), run("r2", "long"))
        deadline = time.monotonic() + 60
        while len(task_pods(control_plane, namespace)) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        uids = [
            get(control_plane, namespace, "workflowrun", n)["metadata"]["uid"] for n in ("r1", "r2")
        ]
        control_plane.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=60s")
    finally:
        op.kill(signal.SIGTERM)
    for uid in uids:
        found, attempts, _ = store_history(postgres_url, namespace, uid)
        assert found.phase.value == "Cancelled", (found.phase, found.message)
        assert found.message == f"cancelled: namespace {namespace} is being deleted"
        assert [a.phase.value for a in attempts] == ["Cancelled"]
