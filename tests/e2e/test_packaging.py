"""The Helm chart and kustomize manifests against helm, kubectl and the real API server.

The RBAC tests run the real operator process under the chart's ServiceAccount token: the
API server then authorizes every call exactly as it would for the pod.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.control_plane import ControlPlane
from fixtures.operator import REPO, OperatorProcess, apply, wait_phase

pytestmark = pytest.mark.e2e

CHART = REPO / "charts" / "maestro"
MANIFESTS = REPO / "manifests"

# A Kubernetes RBAC denial ('User "…" cannot list resource …') or Kopf's fallback warning.
FORBIDDEN = re.compile(r"forbidden|cannot \w+ resource|not enough permissions", re.I)


def helm(cp: ControlPlane, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Helm without a cluster connection for lint/template (kubeconfig is harmless)."""
    return cp.helm(*args, check=check)


def set_args(values: dict[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def rendered(
    cp: ControlPlane, values: dict[str, str], release: str = "maestro", namespace: str = "maestro"
) -> str:
    """The chart's rendering as text (without CRDs)."""
    return helm(cp, "template", release, str(CHART), "-n", namespace, *set_args(values)).stdout


def template(
    cp: ControlPlane, values: dict[str, str], release: str = "maestro", namespace: str = "maestro"
) -> list[dict[str, Any]]:
    """Rendered objects of the chart (without CRDs)."""
    out = rendered(cp, values, release, namespace)
    return [d for d in yaml.safe_load_all(out) if d]


def kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def operator_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    result: dict[str, Any] = next(c for c in pod["containers"] if c["name"] == "operator")
    return result


VALUE_SETS: dict[str, dict[str, str]] = {
    "default": {},
    "namespaces": {"watchNamespaces": "{team-a,team-b}"},
    "replicas-3": {"replicas": "3"},
    "lease": {"replicas": "2", "lease.seconds": "2.5", "lease.renewSeconds": "0.5"},
    "postgresql": {"postgresql.enabled": "true", "database.existingSecret": ""},
    "servicemonitor": {"serviceMonitor.enabled": "true"},
    "everything": {
        "watchNamespaces": "{team-a}",
        "replicas": "3",
        "postgresql.enabled": "true",
        "serviceMonitor.enabled": "true",
        "image.digest": "sha256:" + "a" * 64,
    },
}


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_helm_lint_passes(control_plane: ControlPlane, name: str) -> None:
    proc = helm(control_plane, "lint", "--strict", str(CHART), *set_args(VALUE_SETS[name]))
    assert "0 chart(s) failed" in proc.stdout


def test_template_default(control_plane: ControlPlane) -> None:
    docs = template(control_plane, {})
    assert kinds(docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "maestro"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    op = operator_container(docs)
    sc = op["securityContext"]
    assert (sc["runAsUser"], sc["allowPrivilegeEscalation"], sc["readOnlyRootFilesystem"]) == (
        10001,
        False,
        True,
    )
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert op["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert op["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert op["args"][:3] == ["operator", "--no-migrate", "--listen-address=0.0.0.0"]
    assert not any(a.startswith("--namespace") for a in op["args"])
    # Even one replica is named in the store's ownership table, with the default lease.
    assert {"--replica=$(POD_NAME)", "--lease-seconds=5", "--renew-seconds=1"} <= set(op["args"])
    assert op["resources"]["requests"]
    # The URL only ever comes from a Secret reference.
    assert op["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "maestro-database", "key": "url"}
    assert "value" not in op["env"][0]
    init = pod["initContainers"][0]
    assert (init["args"], init["securityContext"]) == (["db", "upgrade"], sc)
    mounts = {m["mountPath"] for m in op["volumeMounts"]}
    assert mounts == {"/tmp"}


def test_template_watch_namespaces_is_namespaced(control_plane: ControlPlane) -> None:
    docs = template(control_plane, VALUE_SETS["namespaces"])
    roles = [d for d in docs if d["kind"] == "Role"]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    # Nothing cluster-wide is granted in namespaced mode.
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    # The admission policy applies to the watched namespaces only.
    selector = one(docs, "ValidatingAdmissionPolicyBinding")["spec"]["matchResources"]
    assert selector["namespaceSelector"]["matchExpressions"][0]["values"] == ["team-a", "team-b"]
    args = operator_container(docs)["args"]
    assert [a for a in args if a.startswith("--namespace")] == [
        "--namespace=team-a",
        "--namespace=team-b",
    ]


def test_template_security_values(control_plane: ControlPlane) -> None:
    values = {
        "operator.metricsPort": "9090",
        "egress.allow": "{10.20.0.0/16}",
        "egress.deny": "{10.96.0.0/12,10.244.0.0/16}",
        "tenancy.defaultServiceAccount": "runner",
        "tenancy.allowRunsInOperatorNamespace": "true",
        "tenancy.admissionPolicy.allowedServiceAccounts": "{runner,ci}",
    }
    docs = template(control_plane, values)
    op = operator_container(docs)
    args = op["args"]
    assert "--health-port=8080" in args
    assert "--metrics-port=9090" in args
    assert "--default-service-account=runner" in args
    assert "--allow-runs-in-own-namespace" in args
    assert [a for a in args if a.startswith("--egress")] == [
        "--egress-allow=10.20.0.0/16",
        "--egress-deny=10.96.0.0/12",
        "--egress-deny=10.244.0.0/16",
    ]
    # /readyz and /metrics moved to their own port; liveness stays on the probe port.
    assert {p["name"]: p["containerPort"] for p in op["ports"]} == {"http": 8080, "metrics": 9090}
    assert op["readinessProbe"]["httpGet"]["port"] == "metrics"
    assert op["livenessProbe"]["httpGet"]["port"] == "http"
    assert one(docs, "Service")["spec"]["ports"][0]["targetPort"] == "metrics"
    env = {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in op["env"]
    }
    assert env["POD_NAMESPACE"] == "metadata.namespace"
    assert env["POD_IPS"] == "status.podIPs"
    policy = one(docs, "ValidatingAdmissionPolicy")["spec"]
    allowed = next(v for v in policy["variables"] if v["name"] == "allowed")
    assert allowed["expression"].endswith('["runner","ci"]')
    # The operator may ask the API server what a run's ServiceAccount may do.
    rules = one(docs, "ClusterRole")["rules"]
    assert any("localsubjectaccessreviews" in r["resources"] for r in rules)


def test_template_admission_policy_off(control_plane: ControlPlane) -> None:
    docs = template(control_plane, {"tenancy.admissionPolicy.enabled": "false"})
    assert "ValidatingAdmissionPolicy" not in kinds(docs)
    assert "--default-service-account=default" in operator_container(docs)["args"]


def field_refs(container: dict[str, Any]) -> dict[str, str | None]:
    return {
        e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
        for e in container["env"]
    }


PEERING = re.compile(r"peering|kopf\.dev", re.I)


def test_template_replicas_are_all_active_with_a_pdb(control_plane: ControlPlane) -> None:
    docs = template(control_plane, VALUE_SETS["replicas-3"])
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 3
    # A new pod first, then an old one stops (and hands its buckets over at once).
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
    }
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 30
    op = operator_container(docs)
    # Each replica is named after its pod: $(POD_NAME) is expanded by the kubelet from
    # the container's env, which takes it from the downward API.
    assert "--replica=$(POD_NAME)" in op["args"]
    assert field_refs(op)["POD_NAME"] == "metadata.name"
    assert [a for a in op["args"] if a.startswith(("--lease-seconds", "--renew-seconds"))] == [
        "--lease-seconds=5",
        "--renew-seconds=1",
    ]
    pdb = one(docs, "PodDisruptionBudget")["spec"]
    assert pdb == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]},
    }
    # The operator patches its own finalizer onto runs: patch, not update.
    rules = one(docs, "ClusterRole")["rules"]
    run_verbs = {v for r in rules if "workflowruns" in r["resources"] for v in r["verbs"]}
    assert {"get", "list", "watch", "patch"} <= run_verbs


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_template_has_no_kopf_peering(control_plane: ControlPlane, name: str) -> None:
    # No peering object, flag, RBAC rule or comment: the store decides who drives a run.
    text = rendered(control_plane, VALUE_SETS[name])
    assert PEERING.findall(text) == []
    docs = [d for d in yaml.safe_load_all(text) if d]
    assert not [d for d in docs if "KopfPeering" in d["kind"]]
    for role in (d for d in docs if d["kind"] in ("ClusterRole", "Role")):
        assert not [r for r in role["rules"] if "kopf.dev" in r["apiGroups"]]


def test_template_lease_values_reach_the_flags(control_plane: ControlPlane) -> None:
    # `--set` passes 2.5 as a string: the schema takes it and the flag gets it as written.
    op = operator_container(template(control_plane, VALUE_SETS["lease"]))
    assert "--lease-seconds=2.5" in op["args"]
    assert "--renew-seconds=0.5" in op["args"]
    assert "--lease-seconds=5" not in op["args"]


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"lease.renewSeconds": "2.6"}, "at most half of lease.seconds (5)"),
        ({"lease.seconds": "2.5", "lease.renewSeconds": "1.3"}, "at most half"),
        ({"lease.renewSeconds": "0.05"}, "lease.renewSeconds (0.05) must be at least 0.1"),
        # A string from --set passes the schema's minimum: the template still refuses it.
        ({"lease.seconds": "0.5"}, "lease.seconds (0.5) must be at least 1"),
    ],
)
def test_template_refuses_leases_the_operator_refuses(
    control_plane: ControlPlane, values: dict[str, str], complaint: str
) -> None:
    # The operator's own limits (--lease-seconds >= 1, --renew-seconds >= 0.1 and at most
    # half the lease): better refused at install than by a crash-looping pod.
    proc = helm(control_plane, "template", "maestro", str(CHART), *set_args(values), check=False)
    assert proc.returncode != 0, f"helm template accepted {values}"
    assert complaint in proc.stderr


