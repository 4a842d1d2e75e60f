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
from kubernetes_asyncio import client

from fixtures.control_plane import ControlPlane, KubectlError, load_controlplane_module
from maestro.k8s.client import load_config

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
async def api(control_plane: ControlPlane) -> AsyncIterator[client.ApiClient]:
    """An admin API client for the test cluster."""
    async with await load_config(str(control_plane.kubeconfig)) as api_client:
        yield api_client


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
    control_plane: ControlPlane, namespace: str, api: client.ApiClient
) -> None:
    # A valid object goes in, so the rejections below are the schema's doing.
    good = yaml.safe_dump(_workflow("ok", "build"))
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=good)

    bad = yaml.safe_dump(_workflow("bad", "Build_Step"))
    proc = control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=bad, check=False)
    assert proc.returncode != 0
    assert "spec.tasks[0].name" in proc.stderr, proc.stderr
    assert "should match" in proc.stderr, proc.stderr

    custom = client.CustomObjectsApi(api)
    run = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": "wrong-type"},
        # params is a map of strings; a list must be refused by the API server.
        "spec": {"workflowRef": {"name": "ok"}, "params": ["not", "a", "map"]},
    }
    with pytest.raises(client.ApiException) as excinfo:
        await custom.create_namespaced_custom_object(
            "maestro.dev", "v1alpha1", namespace, "workflowruns", run
        )
    assert excinfo.value.status == 422
    assert "spec.params" in str(excinfo.value.body), excinfo.value.body


def _task_pod(name: str, annotations: dict[str, str], run: str = "r1") -> dict[str, Any]:
    """A pod as the operator makes one: labelled with its run, which the kwok stages select."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"maestro.dev/run": run}, "annotations": annotations},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "main", "image": "busybox", "command": ["true"]}],
        },
    }


async def _ended(core: client.CoreV1Api, name: str, ns: str) -> client.V1Pod | None:
    pod = await core.read_namespaced_pod(name, ns)
    return pod if pod.status.phase in ("Succeeded", "Failed") else None


async def test_task_pod_succeeds_through_kwok_with_termination_message(
    namespace: str, api: client.ApiClient
) -> None:
    core = client.CoreV1Api(api)
    outputs = json.dumps({"version": "1.2.3", "quoted": 'a "b" \\ c'})
    await core.create_namespaced_pod(
        namespace, _task_pod("ok", {"maestro.dev/kwok-message": outputs})
    )

    pod = await wait_for("pod ok to finish", lambda: _ended(core, "ok", namespace))
    assert pod.status.phase == "Succeeded"
    assert pod.spec.node_name == "kwok-node-0"  # bound by the real scheduler
    terminated = pod.status.container_statuses[0].state.terminated
    assert terminated.exit_code == 0
    assert terminated.reason == "Completed"
    assert json.loads(terminated.message) == json.loads(outputs)


async def test_task_pod_annotated_to_fail_fails(namespace: str, api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    annotations = {"maestro.dev/kwok-result": "Failed", "maestro.dev/kwok-message": "boom"}
    await core.create_namespaced_pod(namespace, _task_pod("bad", annotations))

    pod = await wait_for("pod bad to finish", lambda: _ended(core, "bad", namespace))
    assert pod.status.phase == "Failed"
    terminated = pod.status.container_statuses[0].state.terminated
    assert (terminated.exit_code, terminated.reason, terminated.message) == (1, "Error", "boom")


async def test_kwok_delay_holds_a_task_pod_running_and_other_pods_run_on(
    namespace: str, api: client.ApiClient
) -> None:
    core = client.CoreV1Api(api)
    started = time.monotonic()
    await core.create_namespaced_pod(namespace, _task_pod("slow", {"maestro.dev/kwok-delay": "2s"}))
    server = _task_pod("server", {})
    del server["metadata"]["labels"]  # not a task pod: a long-running process
    await core.create_namespaced_pod(namespace, server)

    async def running(name: str) -> bool:
        return bool((await core.read_namespaced_pod(name, namespace)).status.phase == "Running")

    await wait_for("pod slow to run", lambda: running("slow"))
    pod = await wait_for("pod slow to finish", lambda: _ended(core, "slow", namespace))
    assert pod.status.phase == "Succeeded"
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
    control_plane: ControlPlane, namespace: str, api: client.ApiClient, tmp_path: Path
) -> None:
    core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
    await core.create_namespaced_service_account(
        namespace, client.V1ServiceAccount(metadata=client.V1ObjectMeta(name="robot"))
    )
    request = client.AuthenticationV1TokenRequest(
        spec=client.V1TokenRequestSpec(audiences=[], expiration_seconds=600)
    )
    token = (
        await core.create_namespaced_service_account_token("robot", namespace, request)
    ).status.token
    kubeconfig = _token_kubeconfig(control_plane, token, tmp_path / "robot.kubeconfig")

    async with await load_config(str(kubeconfig)) as robot_api:
        robot = client.CoreV1Api(robot_api)
        with pytest.raises(client.ApiException) as excinfo:
            await robot.list_namespaced_pod(namespace)
        assert excinfo.value.status == 403
        assert f"system:serviceaccount:{namespace}:robot" in str(excinfo.value.body)

        await rbac.create_namespaced_role(
            namespace,
            client.V1Role(
                metadata=client.V1ObjectMeta(name="pod-reader"),
                rules=[client.V1PolicyRule(api_groups=[""], resources=["pods"], verbs=["list"])],
            ),
        )
        await rbac.create_namespaced_role_binding(
            namespace,
            client.V1RoleBinding(
                metadata=client.V1ObjectMeta(name="robot-reads-pods"),
                role_ref=client.V1RoleRef(
                    api_group="rbac.authorization.k8s.io", kind="Role", name="pod-reader"
                ),
                subjects=[
                    client.RbacV1Subject(kind="ServiceAccount", name="robot", namespace=namespace)
                ],
            ),
        )

        async def allowed() -> bool:
            try:
                await robot.list_namespaced_pod(namespace)
            except client.ApiException as err:
                if err.status != 403:
                    raise
                return False
            return True

        await wait_for("the RoleBinding to take effect", allowed, seconds=30)
        # The binding is namespaced: elsewhere the account is still refused.
        with pytest.raises(client.ApiException) as excinfo:
            await robot.list_namespaced_pod("default")
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
