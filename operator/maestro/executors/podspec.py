"""What a container task's pod gets from volumes, mounts and the pod template.

Kept apart from :mod:`maestro.executors.container` (which owns the pod itself)
so both can change without stepping on each other. Pure functions over the run's
snapshot and the task: no I/O.

The secure defaults of docs/security.md stay as they are: nothing here sets a
ServiceAccount, a token mount or a security context.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

from maestro.api.models import PodTemplate, Task, WorkflowSpec

# PodTemplate field -> pod spec key (all camelCase already, as the wire format is).
_TEMPLATE_FIELDS = (
    "node_selector",
    "tolerations",
    "affinity",
    "priority_class_name",
    "image_pull_secrets",
    "runtime_class_name",
)


def effective_template(spec: Mapping[str, Any], task: Task) -> PodTemplate:
    """The workflow's pod template with the task's fields replacing it, field by field.

    A field the task sets (even to an empty list or map) wins whole: merging two lists
    of tolerations would leave no way to drop one the workflow sets.
    """
    base = PodTemplate.model_validate(spec.get("podTemplate") or {})
    own = task.container.pod_template if task.container else None
    if own is None:
        return base
    return base.model_copy(update={k: getattr(own, k) for k in own.model_fields_set})


def claim_name(run_name: str, workspace: str) -> str:
    """``<run>-<workspace>``; hashed past 63 characters (a label-sized, readable name)."""
    full = f"{run_name}-{workspace}"
    if len(full) <= 63:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:10]
    return f"{full[:52].rstrip('-')}-{digest}"


def claims(spec: WorkflowSpec, run_name: str, run_uid: str) -> list[dict[str, Any]]:
    """The PersistentVolumeClaims of a run's workspaces.

    ``Delete`` claims are owned by the WorkflowRun, so Kubernetes' garbage collector
    deletes them with it (the operator needs no delete permission); ``Retain`` ones
    have no owner and stay.
    """
    out = []
    for ws in spec.workspaces:
        template = ws.volume_claim_template
        meta = template.metadata
        labels = {**(meta.labels if meta else {}), "maestro.dev/run": run_name[:63]}
        metadata: dict[str, Any] = {
            "name": claim_name(run_name, ws.name),
            "labels": {**labels, "maestro.dev/workspace": ws.name},
            "annotations": dict(meta.annotations) if meta else {},
        }
        if ws.reclaim_policy == "Delete":
            metadata["ownerReferences"] = [
                {
                    "apiVersion": "maestro.dev/v1alpha1",
                    "kind": "WorkflowRun",
                    "name": run_name,
                    "uid": run_uid,
                    "blockOwnerDeletion": False,
                }
            ]
        out.append(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": metadata,
                "spec": template.spec.model_dump(by_alias=True, exclude_none=True),
            }
        )
    return out


def pod_fields(spec: Mapping[str, Any], task: Task, run_name: str) -> dict[str, Any]:
    """Keys to add to the pod spec: the volumes the task mounts, placement, pulling.

    ``spec`` is the run's snapshot as stored (camelCase, validated when the run started):
    only its ``volumes`` and ``podTemplate`` are read, not the whole DAG re-parsed.

    Only the volumes the task mounts go into its pod, so a task never waits for (or
    can read) a ConfigMap, Secret or claim it does not use.
    """
    container = task.container
    assert container is not None
    out: dict[str, Any] = {}
    used = {m.name for m in container.volume_mounts}
    volumes = [dict(v) for v in spec.get("volumes") or [] if v["name"] in used]
    volumes += [
        {"name": w["name"], "persistentVolumeClaim": {"claimName": claim_name(run_name, w["name"])}}
        for w in spec.get("workspaces") or []
        if w["name"] in used
    ]
    if volumes:
        out["volumes"] = volumes
    template = effective_template(spec, task)
    for field in _TEMPLATE_FIELDS:
        value = getattr(template, field)
        if value is None:
            continue
        if hasattr(value, "model_dump"):
            value = value.model_dump(by_alias=True, exclude_none=True)
        elif isinstance(value, list):
            value = [v.model_dump(by_alias=True, exclude_none=True) for v in value]
        out[PodTemplate.model_fields[field].alias or field] = value
    return out


def container_fields(task: Task) -> dict[str, Any]:
    """Keys to add to the task's container: its volume mounts."""
    container = task.container
    assert container is not None
    if not container.volume_mounts:
        return {}
    return {
        "volumeMounts": [
            m.model_dump(by_alias=True, exclude_none=True) for m in container.volume_mounts
        ]
    }


def declared_outputs(task: Task) -> dict[str, Any]:
    """``name: path`` of each declared output file (relative to its workspace)."""
    container = task.container
    return {f.name: f.path for f in container.output_files} if container else {}
