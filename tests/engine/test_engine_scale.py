"""A 1,000-task DAG of no-op tasks runs to its end (the engine's scale, not executors')."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from maestro.api.models import WorkflowSpec
from maestro.api.phases import RunPhase, TaskPhase
from maestro.engine.driver import drive
from maestro.executors.noop import noop_engine
from maestro.store import Store

N = 1000


def _layered(n: int, width: int) -> WorkflowSpec:
    """``n`` tasks in layers of ``width``; each depends on two tasks of the layer before."""
    tasks = []
    for i in range(n):
        deps = []
        if i >= width:
            base = (i // width - 1) * width
            deps = sorted({f"t{base + i % width}", f"t{base + (i * 7 + 3) % width}"})
        tasks.append({"name": f"t{i}", "dependsOn": deps, "container": {"image": "none"}})
    return WorkflowSpec.model_validate({"tasks": tasks, "concurrency": 200})


@pytest.mark.timeout(180)
async def test_thousand_task_dag_completes(postgres_url: str, tmp_path: Path) -> None:
    store = await Store.open(postgres_url, migrate=True)
    try:
        engine, noop, waker = noop_engine(store)
        run = await engine.create_run(
            namespace="scale", name="scale", spec=_layered(N, 100), params={}
        )
        final = await asyncio.wait_for(drive(engine, run.id, waker, poll_seconds=0.05), 150)
        assert final.phase is RunPhase.SUCCEEDED
        # Every task started exactly once, and every attempt is recorded Succeeded.
        assert len(noop.started) == N
        assert Counter(noop.started).most_common(1)[0][1] == 1
        attempts = await store.attempts(run.id)
        assert len(attempts) == N
        assert {a.phase for a in attempts} == {TaskPhase.SUCCEEDED}
    finally:
        await store.close()
