"""Task pods run as the run's ServiceAccount with secure defaults; Secrets need a SAR."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError
from security_kit import attempt

from maestro.api.models import ContainerTask, WorkflowRunSpec
from maestro.executors.container import ContainerExecutor
from maestro.executors.environment import OUTPUTS_IN_POD, task_env
from maestro.executors.secrets import KubeSecrets, SecretForbidden, SecretUnavailable
from maestro.k8s.client import AccessCheckFailed


def pod_of(container: dict[str, Any], service_account: str | None = "robot") -> dict[str, Any]:
    ctx = attempt({"name": "t", "container": container}, service_account=service_account)
    manifest = ContainerExecutor(kube=None, wake=lambda _: None).manifest(ctx)  # type: ignore[arg-type]
    pod: dict[str, Any] = manifest["spec"]
    return pod


def test_pod_runs_as_the_runs_service_account_with_secure_defaults() -> None:
    pod = pod_of({"image": "busybox"})
    assert pod["serviceAccountName"] == "robot"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert pod["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_run_without_a_service_account_uses_default() -> None:
    assert pod_of({"image": "busybox"}, service_account=None)["serviceAccountName"] == "default"


def test_task_may_ask_for_the_token_and_adjust_its_security_context() -> None:
    pod = pod_of(
        {
            "image": "busybox",
            "automountServiceAccountToken": True,
            "securityContext": {"runAsNonRoot": True, "readOnlyRootFilesystem": True},
        }
    )
    assert pod["automountServiceAccountToken"] is True
    ctx = pod["containers"][0]["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["allowPrivilegeEscalation"] is False


def test_task_level_service_account_is_rejected_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="serviceAccountName"):
        ContainerTask.model_validate({"image": "busybox", "serviceAccountName": "admin"})


def test_run_spec_names_its_service_account() -> None:
    spec = WorkflowRunSpec.model_validate(
        {"workflowRef": {"name": "w"}, "serviceAccountName": "ci"}
    )
    assert spec.service_account_name == "ci"


def test_outputs_are_offered_as_environment_variables() -> None:
    env = task_env(attempt({"name": "t", "container": {"image": "busybox"}}), OUTPUTS_IN_POD)
    assert env["MAESTRO_OUTPUT_BUILD_IMAGE"] == "x:1"
    assert env["MAESTRO_OUTPUT_BUILD_META"] == '{"k": 1}'


class _FakeKube:
    """The two calls KubeSecrets makes; records what was asked."""

    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self.asked: list[tuple[str, ...]] = []
        self.read = False

    async def service_account_can(
        self, namespace: str, service_account: str, verb: str, resource: str, name: str
    ) -> tuple[bool, str]:
        self.asked.append((namespace, service_account, verb, resource, name))
        return self.allowed, "" if self.allowed else "no RBAC policy matched"

    async def read_secret_key(self, namespace: str, name: str, key: str) -> str | None:
        self.read = True
        return "value" if key == "token" else None


async def test_secret_read_only_after_the_review_allows_it() -> None:
    kube = _FakeKube(allowed=True)
    secrets = KubeSecrets(kube)  # type: ignore[arg-type]
    assert await secrets.read("team-a", "api", "token", service_account="robot") == "value"
    assert kube.asked == [("team-a", "robot", "get", "secrets", "api")]
    with pytest.raises(SecretUnavailable, match="has no key 'nope'"):
        await secrets.read("team-a", "api", "nope", service_account="robot")


async def test_review_that_cannot_be_made_fails_closed() -> None:
    class _Broken(_FakeKube):
        async def service_account_can(self, *args: str) -> tuple[bool, str]:
            raise AccessCheckFailed("cannot review: 403 Forbidden")

    kube = _Broken(allowed=True)
    with pytest.raises(SecretUnavailable, match="cannot review: 403 Forbidden"):
        await KubeSecrets(kube).read("team-a", "api", "token", service_account="robot")  # type: ignore[arg-type]
    assert kube.read is False


async def test_denied_review_names_service_account_verb_and_object_and_reads_nothing() -> None:
    kube = _FakeKube(allowed=False)
    with pytest.raises(SecretForbidden) as err:
        await KubeSecrets(kube).read("team-a", "api", "token", service_account="robot")  # type: ignore[arg-type]
    text = str(err.value)
    assert "serviceaccount team-a/robot may not get secrets/api in namespace team-a" in text
    assert "no RBAC policy matched" in text
    assert kube.read is False