def test_template_accepts_a_renewal_of_half_the_lease(control_plane: ControlPlane) -> None:
    values = {"lease.seconds": "1", "lease.renewSeconds": "0.5"}
    args = operator_container(template(control_plane, values))["args"]
    assert {"--lease-seconds=1", "--renew-seconds=0.5"} <= set(args)


def test_template_single_replica_has_no_pdb(control_plane: ControlPlane) -> None:
    docs = template(control_plane, {})
    assert one(docs, "Deployment")["spec"]["replicas"] == 1
    assert "PodDisruptionBudget" not in kinds(docs)


def test_template_pdb_min_available_instead(control_plane: ControlPlane) -> None:
    docs = template(control_plane, {"replicas": "3", "podDisruptionBudget.minAvailable": "2"})
    spec = one(docs, "PodDisruptionBudget")["spec"]
    assert spec["minAvailable"] == 2
    assert "maxUnavailable" not in spec
    docs = template(control_plane, {"replicas": "3", "podDisruptionBudget.enabled": "false"})
    assert "PodDisruptionBudget" not in kinds(docs)


def test_template_postgresql(control_plane: ControlPlane) -> None:
    docs = template(control_plane, VALUE_SETS["postgresql"])
    sts = one(docs, "StatefulSet")
    secret = one(docs, "Secret")
    assert sts["metadata"]["name"] == secret["metadata"]["name"] == "maestro-postgresql"
    url = base64.b64decode(secret["data"]["url"]).decode()
    assert re.fullmatch(
        r"postgresql://maestro:[A-Za-z0-9]{32}@maestro-postgresql\.maestro\.svc:5432/maestro", url
    )
    ref = operator_container(docs)["env"][0]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "maestro-postgresql", "key": "url"}
    services = sorted(d["metadata"]["name"] for d in docs if d["kind"] == "Service")
    assert services == ["maestro-metrics", "maestro-postgresql"]


