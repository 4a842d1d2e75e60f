"""Generate the CustomResourceDefinitions from the pydantic models.

Kubernetes wants a *structural* OpenAPI v3 schema: no ``$ref``, no ``anyOf`` of
types, a ``type`` on every node, no ``additionalProperties: false``. Pydantic emits
JSON Schema 2020-12, so this module rewrites one into the other. The output is
deterministic so the committed ``crds/`` files can be compared byte for byte.
"""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from maestro.api.models import GROUP, VERSION, Workflow, WorkflowRun, WorkflowSchedule

JSON = dict[str, Any]

# Keys of JSON Schema that carry over unchanged into a structural schema.
_KEPT = (
    "description",
    "type",
    "format",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
)


def _resolve(node: JSON, defs: JSON) -> JSON:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = dict(defs[ref.rsplit("/", 1)[-1]])
    # Sibling keys of a $ref (a field's description) win over the target's.
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


def structural(node: JSON, defs: JSON) -> JSON:
    """Turn one pydantic JSON-schema node into a structural OpenAPI v3 node."""
    node = _resolve(node, defs)
    variants = node.get("anyOf")
    if variants is not None:
        non_null = [v for v in variants if v.get("type") != "null"]
        nullable = len(non_null) != len(variants)
        types = {_resolve(v, defs).get("type") for v in non_null}
        if types == {"integer", "string"}:
            out: JSON = {"x-kubernetes-int-or-string": True}
        elif len(non_null) == 1:
            out = structural({**non_null[0], **_outer(node)}, defs)
        else:
            raise ValueError(f"cannot express anyOf {variants!r} structurally")
        if "description" in node:
            out["description"] = node["description"]
        if nullable:
            out["nullable"] = True
        return out

    out = {k: node[k] for k in _KEPT if k in node}
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:
        raise ValueError("use ge= rather than gt= on models: OpenAPI v3.0 has no numeric form")
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties")
        if props:
            out["properties"] = {name: structural(sub, defs) for name, sub in props.items()}
            if node.get("required"):
                out["required"] = list(node["required"])
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, defs)
        elif not props:
            # A free-form object (outputs): keep what the user stored.
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = structural(node.get("items", {}), defs)
    elif kind is None and "enum" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _outer(node: JSON) -> JSON:
    return {k: v for k, v in node.items() if k not in ("anyOf", "default", "title")}


def schema_of(model: type[BaseModel]) -> JSON:
    """Structural schema of a resource model, for ``openAPIV3Schema``."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    root = structural(raw, defs)
    props = root["properties"]
    props["apiVersion"] = {"type": "string"}
    props["kind"] = {"type": "string"}
    props["metadata"] = {"type": "object"}
    root["required"] = ["spec"]
    root.pop("description", None)
    return root


def _crd(
    model: type[BaseModel],
    kind: str,
    plural: str,
    short_names: list[str],
    columns: list[JSON],
) -> JSON:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": ["maestro"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema_of(model)},
                }
            ],
        },
    }


def _column(name: str, path: str, kind: str = "string", priority: int = 0) -> JSON:
    col: JSON = {"name": name, "type": kind, "jsonPath": path}
    if priority:
        col["priority"] = priority
    return col


_AGE = _column("Age", ".metadata.creationTimestamp", "date")


def crds() -> dict[str, JSON]:
    """Every CRD Maestro installs, keyed by its file name under ``crds/``."""
    workflow = _crd(
        Workflow,
        "Workflow",
        "workflows",
        ["mwf"],
        [
            _column("Ready", '.status.conditions[?(@.type=="Ready")].status'),
            _column("Tasks", ".status.taskCount", "integer"),
            _column("Message", '.status.conditions[?(@.type=="Ready")].message', priority=1),
            _AGE,
        ],
    )
    run = _crd(
        WorkflowRun,
        "WorkflowRun",
        "workflowruns",
        ["mwr"],
        [
            _column("Phase", ".status.phase"),
            _column("Progress", ".status.progress"),
            _AGE,
            # A date column: kubectl shows how long ago the run started, i.e. how long a
            # running run has been running. Duration is written once the run finished
            # (status is not re-written every second just to tick a clock).
            _column("Started", ".status.startedAt", "date"),
            _column("Duration", ".status.duration"),
            _column("Message", ".status.message"),
        ],
    )
    schedule = _crd(
        WorkflowSchedule,
        "WorkflowSchedule",
        "workflowschedules",
        ["mws"],
        [
            _column("Schedule", ".spec.schedule"),
            _column("Zone", ".spec.timeZone", priority=1),
            _column("Suspend", ".spec.suspend", "boolean"),
            _column("Active", ".status.active[*].name"),
            _column("Last Schedule", ".status.lastScheduleTime", "date"),
            _column("Next", ".status.nextScheduleTime", "date"),
            _AGE,
        ],
    )
    return {
        f"{GROUP}_workflows.yaml": workflow,
        f"{GROUP}_workflowruns.yaml": run,
        f"{GROUP}_workflowschedules.yaml": schedule,
    }


class _NoAliasDumper(yaml.SafeDumper):
    """Writes shared sub-trees out in full: anchors would puzzle readers of the CRDs."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def render(crd: JSON) -> str:
    """YAML text of one CRD, stable across runs."""
    header = "# Generated by `maestro crds` from maestro.api.models: do not edit.\n"
    return header + yaml.dump(crd, Dumper=_NoAliasDumper, sort_keys=False, width=100)
