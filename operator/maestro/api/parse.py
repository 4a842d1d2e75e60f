"""Turn decoded manifests into models, with errors that name the field path."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from maestro.api.models import API_VERSION, Workflow, WorkflowRun, WorkflowSchedule

Manifest = Workflow | WorkflowRun | WorkflowSchedule
_KINDS: dict[str, type[Workflow] | type[WorkflowRun] | type[WorkflowSchedule]] = {
    "Workflow": Workflow,
    "WorkflowRun": WorkflowRun,
    "WorkflowSchedule": WorkflowSchedule,
}


class ManifestError(ValueError):
    """A manifest that is not a valid Workflow or WorkflowRun; one problem per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("spec", "tasks", 2, "name")`` -> ``spec.tasks[2].name``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in part or "-after" in part or "function-" in part:
            continue  # pydantic's internal steps (union members, validators), not fields
        else:
            out += f".{part}" if out else part
    return out or "(document)"


def describe(err: ValidationError) -> list[str]:
    """One ``path: problem`` line per pydantic error, in plain words."""
    lines = []
    for e in err.errors(include_url=False):
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown field"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"{field_path(e['loc'])}: {msg}")
    return list(dict.fromkeys(lines))


def parse_manifest(doc: Any) -> Manifest:
    """Validate one decoded YAML/JSON document as a Workflow or WorkflowRun."""
    if not isinstance(doc, dict):
        raise ManifestError([f"(document): expected a mapping, got {type(doc).__name__}"])
    api_version = doc.get("apiVersion")
    if api_version != API_VERSION:
        raise ManifestError([f"apiVersion: expected {API_VERSION!r}, got {api_version!r}"])
    kind = doc.get("kind")
    model = _KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise ManifestError(
            [f"kind: expected Workflow, WorkflowRun or WorkflowSchedule, got {kind!r}"]
        )
    try:
        return model.model_validate(doc)
    except ValidationError as err:
        raise ManifestError(describe(err)) from None