def test_template_servicemonitor(control_plane: ControlPlane) -> None:
    docs = template(control_plane, VALUE_SETS["servicemonitor"])
    monitor = one(docs, "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["port"] == "http-metrics"
    service = one(docs, "Service")
    assert service["spec"]["ports"][0]["name"] == "http-metrics"
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]


def test_template_digest_pins_image(control_plane: ControlPlane) -> None:
    docs = template(control_plane, VALUE_SETS["everything"])
    image = operator_container(docs)["image"]
    assert image == "ghcr.io/maestro-dev/maestro@sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("values", "complaint"),
    [
        ({"replicas": "-1"}, "/replicas"),
        ({"image.pullPolicy": "Sometimes"}, "/image/pullPolicy"),
        ({"database.existingSecret": ""}, "/database/existingSecret"),
        ({"watchNamespaces": "{Not_A_Namespace}"}, "/watchNamespaces/0"),
        ({"operator.logFormat": "xml"}, "/operator/logFormat"),
        ({"service.port": "70000"}, "/service/port"),
        ({"replica": "2"}, "additional properties 'replica'"),
        ({"image.digest": "latest"}, "/image/digest"),
        ({"egress.allow": "{not-a-cidr}"}, "/egress/allow/0"),
        ({"tenancy.defaultServiceAccount": "Bad_SA"}, "/tenancy/defaultServiceAccount"),
        ({"operator.metricsPort": "70000"}, "/operator/metricsPort"),
        ({"lease.seconds": "0"}, "/lease/seconds"),
        ({"lease.renewSeconds": "soon"}, "/lease/renewSeconds"),
        ({"lease.ttl": "5"}, "additional properties 'ttl'"),
        ({"peering.enabled": "true"}, "additional properties 'peering'"),
    ],
)
def test_schema_rejects_bad_values(
    control_plane: ControlPlane, values: dict[str, str], complaint: str
) -> None:
    for cmd in (("template", "maestro"), ("lint",)):
        proc = helm(control_plane, *cmd, str(CHART), *set_args(values), check=False)
        assert proc.returncode != 0, f"helm {cmd[0]} accepted {values}"
        assert complaint in proc.stdout + proc.stderr


