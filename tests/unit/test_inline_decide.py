"""Which workflows the engine decides on the event loop instead of a thread."""

from __future__ import annotations

from typing import Any

import pytest

from maestro.api.models import WorkflowSpec
from maestro.engine.engine import INLINE_DECIDE_TASKS, _decided_inline


def _spec(n: int = 3, **extra: Any) -> WorkflowSpec:
    tasks: list[dict[str, Any]] = [
        {"name": f"t{i}", "container": {"image": "busybox"}} for i in range(n)
    ]
    task_extra = extra.pop("task", {})
    tasks[-1].update(task_extra)
    return WorkflowSpec.model_validate({"tasks": tasks, **extra})


def test_a_small_workflow_without_expressions_is_decided_inline() -> None:
    assert _decided_inline(_spec())
    assert _decided_inline(_spec(INLINE_DECIDE_TASKS))


@pytest.mark.parametrize(
    "spec",
    [
        _spec(INLINE_DECIDE_TASKS + 1),  # walking a large DAG could hold the loop
        _spec(task={"when": "params.go == 'yes'"}),
        _spec(task={"forEach": {"items": ["a", "b"]}}),
        _spec(outputs=[{"name": "o", "value": "{{ tasks.t0.outputs.x }}"}]),
    ],
    ids=["large", "when", "forEach", "outputs"],
)
def test_anything_that_evaluates_user_expressions_goes_to_a_thread(spec: WorkflowSpec) -> None:
    assert not _decided_inline(spec)
