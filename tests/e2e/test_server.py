"""``maestro server`` against the real control plane, operator and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from fixtures.control_plane import ControlPlane
from fixtures.operator import apply, get
from fixtures.server import ServerProcess
from maestro.store import Store

pytestmark = pytest.mark.e2e

GATED = {
    "apiVersion": "maestro.dev/v1alpha1",
    "kind": "Workflow",
    "metadata": {"name": "gated"},
    "spec": {
        "params": [{"name": "who"}, {"name": "count", "default": "1"}],
        "tasks": [
            {"name": "build", "container": {"image": "busybox", "command": ["true"]}},
            {
                "name": "gate",
                "dependsOn": ["build"],
                "approval": {"message": "Ship {{ params.who }}?"},
            },
            {
                "name": "ship",
                "dependsOn": ["gate"],
                "container": {"image": "busybox", "command": ["true"]},
            },
        ],
    },
}


def run_names(cp: ControlPlane, namespace: str) -> list[str]:
    """Names of the WorkflowRuns in ``namespace``."""
    out = cp.kubectl("get", "workflowruns", "-n", namespace, "-o", "json").stdout
    return [o["metadata"]["name"] for o in json.loads(out)["items"]]


def wait_run(
    server: ServerProcess, token: str, run_id: str, phases: tuple[str, ...], timeout: float = 90
) -> dict[str, Any]:
    """Poll GET /api/runs/{id} until the run is in one of ``phases``."""
    deadline = time.monotonic() + timeout
    body: Any = None
    while time.monotonic() < deadline:
        status, body = server.call("GET", f"/api/runs/{run_id}", token=token)
        assert status == 200, body
        if body["phase"] in phases:
            return dict(body)
        time.sleep(0.3)
    raise AssertionError(f"run {run_id} not in {phases} after {timeout}s: {body}")


def wait_task(
    server: ServerProcess, token: str, run_id: str, task: str, phase: str, timeout: float = 90
) -> None:
    """Poll until one task's latest attempt is in ``phase``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = server.call("GET", f"/api/runs/{run_id}", token=token)[1]
        if {t["name"]: t["phase"] for t in body["tasks"]}.get(task) == phase:
            return
        time.sleep(0.3)
    raise AssertionError(f"task {task} of {run_id} not {phase}: {body}")