def test_schema_rejects_bad_values_at_install(control_plane: ControlPlane, namespace: str) -> None:
    proc = control_plane.helm(
        "install", "bad", str(CHART), "-n", namespace, "--set", "replicas=-1", check=False
    )
    assert proc.returncode != 0
    assert "/replicas" in proc.stderr
    assert control_plane.helm("status", "bad", "-n", namespace, check=False).returncode != 0


def test_chart_crds_equal_top_level() -> None:
    for crd in sorted((REPO / "crds").glob("*.yaml")):
        assert (CHART / "crds" / crd.name).read_bytes() == crd.read_bytes(), (
            f"charts/maestro/crds/{crd.name} is stale: cp crds/*.yaml charts/maestro/crds/"
        )


# --- against the API server ---------------------------------------------------------


def release_objects(cp: ControlPlane, release: str, namespace: str) -> list[dict[str, Any]]:
    manifest = cp.helm("get", "manifest", release, "-n", namespace).stdout
    return [d for d in yaml.safe_load_all(manifest) if d]


def assert_all_exist(cp: ControlPlane, docs: list[dict[str, Any]], namespace: str) -> None:
    for doc in docs:
        meta = doc["metadata"]
        ns = ["-n", meta.get("namespace", namespace)] if doc["kind"] not in CLUSTER_KINDS else []
        kind = (
            f"{doc['kind']}.{doc['apiVersion'].split('/')[0]}"
            if "/" in doc["apiVersion"]
            else doc["kind"]
        )
        got = json.loads(cp.kubectl("get", kind, meta["name"], *ns, "-o", "json").stdout)
        assert (
            got["metadata"]["labels"]["app.kubernetes.io/instance"]
            == meta["labels"]["app.kubernetes.io/instance"]
        )


