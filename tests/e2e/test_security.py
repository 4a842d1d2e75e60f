"""Issue 11's attacks, each failing closed, on the local control plane and a real PostgreSQL.

The operator runs as the plane's admin here, so every refusal below comes from Maestro's
own checks (SubjectAccessReview, egress policy, budgets, admission policy), not from the
operator lacking a permission.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_operator import run, workflow

from fixtures.control_plane import ControlPlane, KubectlError
from fixtures.operator import (
    REPO,
    OperatorProcess,
    apply,
    free_port,
    get,
    running_operator,
    wait_phase,
)

pytestmark = pytest.mark.e2e

# HTTP tasks may reach the echo server's address, and no other loopback address.
ECHO_HOST = "127.0.0.2"


class _Echo(BaseHTTPRequestHandler):
    """Answers with the X-Token header it got, as a careless or hostile server would."""

    def do_GET(self) -> None:
        body = json.dumps({"token": self.headers.get("X-Token", "")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        """Quiet."""


@pytest.fixture
def echo_url() -> Iterator[str]:
    server = ThreadingHTTPServer((ECHO_HOST, 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://{ECHO_HOST}:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def operator(
    control_plane: ControlPlane, crds: None, namespace: str, postgres_url: str, tmp_path: Path
) -> Iterator[OperatorProcess]:
    """The operator with the default egress policy, plus the echo server's address."""
    with running_operator(
        control_plane,
        namespace,
        postgres_url,
        tmp_path,
        extra=["--egress-allow", f"{ECHO_HOST}/32"],
    ) as op:
        yield op


def secret_header_task(url: str) -> dict[str, Any]:
    header = {"name": "X-Token", "valueFrom": {"secretKeyRef": {"name": "api-token", "key": "t"}}}
    return {"name": "notify", "http": {"url": url, "headers": [header]}}


SECRET = {
    "apiVersion": "v1",
    "kind": "Secret",
    "metadata": {"name": "api-token"},
    "stringData": {"t": "s3cret-value-42"},
}


def grant_get_secret(service_account: str) -> list[dict[str, Any]]:
    """A Role letting one ServiceAccount get the one Secret, and its binding."""
    return [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "read-api-token"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": ["api-token"],
                    "verbs": ["get"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "read-api-token"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-api-token",
            },
            "subjects": [{"kind": "ServiceAccount", "name": service_account}],
        },
    ]


def wait_can_get_secret(cp: ControlPlane, namespace: str, service_account: str) -> None:
    """The authorizer learns bindings through an informer: wait until it knows this one."""
    deadline = time.monotonic() + 30
    who = f"--as=system:serviceaccount:{namespace}:{service_account}"
    while True:
        proc = cp.kubectl(
            "auth", "can-i", "get", "secret/api-token", "-n", namespace, who, check=False
        )
        if proc.stdout.strip() == "yes":
            return
        assert time.monotonic() < deadline, proc.stdout + proc.stderr
        time.sleep(0.1)


def store_text(database_url: str) -> str:
    """Every row of the store's tables, as text (to look for leaked values)."""
    import psycopg

    rows: list[str] = []
    with psycopg.connect(database_url) as conn:
        for table in ("runs", "task_attempts", "events"):
            found = conn.execute(f"SELECT row_to_json(t)::text FROM {table} t").fetchall()
            rows += [r[0] for r in found]
    assert rows, "the store holds nothing: the check below would prove nothing"
    return "\n".join(rows)


def events_text(cp: ControlPlane, namespace: str) -> str:
    return cp.kubectl("get", "events", "-n", namespace, "-o", "json").stdout


# --- Secrets: the run's ServiceAccount, not the operator's power --------------------------


def test_secret_header_refused_without_the_service_accounts_permission(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, echo_url: str
) -> None:
    apply(control_plane, namespace, SECRET, workflow("steal", [secret_header_task(echo_url)]))
    apply(control_plane, namespace, run("steal-1", "steal"))
    status = wait_phase(control_plane, namespace, "steal-1")["status"]
    assert status["phase"] == "Failed"
    task = status["tasks"]["notify"]
    assert task["reason"] == "InputError"
    assert (
        f"serviceaccount {namespace}/default may not get secrets/api-token "
        f"in namespace {namespace}" in task["message"]
    )
    assert "s3cret-value-42" not in json.dumps(status)
    assert "s3cret-value-42" not in events_text(control_plane, namespace)
    assert "s3cret-value-42" not in operator.log()


