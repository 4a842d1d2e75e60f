"""The e2e control plane itself: a real API server, RBAC, Jobs run through kwok, clean stop.

These tests guard the assumptions every other e2e test makes about the cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from fixtures.control_plane import (
    ControlPlane,
    KubectlError,
    load_controlplane_module,
    task_pod,
)
from maestro.k8s.client import Api, APIError, PermanentAPIError, load_config

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO / "crds"
CONTROL_PLANE_SH = REPO / "hack" / "control-plane.sh"
T = TypeVar("T")


async def wait_for(what: str, fn: Callable[[], Awaitable[T | None]], seconds: float = 60) -> T:
    """Poll ``fn`` until it returns something truthy; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while True:
        value = await fn()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def api(control_plane: ControlPlane) -> AsyncIterator[Api]:
    """An admin API session for the test cluster."""
    async with await load_config(str(control_plane.kubeconfig)) as session:
        yield session


@pytest.fixture(scope="module")
def crds(control_plane: ControlPlane) -> list[str]:
    """Apply every CRD in ``crds/`` and wait until the API server has established them."""
    files = sorted(CRD_DIR.glob("*.yaml"))
    assert files, f"no CRDs in {CRD_DIR}"
    names = [yaml.safe_load(f.read_text())["metadata"]["name"] for f in files]
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names]
    )
    return names


def test_crds_are_established(control_plane: ControlPlane, crds: list[str]) -> None:
    assert {"workflows.maestro.dev", "workflowruns.maestro.dev"} <= set(crds)
    for name in crds:
        out = control_plane.kubectl("get", f"crd/{name}", "-o", "json").stdout
        conditions = {c["type"]: c["status"] for c in json.loads(out)["status"]["conditions"]}
        assert conditions.get("Established") == "True", conditions
        assert conditions.get("NamesAccepted") == "True", conditions
    # Discovery must serve the new kinds, or kubectl and Kopf cannot find them.
    resources = control_plane.kubectl("api-resources", "--api-group=maestro.dev", "-o", "name")
    assert "workflows.maestro.dev" in resources.stdout.split()
    assert "workflowruns.maestro.dev" in resources.stdout.split()


def _workflow(name: str, task_name: str) -> dict[str, Any]:
    return {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": {"tasks": [{"name": task_name, "container": {"image": "busybox"}}]},
    }


@pytest.mark.usefixtures("crds")
async def test_schema_violations_are_rejected_with_the_field_named(
    control_plane: ControlPlane, namespace: str, api: Api
) -> None:
    # A valid object goes in, so the rejections below are the schema's doing.
    good = yaml.safe_dump(_workflow("ok", "build"))
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=good)

    bad = yaml.safe_dump(_workflow("bad", "Build_Step"))
    proc = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=bad, check=False)
    assert proc.returncode != 0
    assert "spec.tasks[0].name" in proc.stderr, proc.stderr
    assert "should match" in proc.stderr, proc.stderr

    run = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": "wrong-type"},
        # params is a map of strings; a list must be refused by the API server.
        "spec": {"workflowRef": {"name": "ok"}, "params": ["not", "a", "map"]},
    }
    with pytest.raises(PermanentAPIError) as excinfo:
        await api.call(
            "POST",
            f"/apis/maestro.dev/v1alpha1/namespaces/{namespace}/workflowruns",
            "create workflowrun wrong-type",
            body=run,
        )
    assert excinfo.value.status == 422
    assert "spec.params" in excinfo.value.message, excinfo.value.message


def _pods(ns: str) -> str:
    return f"/api/v1/namespaces/{ns}/pods"


async def _create_pod(api: Api, ns: str, pod: dict[str, Any]) -> None:
    await api.call("POST", _pods(ns), f"create pod {ns}/{pod['metadata']['name']}", body=pod)


async def _pod(api: Api, name: str, ns: str) -> dict[str, Any]:
    pod: dict[str, Any] = await api.call("GET", f"{_pods(ns)}/{name}", f"pod {ns}/{name}")
    return pod


async def _ended(api: Api, name: str, ns: str) -> dict[str, Any] | None:
    pod = await _pod(api, name, ns)
    return pod if pod["status"].get("phase") in ("Succeeded", "Failed") else None