CLUSTER_KINDS = {"ClusterRole", "ClusterRoleBinding", "Namespace"}


@pytest.fixture
def release(control_plane: ControlPlane, namespace: str) -> Iterator[str]:
    """A release name unique to the test (cluster-scoped objects carry it), uninstalled after."""
    name = f"m{uuid.uuid4().hex[:8]}"
    try:
        yield name
    finally:
        control_plane.helm("uninstall", name, "-n", namespace, "--wait=false", check=False)


def test_helm_install_default(control_plane: ControlPlane, namespace: str, release: str) -> None:
    control_plane.helm(
        "install", release, str(CHART), "-n", namespace, "--wait=false", "--timeout", "2m"
    )
    docs = release_objects(control_plane, release, namespace)
    assert kinds(docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "Deployment",
        "Service",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]
    assert_all_exist(control_plane, docs, namespace)
    for crd in (
        "workflows.maestro.dev",
        "workflowruns.maestro.dev",
        "workflowschedules.maestro.dev",
    ):
        control_plane.kubectl("get", "crd", crd)
    status = control_plane.helm("status", release, "-n", namespace).stdout
    assert "STATUS: deployed" in status
    assert "kind: WorkflowRun" in status  # NOTES.txt shows how to submit a first run


def test_helm_install_ha_namespaced_postgresql(
    control_plane: ControlPlane, namespace: str, release: str
) -> None:
    values = {
        "replicas": "3",
        "watchNamespaces": "{" + namespace + "}",
        "postgresql.enabled": "true",
        "database.existingSecret": "",
    }
    control_plane.helm(
        "install", release, str(CHART), "-n", namespace, "--wait=false", *set_args(values)
    )
    docs = release_objects(control_plane, release, namespace)
    assert {"PodDisruptionBudget", "Role", "StatefulSet", "Secret"} <= set(kinds(docs))
    assert not [k for k in kinds(docs) if "Peering" in k]
    assert one(docs, "Deployment")["spec"]["replicas"] == 3
    assert_all_exist(control_plane, docs, namespace)
    # An upgrade must keep the generated database password (a new one locks the operator
    # out of the database the StatefulSet initialised with the old one).
    secret = f"{release}-maestro-postgresql"
    before = control_plane.kubectl("get", "secret", secret, "-n", namespace, "-o", "json").stdout
    control_plane.helm(
        "upgrade", release, str(CHART), "-n", namespace, "--wait=false", *set_args(values)
    )
    after = control_plane.kubectl("get", "secret", secret, "-n", namespace, "-o", "json").stdout
    assert json.loads(after)["data"] == json.loads(before)["data"]


def test_helm_install_server_dry_run_servicemonitor_needs_its_crd(
    control_plane: ControlPlane, namespace: str
) -> None:
    # Without the Prometheus Operator the API server cannot map ServiceMonitor: the chart
    # must not render it by default (the default install above passed).
    proc = control_plane.helm(
        "install",
        "sm",
        str(CHART),
        "-n",
        namespace,
        "--dry-run=server",
        "--set",
        "serviceMonitor.enabled=true",
        check=False,
    )
    assert proc.returncode != 0
    assert "ServiceMonitor" in proc.stderr


def kustomize(cp: ControlPlane, path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(cp.kubectl("kustomize", str(path)).stdout) if d]