def test_secret_header_works_when_a_role_grants_get_on_that_secret(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess, echo_url: str
) -> None:
    control_plane.kubectl("create", "serviceaccount", "notifier", "-n", namespace)
    apply(control_plane, namespace, SECRET, *grant_get_secret("notifier"))
    wait_can_get_secret(control_plane, namespace, "notifier")
    wf = workflow("notify", [secret_header_task(echo_url)], serviceAccountName="notifier")
    apply(control_plane, namespace, wf, run("notify-1", "notify"))
    status = wait_phase(control_plane, namespace, "notify-1")["status"]
    assert status["phase"] == "Succeeded", status
    # The echo server got the value; what it sent back is redacted before status/store.
    assert status["tasks"]["notify"]["outputs"] == {"token": "[redacted]"}
    assert "s3cret-value-42" not in json.dumps(status)
    assert "s3cret-value-42" not in events_text(control_plane, namespace)
    assert "s3cret-value-42" not in operator.log()
    assert "s3cret-value-42" not in store_text(operator.database_url)
    # A run acting as another ServiceAccount of the namespace still may not.
    apply(control_plane, namespace, run("notify-2", "notify", serviceAccountName="default"))
    other = wait_phase(control_plane, namespace, "notify-2")["status"]
    assert other["phase"] == "Failed"
    assert f"serviceaccount {namespace}/default may not get" in other["tasks"]["notify"]["message"]


# --- Pods: the run's ServiceAccount and secure defaults ----------------------------------


def test_task_level_service_account_rejected_at_apply(
    control_plane: ControlPlane, namespace: str, crds: None
) -> None:
    task = {"name": "t", "container": {"image": "busybox", "serviceAccountName": "admin"}}
    with pytest.raises(KubectlError) as err:
        apply(control_plane, namespace, workflow("sa", [task]))
    assert "serviceAccountName" in str(err.value)
    assert "unknown field" in str(err.value)


