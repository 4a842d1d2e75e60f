"""Workflow validation: ``status.conditions`` Ready True, or False naming every problem."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import ValidationError

from maestro.api.models import WorkflowSpec
from maestro.api.parse import describe
from maestro.dag.validate import validate
from maestro.k8s.client import WORKFLOWS, Kube, NotFound
from maestro.operator.status import iso


def workflow_status(body: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """The status a Workflow should have: its Ready condition and task count."""
    generation = body["metadata"].get("generation")
    task_count: int | None = None
    try:
        spec = WorkflowSpec.model_validate(body.get("spec") or {})
    except ValidationError as err:
        problems = [f"spec.{line}" for line in describe(err)]
    else:
        problems = [str(p) for p in validate(spec)]
        task_count = len(spec.all_tasks())
    ok = not problems
    previous = {c.get("type"): c for c in (body.get("status") or {}).get("conditions") or []}
    reason = "Valid" if ok else "Invalid"
    message = "valid" if ok else "; ".join(problems)
    # Ready for people and Argo CD; Stalled because Flux/kstatus ignore Ready=False.
    states = {"Ready": "True" if ok else "False", "Stalled": "False" if ok else "True"}
    conditions = []
    for kind, state in states.items():
        old = previous.get(kind)
        since = old.get("lastTransitionTime") if old and old.get("status") == state else None
        conditions.append(
            {
                "type": kind,
                "status": state,
                "reason": reason,
                "message": message,
                "lastTransitionTime": since or iso(now),
                "observedGeneration": generation,
            }
        )
    return {
        "conditions": conditions,
        "observedGeneration": generation,
        "taskCount": task_count,
    }


async def reconcile_workflow(kube: Kube, body: Mapping[str, Any]) -> None:
    """Validate a Workflow whose current generation has not been checked yet."""
    meta = body["metadata"]
    if (body.get("status") or {}).get("observedGeneration") == meta.get("generation"):
        return  # already validated: this event is most likely our own status patch
    status = workflow_status(body, datetime.now(UTC))
    with contextlib.suppress(NotFound):  # deleted meanwhile
        await kube.patch_status(WORKFLOWS, meta["namespace"], meta["name"], status)