def retarget(docs: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    """The manifests moved from namespace maestro to the test's namespace, and renamed so
    cluster-scoped objects do not clash with other tests; the Namespace itself dropped."""
    suffix = namespace
    out = []
    for doc in docs:
        if doc["kind"] == "Namespace":
            continue
        text = json.dumps(doc)
        if doc["kind"] != "CustomResourceDefinition":
            text = text.replace('"namespace": "maestro"', f'"namespace": "{namespace}"')
        doc = json.loads(text)
        if doc["kind"] in (
            "ClusterRole",
            "ClusterRoleBinding",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
        ):
            doc["metadata"]["name"] += "-" + suffix
            if doc["kind"] == "ClusterRoleBinding":
                doc["roleRef"]["name"] += "-" + suffix
            if doc["kind"] == "ValidatingAdmissionPolicyBinding":
                doc["spec"]["policyName"] += "-" + suffix
        out.append(doc)
    return out


@pytest.mark.parametrize("path", ["base", "overlays/example"])
def test_kustomize_server_dry_run(control_plane: ControlPlane, namespace: str, path: str) -> None:
    docs = kustomize(control_plane, MANIFESTS / path)
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == ["maestro"]
    assert {d["metadata"].get("namespace") for d in docs if d["kind"] == "Deployment"} == {
        "maestro"
    }
    # The whole directory as users apply it; objects of a namespace the dry run only
    # pretends to create are refused ("namespaces not found"), so only the Namespace and
    # CRDs are judged here, and the rest below in the test's namespace.
    proc = control_plane.kubectl(
        "apply", "-k", str(MANIFESTS / path), "--dry-run=server", check=False
    )
    assert "namespace/maestro created (server dry run)" in proc.stdout or (
        "namespace/maestro" in proc.stdout
    )
    assert "customresourcedefinition.apiextensions.k8s.io/workflowruns.maestro.dev" in proc.stdout
    moved = retarget(docs, namespace)
    out = control_plane.kubectl(
        "apply", "--dry-run=server", "-f", "-", input=yaml.safe_dump_all(moved)
    ).stdout
    for doc in moved:
        assert f"/{doc['metadata']['name']} " in out, doc["kind"]


def comparable(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """What must agree between the chart defaults and the kustomize base."""
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    op = next(c for c in pod["containers"] if c["name"] == "operator")
    return {
        "rules": one(docs, "ClusterRole")["rules"],
        "args": op["args"],
        "env": op["env"],
        "probes": (op["livenessProbe"], op["readinessProbe"]),
        "securityContext": (pod["securityContext"], op["securityContext"]),
        "init": pod.get("initContainers"),
        "volumes": pod["volumes"],
        "service": one(docs, "Service")["spec"]["ports"],
        "admission": (
            one(docs, "ValidatingAdmissionPolicy")["spec"],
            one(docs, "ValidatingAdmissionPolicyBinding")["spec"],
        ),
    }


def test_kustomize_base_equals_chart_defaults(control_plane: ControlPlane) -> None:
    base = kustomize(control_plane, MANIFESTS / "base")
    chart = template(control_plane, {})
    assert comparable(base) == comparable(chart)


@pytest.mark.parametrize("path", ["base", "overlays/example", "overlays/with-server"])
def test_kustomize_has_no_kopf_peering(control_plane: ControlPlane, path: str) -> None:
    text = control_plane.kubectl("kustomize", str(MANIFESTS / path)).stdout
    assert PEERING.findall(text) == []
    # with-server adds the server's Deployment: only the operator's is judged.
    docs = [
        d
        for d in yaml.safe_load_all(text)
        if d and not (d["kind"] == "Deployment" and d["metadata"]["name"] != "maestro")
    ]
    op = operator_container(docs)
    assert {"--replica=$(POD_NAME)", "--lease-seconds=5", "--renew-seconds=1"} <= set(op["args"])
    assert field_refs(op)["POD_NAME"] == "metadata.name"


def test_kustomize_overlay_changes_what_it_says(control_plane: ControlPlane) -> None:
    docs = kustomize(control_plane, MANIFESTS / "overlays" / "example")
    op = operator_container(docs)
    assert "--log-format=text" in op["args"]
    assert "--log-format=json" not in op["args"]
    assert op["image"] == "ghcr.io/maestro-dev/maestro:0.1.0"
    assert op["resources"]["limits"]["memory"] == "1Gi"


# --- RBAC: the real operator as the chart's ServiceAccount -------------------------------


class _HeaderEcho(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"token": self.headers.get("X-Token", "")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def echo_url() -> Iterator[str]:
    """An HTTP endpoint answering with the X-Token header it received (for the http task)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HeaderEcho)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def token_kubeconfig(cp: ControlPlane, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the ServiceAccount (TokenRequest), not as admin."""
    token = cp.kubectl("create", "token", sa, "-n", namespace, "--duration=1h").stdout.strip()
    admin = yaml.safe_load(cp.kubeconfig.read_text())
    ctx = next(c for c in admin["contexts"] if c["name"] == admin["current-context"])["context"]
    cluster = next(c for c in admin["clusters"] if c["name"] == ctx["cluster"])["cluster"]
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "plane", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "plane", "user": sa}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def install_rbac(cp: ControlPlane, namespace: str, release: str, values: dict[str, str]) -> str:
    """The chart's ServiceAccount and RBAC objects only, created in the plane."""
    docs = template(cp, values, release=release, namespace=namespace)
    rbac = [
        d
        for d in docs
        if d["kind"]
        in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    ]
    assert rbac, "the chart rendered no RBAC"
    cp.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(rbac))
    sa = str(one(docs, "ServiceAccount")["metadata"]["name"])
    # The authorizer learns new bindings through an informer: a 403 in the first
    # milliseconds would be that delay, not a missing rule.
    deadline = time.monotonic() + 30
    while True:
        proc = cp.kubectl(
            "auth",
            "can-i",
            "patch",
            "workflowruns.maestro.dev",
            "-n",
            namespace,
            f"--as=system:serviceaccount:{namespace}:{sa}",
            check=False,
        )
        if proc.stdout.strip() == "yes":
            return sa
        assert time.monotonic() < deadline, f"RBAC not effective: {proc.stdout}{proc.stderr}"
        time.sleep(0.1)


def rbac_workflow(echo: str) -> list[dict[str, Any]]:
    """A container task, then an HTTP task whose header comes from a Secret."""
    return [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "echo-token"},
            "stringData": {"token": "s3cret"},
        },
        # The run acts as ServiceAccount "default": the operator reads the Secret for it
        # only because this Role lets "default" get that one Secret.
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "read-echo-token"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["secrets"],
                    "resourceNames": ["echo-token"],
                    "verbs": ["get"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "read-echo-token"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "read-echo-token",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "default"}],
        },
        {
            "apiVersion": "maestro.dev/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "rbac"},
            "spec": {
                "tasks": [
                    {
                        "name": "build",
                        "container": {
                            "image": "busybox:1.36",
                            "command": ["true"],
                            "podMetadata": {
                                "annotations": {"maestro.dev/kwok-message": '{"version": "1"}'}
                            },
                        },
                    },
                    {
                        "name": "notify",
                        "dependsOn": ["build"],
                        "http": {
                            "url": echo,
                            "headers": [
                                {
                                    "name": "X-Token",
                                    "valueFrom": {
                                        "secretKeyRef": {"name": "echo-token", "key": "token"}
                                    },
                                }
                            ],
                        },
                    },
                ]
            },
        },
        {
            "apiVersion": "maestro.dev/v1alpha1",
            "kind": "WorkflowRun",
            "metadata": {"name": "rbac-1"},
            "spec": {"workflowRef": {"name": "rbac"}, "ttlSecondsAfterFinished": 3},
        },
    ]


