"""Attempt contexts for executor unit tests (no store, no cluster needed)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from maestro.api.models import Task
from maestro.api.phases import RunPhase
from maestro.dag.scheduler import Controls
from maestro.engine.executor import AttemptContext
from maestro.store import RunRecord


def attempt(task: dict[str, Any], *, service_account: str | None = "robot") -> AttemptContext:
    """One first attempt of ``task`` in a run of namespace ``team-a``."""
    now = datetime.now(UTC)
    spec: dict[str, Any] = {"tasks": [task]}
    if service_account:
        spec["serviceAccountName"] = service_account
    run = RunRecord(
        id="run-1",
        namespace="team-a",
        name="r1",
        uid="uid-1",
        workflow_name=None,
        spec=spec,
        params={},
        phase=RunPhase.RUNNING,
        reason=None,
        message=None,
        controls={},
        generation=1,
        created_at=now,
        started_at=now,
        finished_at=None,
        updated_at=now,
    )
    return AttemptContext(
        run=run,
        task=Task.model_validate(task),
        attempt=1,
        handle=None,
        inputs={"params": {}, "tasks": {"build": {"image": "x:1", "meta": {"k": 1}}}},
        controls=Controls(),
    )
