"""What a container task's pod gets from volumes, mounts and the pod template.

Kept apart from :mod:`maestro.executors.container` (which owns the Job around the pod)
so both can change without stepping on each other. Pure functions over the run's
snapshot and the task: no I/O.

The secure defaults of docs/security.md stay as they are: nothing here sets a
ServiceAccount, a token mount or a security context.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from maestro.api.models import PodTemplate, Task

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


def pod_fields(spec: Mapping[str, Any], task: Task) -> dict[str, Any]:
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