def denials(log: str) -> list[str]:
    # A namespace other tests left Terminating refuses new objects with a 403 that is no
    # RBAC denial; the cluster-wide operator may touch such leftovers.
    return [
        line
        for line in log.splitlines()
        if FORBIDDEN.search(line) and "because it is being terminated" not in line
    ]


@pytest.mark.parametrize("mode", ["namespaced", "clusterwide"])
def test_chart_rbac_is_sufficient(
    control_plane: ControlPlane,
    crds: None,
    namespace: str,
    postgres_url: str,
    tmp_path: Path,
    echo_url: str,
    mode: str,
) -> None:
    release = f"r{uuid.uuid4().hex[:8]}"
    values = {"watchNamespaces": "{" + namespace + "}"} if mode == "namespaced" else {}
    sa = install_rbac(control_plane, namespace, release, values)
    try:
        kubeconfig = token_kubeconfig(control_plane, namespace, sa, tmp_path / "sa.kubeconfig")
        # Really the ServiceAccount, not the admin certificate of the plane's kubeconfig.
        who = subprocess.run(
            [
                str(control_plane.bin_dir / "kubectl"),
                f"--kubeconfig={kubeconfig}",
                *("auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        assert who.stdout == f"system:serviceaccount:{namespace}:{sa}"
        logs = tmp_path / "logs"
        logs.mkdir()
        watched = namespace if mode == "namespaced" else None
        # The echo server is on loopback, which HTTP tasks may not reach by default.
        op = OperatorProcess(
            kubeconfig, postgres_url, watched, logs, extra=["--egress-allow", "127.0.0.1/32"]
        )
        op.start()
        try:
            apply(control_plane, namespace, *rbac_workflow(echo_url))
            done = wait_phase(control_plane, namespace, "rbac-1")
            assert done["status"]["phase"] == "Succeeded", (done["status"], op.log())
            tasks = done["status"]["tasks"]
            # The Secret was read and sent; its echo is kept out of status.
            assert tasks["notify"]["outputs"] == {"token": "[redacted]"}
            assert tasks["build"]["podName"]
            events = json.loads(
                control_plane.kubectl(
                    "get",
                    "events",
                    "-n",
                    namespace,
                    "--field-selector",
                    "involvedObject.name=rbac-1",
                    "-o",
                    "json",
                ).stdout
            )["items"]
            assert events, "no Event was recorded (event creation is silently best effort)"
            # ttlSecondsAfterFinished: the operator deletes the run, with its own token.
            deadline = time.monotonic() + 60
            while (
                control_plane.kubectl(
                    "get", "workflowrun", "rbac-1", "-n", namespace, check=False
                ).returncode
                == 0
            ):
                assert time.monotonic() < deadline, "run not deleted after its TTL"
                time.sleep(0.5)
        finally:
            op.kill()
        log = op.log()
        assert denials(log) == [], log
    finally:
        for doc in template(control_plane, values, release=release, namespace=namespace):
            if doc["kind"] in ("ClusterRole", "ClusterRoleBinding"):
                control_plane.kubectl(
                    "delete", doc["kind"], doc["metadata"]["name"], "--wait=false", check=False
                )


def test_operator_without_rbac_is_denied(
    control_plane: ControlPlane, crds: None, namespace: str, postgres_url: str, tmp_path: Path
) -> None:
    # The check above can fail: a ServiceAccount without the chart's RBAC logs denials.
    control_plane.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    kubeconfig = token_kubeconfig(control_plane, namespace, "nobody", tmp_path / "sa.kubeconfig")
    op = OperatorProcess(kubeconfig, postgres_url, namespace, tmp_path)
    op.start(wait_ready=False)
    try:
        deadline = time.monotonic() + 30
        while not denials(op.log()):
            assert time.monotonic() < deadline, op.log()
            time.sleep(0.5)
    finally:
        op.kill()
