"""Volumes, mounts and pod placement reach the task's pod; bad input names the field."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from pydantic import ValidationError
from security_kit import attempt

from maestro.api.models import WorkflowSpec
from maestro.dag.validate import validate, workspace_warnings
from maestro.executors.container import ContainerExecutor
from maestro.executors.podspec import claim_name, claims

VOLUMES = [
    {"name": "src", "persistentVolumeClaim": {"claimName": "source"}},
    {"name": "cfg", "configMap": {"name": "settings", "items": [{"key": "a", "path": "a.txt"}]}},
    {"name": "creds", "secret": {"secretName": "token", "defaultMode": 0o400}},
    {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
]
TEMPLATE = {
    "nodeSelector": {"disk": "ssd"},
    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ci"}],
    "priorityClassName": "batch",
    "imagePullSecrets": [{"name": "registry"}],
}


def pod_of(task: dict[str, Any], **workflow: Any) -> dict[str, Any]:
    ctx = attempt(task)
    snapshot = WorkflowSpec.model_validate({**ctx.run.spec, **workflow})
    run = dataclasses.replace(
        ctx.run, spec=snapshot.model_dump(mode="json", by_alias=True, exclude_none=True)
    )
    ctx = dataclasses.replace(ctx, run=run)
    manifest = ContainerExecutor(kube=None, wake=lambda _: None).manifest(ctx)  # type: ignore[arg-type]
    pod: dict[str, Any] = manifest["spec"]
    return pod


def test_pod_gets_only_the_volumes_its_task_mounts_with_their_mounts() -> None:
    task = {
        "name": "t",
        "container": {
            "image": "busybox",
            "volumeMounts": [
                {"name": "src", "mountPath": "/src", "subPath": "app/./v1"},
                {"name": "cfg", "mountPath": "/etc/app", "readOnly": True},
            ],
        },
    }
    pod = pod_of(task, volumes=VOLUMES)
    assert [v["name"] for v in pod["volumes"]] == ["src", "cfg"]
    assert pod["volumes"][0]["persistentVolumeClaim"] == {"claimName": "source", "readOnly": False}
    assert pod["volumes"][1]["configMap"]["items"] == [{"key": "a", "path": "a.txt"}]
    assert pod["containers"][0]["volumeMounts"] == [
        {"name": "src", "mountPath": "/src", "readOnly": False, "subPath": "app/./v1"},
        {"name": "cfg", "mountPath": "/etc/app", "readOnly": True},
    ]
    # The secure defaults are untouched by the additions.
    assert pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_secret_and_empty_dir_volumes_render_as_kubernetes_expects() -> None:
    task = {
        "name": "t",
        "container": {
            "image": "busybox",
            "volumeMounts": [
                {"name": "creds", "mountPath": "/creds", "readOnly": True},
                {"name": "scratch", "mountPath": "/tmp/work"},
            ],
        },
    }
    volumes = pod_of(task, volumes=VOLUMES)["volumes"]
    assert volumes[0] == {
        "name": "creds",
        "secret": {"secretName": "token", "items": [], "defaultMode": 256, "optional": False},
    }
    assert volumes[1] == {"name": "scratch", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}}


def test_task_without_mounts_or_template_gets_no_extra_pod_fields() -> None:
    pod = pod_of({"name": "t", "container": {"image": "busybox"}}, volumes=VOLUMES)
    for key in ("volumes", "nodeSelector", "tolerations", "affinity", "imagePullSecrets"):
        assert key not in pod
    assert "volumeMounts" not in pod["containers"][0]


def test_workflow_pod_template_applies_and_a_task_overrides_field_by_field() -> None:
    inherit = pod_of({"name": "t", "container": {"image": "busybox"}}, podTemplate=TEMPLATE)
    assert inherit["nodeSelector"] == {"disk": "ssd"}
    assert inherit["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "ci"}]
    assert inherit["priorityClassName"] == "batch"
    assert inherit["imagePullSecrets"] == [{"name": "registry"}]

    own = {
        "tolerations": [],
        "runtimeClassName": "gvisor",
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {}}},
    }
    task = {"name": "t", "container": {"image": "busybox", "podTemplate": own}}
    pod = pod_of(task, podTemplate=TEMPLATE)
    assert pod["tolerations"] == []  # set by the task, even empty: wins whole
    assert pod["nodeSelector"] == {"disk": "ssd"}  # left out by the task: inherited
    assert pod["runtimeClassName"] == "gvisor"
    assert pod["affinity"] == own["affinity"]


def spec_problems(tasks: list[dict[str, Any]], **workflow: Any) -> list[str]:
    return [str(p) for p in validate(WorkflowSpec.model_validate({"tasks": tasks, **workflow}))]


def test_unknown_volume_and_duplicate_names_are_named() -> None:
    task = {
        "name": "build",
        "container": {
            "image": "busybox",
            "volumeMounts": [
                {"name": "src", "mountPath": "/src"},
                {"name": "nope", "mountPath": "/src"},
            ],
        },
    }
    volumes = [VOLUMES[0], {"name": "src", "emptyDir": {}}]
    assert spec_problems([task], volumes=volumes) == [
        "volumes: name 'src' is used 2 times",
        "build: container.volumeMounts[1].name: unknown volume 'nope' "
        "(spec.volumes and spec.workspaces: src)",
        "build: container.volumeMounts[1].mountPath: '/src' is mounted twice",
    ]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"volumes": [{"name": "v"}]}, "exactly one of persistentVolumeClaim"),
        (
            {"volumes": [{"name": "v", "emptyDir": {}, "configMap": {"name": "c"}}]},
            "exactly one of persistentVolumeClaim",
        ),
        ({"volumes": [{"name": "Bad_Name", "emptyDir": {}}]}, "volumes.0.name"),
        ({"volumes": [{"name": "v", "hostPath": {"path": "/"}}]}, "volumes.0.hostPath"),
        ({"volumes": [{"name": "v", "emptyDir": {"medium": "Disk"}}]}, "emptyDir.medium"),
        (
            {"volumes": [{"name": "v", "secret": {"secretName": "s", "defaultMode": 4096}}]},
            "defaultMode",
        ),
        ({"podTemplate": {"tolerations": [{"effect": "Sometimes"}]}}, "tolerations.0.effect"),
        ({"podTemplate": {"affinity": {"nodeAfinity": {}}}}, "affinity.nodeAfinity"),
        ({"podTemplate": {"hostNetwork": True}}, "podTemplate.hostNetwork"),
    ],
)
def test_bad_workflow_level_input_names_the_field(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        WorkflowSpec.model_validate({"tasks": [{"name": "t", "approval": {}}], **payload})


@pytest.mark.parametrize(
    ("mount", "field"),
    [
        ({"name": "v", "mountPath": "relative"}, "mountPath"),
        ({"name": "v", "mountPath": "/x", "subPath": "/abs"}, "subPath"),
        ({"name": "v", "mountPath": "/x", "subPath": "a/../../etc"}, "subPath"),
        ({"name": "v", "mountPath": "/x", "subPath": ".."}, "subPath"),
        ({"name": "v"}, "mountPath"),
    ],
)
def test_bad_mount_names_the_field(mount: dict[str, Any], field: str) -> None:
    task = {"name": "t", "container": {"image": "busybox", "volumeMounts": [mount]}}
    with pytest.raises(ValidationError, match=f"volumeMounts.0.{field}"):
        WorkflowSpec.model_validate({"tasks": [task]})


@pytest.mark.parametrize("sub_path", ["a", "a/b", ".hidden", "..data", "a//b", "./a", "a/"])
def test_legal_sub_paths(sub_path: str) -> None:
    mount = {"name": "v", "mountPath": "/x", "subPath": sub_path}
    task = {"name": "t", "container": {"image": "busybox", "volumeMounts": [mount]}}
    WorkflowSpec.model_validate({"tasks": [task], "volumes": [{"name": "v", "emptyDir": {}}]})


WORKSPACE = {
    "name": "src",
    "volumeClaimTemplate": {
        "metadata": {"labels": {"team": "a"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    },
}


def test_workspace_is_a_claim_per_run_owned_by_it_unless_retained() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "tasks": [{"name": "t", "approval": {}}],
            "workspaces": [WORKSPACE, {**WORKSPACE, "name": "keep", "reclaimPolicy": "Retain"}],
        }
    )
    owned, kept = claims(spec, "r1", "uid-1")
    assert owned["metadata"]["name"] == "r1-src"
    assert owned["metadata"]["labels"] == {
        "team": "a",
        "maestro.dev/run": "r1",
        "maestro.dev/workspace": "src",
    }
    assert owned["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert owned["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "1Gi"}},
    }
    assert "ownerReferences" not in kept["metadata"]
    long = claim_name("r" * 60, "workspace")
    assert len(long) <= 63
    assert long == claim_name("r" * 60, "workspace")


def test_task_mounting_a_workspace_gets_the_runs_claim() -> None:
    task = {
        "name": "t",
        "container": {"image": "busybox", "volumeMounts": [{"name": "src", "mountPath": "/w"}]},
    }
    pod = pod_of(task, workspaces=[WORKSPACE])
    assert pod["volumes"] == [{"name": "src", "persistentVolumeClaim": {"claimName": "r1-src"}}]


def test_two_workspaces_with_one_name_and_a_clash_with_a_volume_are_named() -> None:
    task = {
        "name": "t",
        "container": {"image": "busybox", "volumeMounts": [{"name": "nope", "mountPath": "/w"}]},
    }
    volumes = [{"name": "src", "emptyDir": {}}]
    assert spec_problems([task], workspaces=[WORKSPACE, WORKSPACE], volumes=volumes) == [
        "workspaces: name 'src' is used 2 times",
        "workspaces: 'src' is also the name of a volume",
        "t: container.volumeMounts[0].name: unknown volume 'nope' "
        "(spec.volumes and spec.workspaces: src)",
    ]


def test_parallel_tasks_on_a_read_write_once_workspace_are_warned_about() -> None:
    mount = {"volumeMounts": [{"name": "src", "mountPath": "/w"}]}
    tasks = [
        {"name": "a", "container": {"image": "x", **mount}},
        {"name": "b", "container": {"image": "x", **mount}},
        {"name": "c", "dependsOn": ["a", "b"], "container": {"image": "x", **mount}},
    ]
    spec = WorkflowSpec.model_validate({"tasks": tasks, "workspaces": [WORKSPACE]})
    (warning,) = workspace_warnings(spec)
    assert str(warning).startswith(
        "b: workspace 'src' is ReadWriteOnce and tasks 'a' and 'b' may run at once"
    )
    rwx = {
        **WORKSPACE,
        "volumeClaimTemplate": {
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            }
        },
    }
    assert (
        workspace_warnings(WorkflowSpec.model_validate({"tasks": tasks, "workspaces": [rwx]})) == []
    )


@pytest.mark.parametrize(
    ("workspace", "field"),
    [
        ({"name": "w"}, "workspaces.0.volumeClaimTemplate"),
        (
            {"name": "w", "volumeClaimTemplate": {"spec": {"resources": {"requests": {}}}}},
            "accessModes",
        ),
        (
            {
                **WORKSPACE,
                "volumeClaimTemplate": {
                    "spec": {
                        "accessModes": ["ReadWriteSometimes"],
                        "resources": {"requests": {"storage": 1}},
                    }
                },
            },
            "accessModes.0",
        ),
        ({**WORKSPACE, "reclaimPolicy": "Recycle"}, "reclaimPolicy"),
    ],
)
def test_bad_workspace_fields_are_named(workspace: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        WorkflowSpec.model_validate(
            {"tasks": [{"name": "t", "approval": {}}], "workspaces": [workspace]}
        )


def test_declared_output_files_add_their_paths_to_the_outputs() -> None:
    task = {
        "name": "t",
        "container": {
            "image": "busybox",
            "volumeMounts": [{"name": "src", "mountPath": "/w"}],
            "outputFiles": [{"name": "report", "workspace": "src", "path": "out/junit.xml"}],
        },
    }
    ctx = attempt(task)
    executor = ContainerExecutor(kube=None, wake=lambda _: None)  # type: ignore[arg-type]
    # The pod as the watch saw it end (no API request needed).
    pod = {
        "metadata": {"name": "r1-t-1", "namespace": "team-a"},
        "status": {
            "phase": "Succeeded",
            "containerStatuses": [
                {"name": "main", "state": {"terminated": {"message": '{"passed": 12}'}}}
            ],
        },
    }
    result = executor._succeeded(ctx, pod)
    assert result.outputs == {"report": "out/junit.xml", "passed": 12}


@pytest.mark.parametrize(
    ("output", "mounts", "problem"),
    [
        (
            {"name": "report", "workspace": "nope", "path": "r.xml"},
            [],
            "t: container.outputFiles[0].workspace: unknown workspace 'nope'",
        ),
        (
            {"name": "report", "workspace": "src", "path": "r.xml"},
            [],
            "t: container.outputFiles[0].workspace: 'src' is not mounted by this task "
            "(add it to container.volumeMounts)",
        ),
    ],
)
def test_output_file_must_name_a_workspace_the_task_mounts(
    output: dict[str, Any], mounts: list[dict[str, Any]], problem: str
) -> None:
    task = {
        "name": "t",
        "container": {"image": "busybox", "volumeMounts": mounts, "outputFiles": [output]},
    }
    assert spec_problems([task], workspaces=[WORKSPACE]) == [problem]


def test_output_file_path_must_be_relative() -> None:
    task = {
        "name": "t",
        "container": {
            "image": "busybox",
            "outputFiles": [{"name": "r", "workspace": "src", "path": "/etc/passwd"}],
        },
    }
    with pytest.raises(ValidationError, match=r"outputFiles\.0\.path"):
        WorkflowSpec.model_validate({"tasks": [task]})