async def test_task_pod_succeeds_through_kwok_with_termination_message(
    namespace: str, api: Api
) -> None:
    outputs = json.dumps({"version": "1.2.3", "quoted": 'a "b" \\ c'})
    await _create_pod(api, namespace, task_pod("ok", {"maestro.dev/kwok-message": outputs}))

    pod = await wait_for("pod ok to finish", lambda: _ended(api, "ok", namespace))
    assert pod["status"]["phase"] == "Succeeded"
    assert pod["spec"]["nodeName"] == "kwok-node-0"  # bound by the real scheduler
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 0
    assert terminated["reason"] == "Completed"
    assert json.loads(terminated["message"]) == json.loads(outputs)


async def test_task_pod_annotated_to_fail_fails(namespace: str, api: Api) -> None:
    annotations = {"maestro.dev/kwok-result": "Failed", "maestro.dev/kwok-message": "boom"}
    await _create_pod(api, namespace, task_pod("bad", annotations))

    pod = await wait_for("pod bad to finish", lambda: _ended(api, "bad", namespace))
    assert pod["status"]["phase"] == "Failed"
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    expected = {"exitCode": 1, "reason": "Error", "message": "boom"}
    assert {key: terminated.get(key) for key in expected} == expected


async def test_kwok_delay_holds_a_task_pod_running_and_other_pods_run_on(
    namespace: str, api: Api
) -> None:
    started = time.monotonic()
    await _create_pod(api, namespace, task_pod("slow", {"maestro.dev/kwok-delay": "2s"}))
    server = task_pod("server", {})
    del server["metadata"]["labels"]  # not a task pod: a long-running process
    await _create_pod(api, namespace, server)

    async def running(name: str) -> bool:
        return bool((await _pod(api, name, namespace))["status"].get("phase") == "Running")

    await wait_for("pod slow to run", lambda: running("slow"))
    pod = await wait_for("pod slow to finish", lambda: _ended(api, "slow", namespace))
    assert pod["status"]["phase"] == "Succeeded"
    assert time.monotonic() - started >= 2.0
    assert await running("server")


def _token_kubeconfig(control_plane: ControlPlane, token: str, path: Path) -> Path:
    # Same cluster entry as the admin kubeconfig, but the only credential is the token: a
    # client certificate next to it would authenticate first and hide RBAC.
    admin = yaml.safe_load(control_plane.kubeconfig.read_text())
    ctx_name = admin["current-context"]
    ctx = next(c for c in admin["contexts"] if c["name"] == ctx_name)
    cluster = next(c for c in admin["clusters"] if c["name"] == ctx["context"]["cluster"])
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [cluster],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": cluster["name"], "user": "sa"}}],
        "current-context": "sa",
    }
    path.write_text(yaml.safe_dump(config))
    return path


