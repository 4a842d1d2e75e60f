"""The container executor's pod: its manifest, and what each pod state means for the attempt.

The Kubernetes side is a small in-memory stand-in for the three pod calls the executor
makes (the e2e tests in tests/e2e run the same paths against a real API server).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from security_kit import attempt

from maestro.engine.executor import StartRejected
from maestro.executors.container import ContainerExecutor
from maestro.k8s.client import NamespaceTerminating, NotFound
from maestro.store.leases import bucket_of


class FakePods:
    """create/get/delete pod and namespace_terminating, as :class:`maestro.k8s.client.Kube`."""

    def __init__(self) -> None:
        self.pods: dict[tuple[str, str], dict[str, Any]] = {}
        self.gets = 0
        self.terminating = False

    async def create_pod(self, namespace: str, pod: dict[str, Any]) -> bool:
        key = (namespace, pod["metadata"]["name"])
        if key in self.pods:
            return False
        self.pods[key] = pod
        return True

    async def get_pod(self, namespace: str, name: str) -> dict[str, Any]:
        self.gets += 1
        if (namespace, name) not in self.pods:
            raise NotFound(f"pod {namespace}/{name}", "not found", status=404)
        return self.pods[(namespace, name)]

    async def delete_pod(self, namespace: str, name: str) -> None:
        self.pods.pop((namespace, name), None)

    async def namespace_terminating(self, namespace: str) -> bool:
        return self.terminating

    async def pod_log_tail(self, namespace: str, pod: str, lines: int = 5) -> str:
        return ""


TASK = {"name": "t", "timeoutSeconds": 30, "container": {"image": "busybox"}}


def setup() -> tuple[ContainerExecutor, FakePods, list[str]]:
    kube = FakePods()
    woken: list[str] = []
    return ContainerExecutor(kube, woken.append), kube, woken  # type: ignore[arg-type]


def ended(pod: dict[str, Any], phase: str, **status: Any) -> dict[str, Any]:
    return {**pod, "status": {"phase": phase, **status}}


def test_pod_is_owned_by_the_run_never_restarts_and_has_the_task_deadline() -> None:
    executor, _, _ = setup()
    task = {
        **TASK,
        "container": {
            "image": "busybox",
            "podMetadata": {"labels": {"team": "a"}, "annotations": {"note": "x"}},
        },
    }
    pod = executor.manifest(attempt(task))
    assert (pod["apiVersion"], pod["kind"], pod["metadata"]["name"]) == ("v1", "Pod", "r1-t-1")
    owner = pod["metadata"]["ownerReferences"]
    assert [(o["kind"], o["name"], o["uid"], o["controller"]) for o in owner] == [
        ("WorkflowRun", "r1", "uid-1", True)
    ]
    assert pod["metadata"]["labels"] == {
        "team": "a",
        "app.kubernetes.io/managed-by": "maestro",
        "maestro.dev/run": "r1",
        "maestro.dev/run-id": "run-1",
        "maestro.dev/task": "t",
        "maestro.dev/attempt": "1",
        # The replica holding the run's bucket watches its pods by this label.
        "maestro.dev/bucket": str(bucket_of("uid-1")),
    }
    assert pod["metadata"]["annotations"] == {"note": "x"}
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["activeDeadlineSeconds"] == 30
    without = executor.manifest(attempt({"name": "t", "container": {"image": "busybox"}}))
    assert "activeDeadlineSeconds" not in without["spec"]


def test_start_twice_is_one_pod_and_a_foreign_pod_of_that_name_is_refused() -> None:
    executor, kube, _ = setup()
    ctx = attempt(TASK)
    asyncio.run(executor.start(ctx))
    asyncio.run(executor.start(ctx))  # a start repeated after a crash: AlreadyExists is ours
    assert list(kube.pods) == [("team-a", "r1-t-1")]
    kube.pods[("team-a", "r1-t-1")]["metadata"]["labels"]["maestro.dev/run-id"] = "other"
    with pytest.raises(StartRejected, match="belongs to run 'other'") as err:
        asyncio.run(executor.start(ctx))
    assert err.value.reason == "NameTaken"


def test_watch_feeds_polls_and_only_an_end_or_a_deletion_wakes_the_run() -> None:
    executor, kube, woken = setup()
    ctx = attempt(TASK)
    asyncio.run(executor.start(ctx))
    pod = kube.pods[("team-a", "r1-t-1")]
    executor.observe(ended(pod, "Running"))
    assert woken == []
    assert asyncio.run(executor.poll(ctx)) is None
    assert kube.gets == 0  # the watch's copy was fresh
    message = '{"v": 1}'
    done = ended(
        pod,
        "Succeeded",
        containerStatuses=[{"name": "main", "state": {"terminated": {"message": message}}}],
    )
    executor.observe(done)
    assert woken == ["run-1"]
    result = asyncio.run(executor.poll(ctx))
    assert result is not None
    assert result.outputs == {"v": 1}
    assert kube.gets == 0


@pytest.mark.parametrize(
    ("status", "reason", "text"),
    [
        (
            {"reason": "DeadlineExceeded"},
            "TimedOut",
            "pod r1-t-1 exceeded activeDeadlineSeconds=30",
        ),
        (
            {"reason": "Evicted", "message": "The node was low on resource: memory."},
            "Evicted",
            "pod r1-t-1 failed: Evicted: The node was low on resource: memory.",
        ),
        (
            {
                "containerStatuses": [
                    {
                        "name": "main",
                        "state": {"terminated": {"exitCode": 2, "reason": "Error", "message": "x"}},
                    }
                ]
            },
            "Error",
            "exit code 2 (Error): x",
        ),
    ],
    ids=["deadline", "evicted", "exit-code"],
)
def test_failed_pod_says_why(status: dict[str, Any], reason: str, text: str) -> None:
    executor, kube, _ = setup()
    ctx = attempt(TASK)
    asyncio.run(executor.start(ctx))
    key = ("team-a", "r1-t-1")
    kube.pods[key] = ended(kube.pods[key], "Failed", **status)
    result = asyncio.run(executor.poll(ctx))
    assert result is not None
    assert (result.reason, result.message) == (reason, text)


def test_pod_deleted_or_being_deleted_before_it_ended_is_a_failed_attempt() -> None:
    executor, kube, woken = setup()
    ctx = attempt(TASK)
    asyncio.run(executor.start(ctx))
    key = ("team-a", "r1-t-1")
    going = {**kube.pods[key], "status": {"phase": "Running"}}
    going["metadata"] = {**going["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"}
    executor.observe(going)
    assert woken == ["run-1"]
    result = asyncio.run(executor.poll(ctx))
    assert result is not None
    assert result.reason == "Deleted", result
    # Gone altogether (the watch saw the deletion, or missed it: the API says 404).
    executor.observe(going, deleted=True)
    del kube.pods[key]
    result = asyncio.run(executor.poll(ctx))
    assert result is not None
    assert result.reason == "Deleted"
    assert "not created again" in result.message


def test_pod_gone_with_its_namespace_is_no_failure_of_the_task() -> None:
    executor, kube, _ = setup()
    ctx = attempt(TASK)
    kube.terminating = True
    with pytest.raises(NamespaceTerminating):
        asyncio.run(executor.poll(ctx))