def test_pods_run_as_the_runs_service_account_with_secure_defaults(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    control_plane.kubectl("create", "serviceaccount", "builder", "-n", namespace)
    task = {"name": "build", "container": {"image": "busybox", "command": ["true"]}}
    apply(control_plane, namespace, workflow("pods", [task]))
    apply(control_plane, namespace, run("pods-1", "pods", serviceAccountName="builder"))
    status = wait_phase(control_plane, namespace, "pods-1")["status"]
    assert status["phase"] == "Succeeded", status
    assert status["workflowSpec"]["serviceAccountName"] == "builder"
    pod = get(control_plane, namespace, "pod", status["tasks"]["build"]["podName"])["spec"]
    assert pod["serviceAccountName"] == "builder"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    sc = pod["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}


# --- The admission policy, on the real API server -----------------------------------------


@pytest.fixture
def admission_policy(control_plane: ControlPlane, crds: None) -> Iterator[None]:
    """The manifests' ValidatingAdmissionPolicy and binding, as users apply them."""
    path = REPO / "manifests" / "base" / "admissionpolicy.yaml"
    control_plane.kubectl("apply", "-f", str(path))
    try:
        yield
    finally:
        control_plane.kubectl("delete", "-f", str(path), "--wait=false", check=False)


def apply_until_refused(cp: ControlPlane, namespace: str, doc: dict[str, Any]) -> str:
    """Apply ``doc`` until the fresh policy refuses it (policies load asynchronously)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            apply(cp, namespace, doc)
        except KubectlError as err:
            return str(err)
        cp.kubectl("delete", "-n", namespace, doc["kind"].lower(), doc["metadata"]["name"])
        assert time.monotonic() < deadline, "the admission policy never refused the run"
        time.sleep(0.5)


def test_admission_policy_rejects_a_forbidden_service_account_naming_the_field(
    control_plane: ControlPlane, namespace: str, admission_policy: None
) -> None:
    forbidden = run("escalate", "any", serviceAccountName="cluster-admin-sa")
    text = apply_until_refused(control_plane, namespace, forbidden)
    assert "spec.serviceAccountName" in text
    assert 'ServiceAccount "cluster-admin-sa" may not be used by runs' in text
    assert "(allowed: default)" in text
    # An inline spec is checked too, and a Workflow naming one as well.
    inline = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": "inline"},
        "spec": {
            "workflowSpec": {
                "serviceAccountName": "cluster-admin-sa",
                "tasks": [{"name": "t", "container": {"image": "busybox"}}],
            }
        },
    }
    with pytest.raises(KubectlError, match=r"spec\.workflowSpec\.serviceAccountName"):
        apply(control_plane, namespace, inline)
    wf = workflow("w", [{"name": "t", "container": {"image": "busybox"}}])
    wf["spec"]["serviceAccountName"] = "cluster-admin-sa"
    with pytest.raises(KubectlError, match=r"spec\.serviceAccountName"):
        apply(control_plane, namespace, wf)
    # Allowed: no ServiceAccount named, "default", or what the namespace's annotation lists.
    apply(control_plane, namespace, run("plain", "any"))
    apply(control_plane, namespace, run("dflt", "any", serviceAccountName="default"))
    control_plane.kubectl(
        "annotate", "namespace", namespace, "maestro.dev/allowed-service-accounts=default, ci"
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            apply(control_plane, namespace, run("ci", "any", serviceAccountName="ci"))
            break
        except KubectlError:
            assert time.monotonic() < deadline, "the namespace's annotation was never honoured"
            time.sleep(0.5)
    with pytest.raises(KubectlError, match=r"\(allowed: default, ci\)"):
        apply(control_plane, namespace, forbidden)
    # Narrowing the list later never blocks updates that keep the ServiceAccount (the
    # operator's finalizer patches): an existing run can still be changed and end.
    control_plane.kubectl(
        "annotate",
        "--overwrite",
        "namespace",
        namespace,
        "maestro.dev/allowed-service-accounts=default",
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            apply(control_plane, namespace, run("ci-2", "any", serviceAccountName="ci"))
        except KubectlError:
            break  # the narrowed list is in force
        control_plane.kubectl("delete", "-n", namespace, "workflowrun", "ci-2")
        assert time.monotonic() < deadline, "the narrowed annotation was never honoured"
        time.sleep(0.5)
    control_plane.kubectl("annotate", "-n", namespace, "workflowrun", "ci", "touched=yes")
    control_plane.kubectl("delete", "-n", namespace, "workflowrun", "ci", "--wait=true")


# --- Egress: no reading the operator's own endpoints -------------------------------------


def test_http_task_cannot_read_the_operators_metrics(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    task = {"name": "ssrf", "http": {"url": f"{operator.base}/metrics"}}
    apply(control_plane, namespace, workflow("ssrf", [task]), run("ssrf-1", "ssrf"))
    status = wait_phase(control_plane, namespace, "ssrf-1")["status"]
    assert status["phase"] == "Failed"
    ssrf = status["tasks"]["ssrf"]
    assert ssrf["reason"] == "EgressDenied"
    assert "refused: loopback (127.0.0.0/8) is denied by default" in ssrf["message"]
    assert "maestro_" not in json.dumps(status)  # no metric came back


# --- Budgets: a hostile expression stalls nothing ----------------------------------------


def healthz_seconds(op: OperatorProcess) -> float:
    started = time.monotonic()
    with urllib.request.urlopen(op.base + "/healthz", timeout=30) as rsp:
        assert rsp.status == 200
    return time.monotonic() - started


def test_hostile_expressions_fail_while_a_canary_progresses_and_healthz_answers(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    # The issue's 92-character expression froze the operator for 38.8 s; each extra
    # factor doubled that. With budgets it fails at once, naming the budget.
    bomb = " * ".join(["3**4000000"] * 8) + " > 0"
    hostile = workflow(
        "hostile",
        [
            {"name": "a", "container": {"image": "busybox", "command": ["true"]}},
            {"name": "b", "dependsOn": ["a"], "when": bomb, "container": {"image": "busybox"}},
        ],
    )
    canary = workflow(
        "canary",
        [
            {
                "name": f"step-{i}",
                "dependsOn": [f"step-{i - 1}"] if i else [],
                "container": {"image": "busybox", "command": ["true"]},
            }
            for i in range(4)
        ],
    )
    apply(control_plane, namespace, hostile, canary)
    apply(control_plane, namespace, run("canary-1", "canary"))
    apply(control_plane, namespace, *(run(f"hostile-{i}", "hostile") for i in range(5)))
    slowest = 0.0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        slowest = max(slowest, healthz_seconds(operator))
        phases = [
            (get(control_plane, namespace, "workflowrun", n).get("status") or {}).get("phase")
            for n in ["canary-1", *(f"hostile-{i}" for i in range(5))]
        ]
        if all(p in ("Succeeded", "Failed") for p in phases):
            break
        time.sleep(0.1)
    assert slowest < 1.0, f"/healthz took {slowest:.2f}s"
    assert wait_phase(control_plane, namespace, "canary-1")["status"]["phase"] == "Succeeded"
    for i in range(5):
        status = wait_phase(control_plane, namespace, f"hostile-{i}")["status"]
        assert status["phase"] == "Failed"
        b = status["tasks"]["b"]
        assert b["reason"] == "InvalidExpression"
        assert "over budget" in b["message"]
        assert "would be over 4096 bits" in b["message"]


def test_method_calls_in_when_are_refused_naming_the_task(
    control_plane: ControlPlane, namespace: str, operator: OperatorProcess
) -> None:
    spec = {
        "params": [{"name": "x", "default": "a"}],
        "tasks": [
            {
                "name": "big",
                "when": "params.x.ljust(10**8) == ''",
                "container": {"image": "busybox"},
            }
        ],
    }
    doc = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": "ljust"},
        "spec": {"workflowSpec": spec},
    }
    apply(control_plane, namespace, doc)
    status = wait_phase(control_plane, namespace, "ljust")["status"]
    assert status["phase"] == "Failed"
    assert "big: when: only the functions" in status["message"]
    assert "(no methods)" in status["message"]


# --- The operator's namespace ------------------------------------------------------------


def test_runs_in_the_operators_own_namespace_are_refused(
    control_plane: ControlPlane, crds: None, namespace: str, postgres_url: str, tmp_path: Path
) -> None:
    op = OperatorProcess(
        control_plane.kubeconfig,
        postgres_url,
        namespace,
        tmp_path,
        extra=["--own-namespace", namespace],
    )
    op.start()
    try:
        task = {"name": "t", "container": {"image": "busybox", "command": ["true"]}}
        apply(control_plane, namespace, workflow("w", [task]), run("mine", "w"))
        status = wait_phase(control_plane, namespace, "mine")["status"]
    finally:
        op.kill(signal.SIGTERM)
    assert status["phase"] == "Failed"
    assert f"metadata.namespace: {namespace!r} is the operator's own namespace" in status["message"]


# --- Probes: /metrics and /readyz on a port of their own -------------------------------


def test_metrics_and_readyz_on_their_own_port(
    control_plane: ControlPlane, crds: None, namespace: str, postgres_url: str, tmp_path: Path
) -> None:
    metrics_port = free_port()
    # The fixture passes --metrics-port equal to the probe port; the last one given wins.
    op = OperatorProcess(
        control_plane.kubeconfig,
        postgres_url,
        namespace,
        tmp_path,
        extra=["--metrics-port", str(metrics_port)],
    )
    op.start(wait_ready=False)
    metrics = f"http://127.0.0.1:{metrics_port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(metrics + "/readyz", timeout=5) as rsp:
                    if rsp.status == 200:
                        break
            except OSError:
                pass
            assert op.proc is not None
            assert op.proc.poll() is None, op.log()
            assert time.monotonic() < deadline, op.log()
            time.sleep(0.2)
        with urllib.request.urlopen(metrics + "/metrics", timeout=5) as rsp:
            assert b"maestro_" in rsp.read()
        assert op.get("/healthz")[0] == 200
        # The probe port serves liveness only.
        assert op.get("/metrics")[0] == 404
        assert op.get("/readyz")[0] == 404
    finally:
        op.kill(signal.SIGTERM)


# --- Local mode: no host injection, no leaked environment --------------------------------


def maestro(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "maestro", *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "MAESTRO_HOME": str(tmp_path / "home"), **(env or {})},
        timeout=120,
        check=False,
    )


def local_workflow(path: Path, script: str) -> Path:
    doc = workflow(
        "local",
        [{"name": "say", "container": {"image": "busybox", "command": ["sh", "-c", script]}}],
        params=[{"name": "msg"}],
    )
    path.write_text(yaml.safe_dump(doc))
    return path


def test_local_param_injection_is_inert_with_shquote(tmp_path: Path) -> None:
    quoted = local_workflow(
        tmp_path / "quoted.yaml",
        'printf "%s" {{ params.msg | shquote }} > said; echo {} > "$MAESTRO_OUTPUTS"',
    )
    proc = maestro(tmp_path, "run", "--local", str(quoted), "-p", "msg=hi; id > pwned")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "container tasks run their command on THIS machine" in proc.stdout
    assert not (tmp_path / "pwned").exists()
    assert (tmp_path / "said").read_text() == "hi; id > pwned"
    # The unquoted form is what `maestro validate` warns about.
    unquoted = local_workflow(tmp_path / "unquoted.yaml", "echo {{ params.msg }}")
    checked = maestro(tmp_path, "validate", str(unquoted))
    assert checked.returncode == 0
    assert "warning: say: {{ params.msg }} is pasted unquoted into a shell script" in checked.stderr
    assert "{{ params.msg | shquote }}" in checked.stderr


def test_local_tasks_get_a_minimal_environment(tmp_path: Path) -> None:
    wf = local_workflow(tmp_path / "env.yaml", 'env > seen; echo {} > "$MAESTRO_OUTPUTS"')
    proc = maestro(
        tmp_path, "run", "--local", str(wf), "-p", "msg=x", env={"AWS_SECRET_ACCESS_KEY": "leak"}
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    seen = dict(
        line.split("=", 1) for line in (tmp_path / "seen").read_text().splitlines() if "=" in line
    )
    assert "AWS_SECRET_ACCESS_KEY" not in seen
    assert seen["PATH"] == os.environ["PATH"]
    assert seen["MAESTRO_PARAM_msg"] == "x"