async def test_service_account_without_rbac_is_refused_until_bound(
    control_plane: ControlPlane, namespace: str, api: Api, tmp_path: Path
) -> None:
    core = f"/api/v1/namespaces/{namespace}"
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "robot"}}
    await api.call("POST", f"{core}/serviceaccounts", "create serviceaccount robot", body=account)
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {"audiences": [], "expirationSeconds": 600},
    }
    answer = await api.call(
        "POST", f"{core}/serviceaccounts/robot/token", "token of robot", body=request
    )
    token: str = answer["status"]["token"]
    kubeconfig = _token_kubeconfig(control_plane, token, tmp_path / "robot.kubeconfig")

    async with await load_config(str(kubeconfig)) as robot:

        async def list_pods(ns: str) -> None:
            await robot.call("GET", _pods(ns), f"pods in {ns}")

        with pytest.raises(PermanentAPIError) as excinfo:
            await list_pods(namespace)
        assert excinfo.value.status == 403
        assert f"system:serviceaccount:{namespace}:robot" in excinfo.value.message

        role = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
        }
        await api.call("POST", f"{rbac}/roles", "create role pod-reader", body=role)
        binding = {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "robot-reads-pods"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "pod-reader",
            },
            "subjects": [{"kind": "ServiceAccount", "name": "robot", "namespace": namespace}],
        }
        await api.call(
            "POST", f"{rbac}/rolebindings", "create rolebinding robot-reads-pods", body=binding
        )

        async def allowed() -> bool:
            try:
                await list_pods(namespace)
            except APIError as err:
                if err.status != 403:
                    raise
                return False
            return True

        await wait_for("the RoleBinding to take effect", allowed, seconds=30)
        # The binding is namespaced: elsewhere the account is still refused.
        with pytest.raises(PermanentAPIError) as excinfo:
            await list_pods("default")
        assert excinfo.value.status == 403

    # kubectl sees the same refusal (and names the verb and resource).
    kubectl = str(control_plane.bin_dir / "kubectl")
    proc = await asyncio.to_thread(
        subprocess.run,
        [kubectl, f"--kubeconfig={kubeconfig}", "get", "secrets", "-n", namespace],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    assert "Forbidden" in proc.stderr
    assert 'cannot list resource "secrets"' in proc.stderr


def test_readyz_answers_ok_through_kubectl(control_plane: ControlPlane) -> None:
    proc = control_plane.kubectl("get", "--raw", "/readyz")
    assert proc.stdout.strip() == "ok"
    if not control_plane.external:
        version = json.loads(control_plane.kubectl("get", "--raw", "/version").stdout)
        assert version["gitVersion"] == load_controlplane_module().K8S_VERSION
        client_version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
        assert client_version["clientVersion"]["gitVersion"] == version["gitVersion"]


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def _child_subreaper() -> Iterator[None]:
    # `up` exits after starting the plane, so its processes are orphaned. Becoming a
    # subreaper makes them our children (instead of PID 1's, which on some sandboxes never
    # reaps), so this test can reap them and then see them gone from the process table.
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_child_subreaper = 36
    assert libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0
    try:
        yield
    finally:
        libc.prctl(pr_set_child_subreaper, 0, 0, 0, 0)


def test_second_plane_up_and_down_via_script_leaves_no_process(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    plane_dir = tmp_path / "plane"
    with _child_subreaper():
        up = subprocess.run(
            [str(CONTROL_PLANE_SH), "up", str(plane_dir)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        pids: dict[str, int] = {}
        try:
            assert up.returncode == 0, up.stderr
            pids = json.loads((plane_dir / "plane.json").read_text())["pids"]
            assert set(pids) == {
                "etcd",
                "kube-apiserver",
                "kube-controller-manager",
                "kube-scheduler",
                "kwok",
            }
            assert up.stdout.strip() == f"export KUBECONFIG={plane_dir / 'kubeconfig'}"
            env = subprocess.run(
                [str(CONTROL_PLANE_SH), "env", str(plane_dir)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            assert f"export KUBECONFIG={plane_dir / 'kubeconfig'}" in env.stdout
            kubectl = str(control_plane.bin_dir / "kubectl")
            ready = subprocess.run(
                [kubectl, f"--kubeconfig={plane_dir / 'kubeconfig'}", "get", "--raw", "/readyz"],
                capture_output=True, text=True, timeout=60, check=True,
            )  # fmt: skip
            assert ready.stdout.strip() == "ok"
            # Two planes coexist: the session's plane is untouched by the second one.
            assert control_plane.kubectl("get", "--raw", "/readyz").stdout.strip() == "ok"
        finally:
            down = subprocess.run(
                [str(CONTROL_PLANE_SH), "down", str(plane_dir)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            for pid in pids.values():
                with contextlib.suppress(ChildProcessError):
                    # Only reaps; `down` must already have stopped them (asserted below).
                    if _state(pid) == "Z":
                        os.waitpid(pid, 0)
    assert down.returncode == 0, down.stderr
    still_there = {name: (pid, _state(pid)) for name, pid in pids.items() if _state(pid)}
    assert not still_there, f"processes left after down: {still_there}"
    ps = subprocess.run(["ps", "-eo", "pid="], capture_output=True, text=True, check=True)
    assert not set(pids.values()) & {int(p) for p in ps.stdout.split()}


def test_kubectl_helper_raises_with_stderr(control_plane: ControlPlane) -> None:
    with pytest.raises(KubectlError, match=r"NotFound|not found"):
        control_plane.kubectl("get", "namespace", "does-not-exist-e2e")