def sse_events(server: ServerProcess, token: str, run_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Read the whole event stream of a finished run: (event, data) pairs."""
    status, text = server.call("GET", f"/api/runs/{run_id}/events", token=token)
    assert status == 200, text
    found = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "event" in fields:
            found.append((fields["event"], json.loads(fields["data"])))
    return found


def test_execute_approve_and_follow_a_run(
    control_plane: ControlPlane, namespace: str, server: ServerProcess, user_token: str
) -> None:
    apply(control_plane, namespace, GATED)
    ns = f"?namespace={namespace}"
    status, started = server.call(
        "POST",
        f"/api/workflows/gated/execute{ns}",
        token=user_token,
        body={"params": {"who": "me"}, "name": "first", "labels": {"team": "a"}},
    )
    assert status == 201, started
    assert started["name"] == "first"
    assert started["runId"], "the operator recorded the run within the wait"
    run_id = started["runId"]
    obj = get(control_plane, namespace, "workflowrun", "first")
    assert obj["metadata"]["labels"] == {"team": "a"}
    assert obj["spec"]["params"] == {"who": "me"}
    assert obj["metadata"]["annotations"]["maestro.dev/submitted-by"].endswith(":runner")

    wait_task(server, user_token, run_id, "gate", "Running")
    detail = server.call("GET", f"/api/runs/{run_id}", token=user_token)[1]
    assert detail["deleted"] is False
    assert {t["name"]: t["kind"] for t in detail["tasks"]} == {
        "build": "container",
        "gate": "approval",
        "ship": "container",
    }
    assert [n["name"] for n in detail["graph"]["nodes"]] == ["build", "gate", "ship"]
    xs = {n["name"]: n["x"] for n in detail["graph"]["nodes"]}
    assert xs["build"] < xs["gate"] < xs["ship"], "layers go left to right"
    assert detail["graph"]["edges"] == [["build", "gate"], ["gate", "ship"]]

    # Only declared gates can be approved; nothing changes on a 4xx.
    status, body = server.call(
        "POST", f"/api/runs/{run_id}/approve", token=user_token, body={"task": "ship"}
    )
    assert (status, body["error"]["field"]) == (422, "task"), body
    assert get(control_plane, namespace, "workflowrun", "first")["spec"].get("approvals", []) == []

    status, body = server.call(
        "POST",
        f"/api/runs/{run_id}/approve",
        token=user_token,
        body={"task": "gate", "comment": "looks good"},
    )
    assert status == 200, body
    final = wait_run(server, user_token, run_id, ("Succeeded", "Failed", "Cancelled"))
    assert final["phase"] == "Succeeded", final
    assert {t["phase"] for t in final["tasks"]} == {"Succeeded"}

    task = server.call("GET", f"/api/runs/{run_id}/tasks/gate", token=user_token)[1]
    assert task["gate"] == "Ship me?", "the message is rendered with the run's params"
    assert [a["phase"] for a in task["attempts"]] == ["Succeeded"]

    # The event stream replays the history, then ends because the run has finished.
    events = sse_events(server, user_token, run_id)
    assert events[-1][0] == "end"
    moves = [(d["task"], d["to"]) for kind, d in events if kind == "transition"]
    assert (None, "Succeeded") in moves
    assert ("ship", "Succeeded") in moves
    assert moves.index(("gate", "Succeeded")) < moves.index(("ship", "Running"))
    # The approver is the caller the token authenticated, not the server's own identity.
    approvals = [d for kind, d in events if kind == "transition" and d["kind"] == "Approved"]
    assert [(a["task"], a["actor"], a["message"]) for a in approvals] == [
        ("gate", f"system:serviceaccount:{namespace}:runner", "looks good")
    ], approvals
    # Resuming after an event id gives only what came later.
    last_id = [d["id"] for kind, d in events if kind == "transition"][-1]
    later = server.call(
        "GET",
        f"/api/runs/{run_id}/events",
        token=user_token,
        headers={"Last-Event-ID": str(last_id)},
    )[1]
    assert "event: transition" not in later

    # kwok runs no container, so a log is empty or an error note, but the pods are found.
    status, text = server.call("GET", f"/api/runs/{run_id}/tasks/build/logs", token=user_token)
    assert status == 200, text
    assert text.startswith("==> build attempt 1 (")
    status, body = server.call("GET", f"/api/runs/{run_id}/tasks/gate/logs", token=user_token)
    assert (status, body["error"]["field"]) == (404, "task")

    # The original request shape: a plain object of inputs (numbers become strings).
    status, second = server.call(
        "POST", f"/api/workflows/gated/execute{ns}", token=user_token, body={"who": "x", "count": 3}
    )
    assert status == 201, second
    assert get(control_plane, namespace, "workflowrun", second["name"])["spec"]["params"] == {
        "who": "x",
        "count": "3",
    }
    wait_task(server, user_token, second["runId"], "gate", "Running")
    status, body = server.call("POST", f"/api/runs/{second['runId']}/cancel", token=user_token)
    assert status == 200, body
    assert wait_run(server, user_token, second["runId"], ("Cancelled",))["phase"] == "Cancelled"
    status, body = server.call("POST", f"/api/runs/{second['runId']}/cancel", token=user_token)
    assert status == 409, body

    status, retried = server.call("POST", f"/api/runs/{second['runId']}/retry", token=user_token)
    assert status == 201, retried
    retry_obj = get(control_plane, namespace, "workflowrun", retried["name"])
    assert retry_obj["metadata"]["annotations"]["maestro.dev/retry-of"] == second["runId"]
    assert retry_obj["spec"].get("cancel") is not True


def test_a_fan_out_node_sums_up_its_instances(
    control_plane: ControlPlane, namespace: str, server: ServerProcess, user_token: str
) -> None:
    fan = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "fan"},
        "spec": {
            "tasks": [
                {
                    "name": "each",
                    "forEach": {"items": ["a", "b", "c"]},
                    "container": {"image": "busybox", "command": ["true"]},
                },
                {
                    "name": "after",
                    "dependsOn": ["each"],
                    "container": {"image": "busybox", "command": ["true"]},
                },
            ]
        },
    }
    apply(control_plane, namespace, fan)
    status, started = server.call(
        "POST", f"/api/workflows/fan/execute?namespace={namespace}", token=user_token, body={}
    )
    assert status == 201, started
    detail = wait_run(server, user_token, started["runId"], ("Succeeded", "Failed"))
    assert detail["phase"] == "Succeeded", detail
    node = {t["name"]: t for t in detail["tasks"]}["each"]
    assert (node["phase"], node["message"]) == ("Succeeded", "3/3 instances ended")
    assert [(i["name"], i["phase"]) for i in node["instances"]] == [
        ("each[0]", "Succeeded"),
        ("each[1]", "Succeeded"),
        ("each[2]", "Succeeded"),
    ]
    assert "instances" not in {t["name"]: t for t in detail["tasks"]}["after"]


def test_bad_input_is_a_4xx_naming_the_field_and_creates_nothing(
    control_plane: ControlPlane, namespace: str, server: ServerProcess, user_token: str
) -> None:
    apply(control_plane, namespace, GATED)
    ns = f"?namespace={namespace}"
    cases: list[tuple[str, Any, int, str]] = [
        (f"/api/workflows/nope/execute{ns}", {"params": {"who": "a"}}, 404, "name"),
        (f"/api/workflows/gated/execute{ns}", {"params": {"who": "a", "x": "1"}}, 422, "params.x"),
        (f"/api/workflows/gated/execute{ns}", {"params": {}}, 422, "params.who"),
        (f"/api/workflows/gated/execute{ns}", {"who": None}, 422, "params.who"),
        (f"/api/workflows/gated/execute{ns}", [1, 2], 422, "body"),
        (
            f"/api/workflows/gated/execute{ns}",
            {"params": {"who": "a"}, "name": "Bad_Name"},
            422,
            "name",
        ),
        (
            f"/api/workflows/gated/execute{ns}",
            {"params": {"who": "a"}, "labels": {"a": "b c"}},
            422,
            "labels.a",
        ),
        ("/api/workflows/gated/execute?namespace=Not_A", {"who": "a"}, 422, "query.namespace"),
        ("/api/workflows/Bad!/execute", {"who": "a"}, 422, "path.name"),
    ]
    for path, body, want_status, want_field in cases:
        status, answer = server.call("POST", path, token=user_token, body=body)
        assert (status, answer["error"]["field"]) == (want_status, want_field), (path, body, answer)
        assert answer["error"]["message"]
    status, answer = server.call(
        "POST", f"/api/workflows/gated/execute{ns}", token=user_token, raw=b"{not json"
    )
    assert (status, answer["error"]["field"]) == (422, "body")
    assert run_names(control_plane, namespace) == []

    for query, field in (
        ("cursor=garbage", "cursor"),
        ("limit=0", "query.limit"),
        ("phase=Sleeping", "query.phase.0"),
        ("since=2024-01-01T00:00:00", "since"),
    ):
        status, answer = server.call(
            "GET", f"/api/runs?namespace={namespace}&{query}", token=user_token
        )
        assert status in (400, 422), answer
        assert answer["error"]["field"] == field, (query, answer)


def test_history_pages_and_filters_and_outlives_the_resource(
    control_plane: ControlPlane,
    namespace: str,
    server: ServerProcess,
    user_token: str,
    postgres_url: str,
) -> None:
    # 25 runs recorded straight in the store (as the operator would), 5 of "other".
    async def seed() -> list[str]:
        store = await Store.open(postgres_url)
        try:
            ids = []
            for i in range(25):
                r = await store.create_run(
                    namespace=namespace,
                    name=f"r{i}",
                    workflow_name="other" if i % 5 == 0 else "main",
                    spec={},
                    params={},
                    uid=f"uid-{i}",
                )
                ids.append(r.id)
            return ids
        finally:
            await store.close()

    ids = asyncio.run(seed())
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        query = f"/api/runs?namespace={namespace}&limit=10"
        query += f"&cursor={cursor}" if cursor else ""
        status, page = server.call("GET", query, token=user_token)
        assert status == 200, page
        seen += [r["id"] for r in page["items"]]
        pages += 1
        cursor = page["nextCursor"]
        if cursor is None:
            break
    assert pages == 3
    assert seen == list(reversed(ids)), "newest first, each run exactly once"

    other = server.call("GET", f"/api/runs?namespace={namespace}&workflow=other", token=user_token)[
        1
    ]
    assert sorted(r["name"] for r in other["items"]) == sorted(f"r{i}" for i in range(0, 25, 5))
    pending = server.call(
        "GET", f"/api/runs?namespace={namespace}&phase=Pending&limit=500", token=user_token
    )[1]
    assert len(pending["items"]) == 25
    assert (
        server.call("GET", f"/api/runs?namespace={namespace}&phase=Succeeded", token=user_token)[1][
            "items"
        ]
        == []
    )
    future = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    past = (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert (
        server.call("GET", f"/api/runs?namespace={namespace}&since={future}", token=user_token)[1][
            "items"
        ]
        == []
    )
    window = server.call(
        "GET",
        f"/api/runs?namespace={namespace}&since={past}&until={future}&limit=100",
        token=user_token,
    )[1]
    assert len(window["items"]) == 25

    # A real run whose WorkflowRun is then deleted: its history stays readable.
    apply(control_plane, namespace, GATED)
    started = server.call(
        "POST",
        f"/api/workflows/gated/execute?namespace={namespace}",
        token=user_token,
        body={"who": "me"},
    )[1]
    wait_task(server, user_token, started["runId"], "gate", "Running")
    control_plane.kubectl("delete", "workflowrun", "-n", namespace, started["name"], "--wait=true")
    detail = wait_run(server, user_token, started["runId"], ("Cancelled", "Failed", "Succeeded"))
    assert detail["deleted"] is True
    assert detail["tasks"][0]["phase"] == "Succeeded"
    status, body = server.call(
        "POST", f"/api/runs/{started['runId']}/approve", token=user_token, body={"task": "gate"}
    )
    assert status == 409, body
    assert "deleted" in body["error"]["message"]


# (method, path template, JSON body): every endpoint that needs a caller.
ENDPOINTS: list[tuple[str, str, Any]] = [
    ("POST", "/api/workflows/gated/execute?namespace={ns}", {"who": "x"}),
    ("GET", "/api/runs?namespace={ns}", None),
    ("GET", "/api/runs", None),
    ("GET", "/api/runs/{id}", None),
    ("GET", "/api/runs/{id}/tasks/build", None),
    ("GET", "/api/runs/{id}/events", None),
    ("GET", "/api/runs/{id}/tasks/build/logs", None),
    ("POST", "/api/runs/{id}/approve", {"task": "gate"}),
    ("POST", "/api/runs/{id}/cancel", None),
    ("POST", "/api/runs/{id}/retry", None),
]


@pytest.mark.parametrize(("method", "template", "body"), ENDPOINTS)
def test_unauthorised_callers_get_401_or_403(
    control_plane: ControlPlane,
    namespace: str,
    server: ServerProcess,
    user_token: str,
    nobody_token: str,
    method: str,
    template: str,
    body: Any,
) -> None:
    apply(control_plane, namespace, GATED)
    started = server.call(
        "POST",
        f"/api/workflows/gated/execute?namespace={namespace}",
        token=user_token,
        body={"who": "me"},
    )[1]
    path = template.format(ns=namespace, id=started["runId"])
    before = sorted(run_names(control_plane, namespace))
    spec_before = get(control_plane, namespace, "workflowrun", started["name"])["spec"]
    for token, want in ((None, 401), ("not-a-token", 401), (nobody_token, 403)):
        status, answer = server.call(method, path, token=token, body=body)
        assert status == want, (token, answer)
        assert answer["error"]["message"]
    # The user's own token may not read other namespaces' history, nor all of it.
    status, _ = server.call("GET", "/api/runs?namespace=kube-system", token=user_token)
    assert status == 403
    assert sorted(run_names(control_plane, namespace)) == before, "nothing was created"
    assert get(control_plane, namespace, "workflowrun", started["name"])["spec"] == spec_before


def test_probes_and_openapi(server: ServerProcess) -> None:
    assert server.call("GET", "/health") == (200, {"status": "ok"})
    assert server.call("GET", "/ready") == (200, {"status": "ready"})
    status, schema = server.call("GET", "/openapi.json")
    assert status == 200
    assert schema["openapi"].startswith("3.")
    assert "/api/workflows/{name}/execute" in schema["paths"]


def test_schemathesis_finds_no_server_error(
    control_plane: ControlPlane,
    namespace: str,
    server: ServerProcess,
    user_token: str,
    tmp_path: Path,
) -> None:
    apply(control_plane, namespace, GATED)
    started = server.call(
        "POST",
        f"/api/workflows/gated/execute?namespace={namespace}",
        token=user_token,
        body={"who": "me"},
    )[1]
    assert started["runId"]
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{server.base}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--header",
            f"Authorization: Bearer {user_token}",
            "--max-examples",
            "40",
            "--request-timeout",
            "30",
            "--suppress-health-check",
            "all",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=tmp_path,  # schemathesis keeps a cache in its working directory
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:] + server.log()[-3000:]


def test_server_component_matches_the_chart(control_plane: ControlPlane) -> None:
    """manifests/components/server is the chart's server.enabled=true output, Helm labels
    aside; and the chart renders no server at all by default."""
    import yaml

    from fixtures.operator import REPO

    chart = REPO / "charts" / "maestro"
    default = control_plane.helm("template", "maestro", str(chart), "-n", "maestro").stdout
    assert "maestro-server" not in default
    rendered = control_plane.helm(
        "template",
        "maestro",
        str(chart),
        "-n",
        "maestro",
        "--set",
        "server.enabled=true",
        "--show-only",
        "templates/server.yaml",
    ).stdout

    def clean(text: str) -> list[Any]:
        docs = [d for d in yaml.safe_load_all(text) if d]
        for d in docs:
            for labels in (
                d["metadata"].get("labels", {}),
                d.get("spec", {}).get("template", {}).get("metadata", {}).get("labels", {}),
            ):
                labels.pop("helm.sh/chart", None)
                labels.pop("app.kubernetes.io/managed-by", None)
        return sorted(docs, key=lambda d: (d["kind"], d["metadata"]["name"]))

    component = (REPO / "manifests" / "components" / "server" / "server.yaml").read_text()
    assert clean(component) == clean(rendered)
    kinds = control_plane.kubectl(
        "kustomize", str(REPO / "manifests" / "overlays" / "with-server")
    ).stdout
    assert "name: maestro-server" in kinds


def test_anonymous_only_with_the_flag_and_still_subject_to_rbac(
    control_plane: ControlPlane,
    namespace: str,
    operator: Any,
    postgres_url: str,
    tmp_path: Any,
    user_token: str,
) -> None:
    """--allow-anonymous turns a missing token into system:anonymous, not into access."""
    anon = ServerProcess(
        control_plane.kubeconfig, postgres_url, tmp_path / "anon.log", ["--allow-anonymous"]
    )
    anon.start()
    try:
        status, body = anon.call("GET", f"/api/runs?namespace={namespace}")
        assert status == 403, body
        assert "system:anonymous may not list workflowruns" in body["error"]["message"]
        # A bad token is still refused, not downgraded to anonymous.
        assert anon.call("GET", f"/api/runs?namespace={namespace}", token="bad")[0] == 401
        assert anon.call("GET", f"/api/runs?namespace={namespace}", token=user_token)[0] == 200
        # Granting the anonymous user the verb (as RBAC would) is what opens it.
        control_plane.kubectl(
            "create",
            "rolebinding",
            "anon-list",
            "-n",
            namespace,
            "--role=runner",
            "--user=system:anonymous",
        )
        deadline = time.monotonic() + 30
        while anon.call("GET", f"/api/runs?namespace={namespace}")[0] != 200:
            assert time.monotonic() < deadline, "the anonymous RoleBinding never took effect"
            time.sleep(1)
    finally:
        anon.stop()
