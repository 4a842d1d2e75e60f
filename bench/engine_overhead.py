"""The engine's own cost per task transition, executors excluded.

Drives a 1,000-task DAG to its end with a no-op in-process executor (every attempt
succeeds as soon as it is polled), so the time measured is the engine's: loading
state from the store, deciding, and writing transitions with compare-and-set. The
little time spent inside the executor is measured and subtracted.

    python -m bench.engine_overhead                      # SQLite in a temp dir
    python -m bench.engine_overhead --database-url postgresql://...   # and PostgreSQL
    python -m bench.engine_overhead --tasks 1000 --shape chain

Shapes: ``layered`` (10 layers, each task depends on two of the layer before),
``wide`` (all independent) and ``chain`` (each task depends on the previous one: the
most reconcile passes, each over the whole run).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from maestro.api.models import WorkflowSpec
from maestro.api.phases import RunPhase
from maestro.engine.driver import drive
from maestro.engine.engine import Pass
from maestro.executors.noop import noop_engine
from maestro.store import Store


def dag(n: int, shape: str) -> WorkflowSpec:
    """A workflow of ``n`` no-op tasks in the given shape."""
    tasks: list[dict[str, Any]] = []
    width = max(1, n // 10)
    for i in range(n):
        deps: list[str] = []
        if shape == "chain" and i:
            deps = [f"t{i - 1}"]
        elif shape == "layered" and i >= width:
            base = (i // width - 1) * width
            deps = sorted({f"t{base + i % width}", f"t{base + (i * 7 + 3) % width}"})
        tasks.append(
            {
                "name": f"t{i}",
                "dependsOn": deps,
                "container": {"image": "none", "command": ["true"]},
            }
        )
    return WorkflowSpec.model_validate({"tasks": tasks})


@dataclass
class Figures:
    """What one benchmark run measured."""

    backend: str
    shape: str
    tasks: int
    transitions: int
    passes: int
    seconds: float
    executor_seconds: float

    @property
    def engine_seconds(self) -> float:
        """Wall time minus the time spent inside the executor."""
        return self.seconds - self.executor_seconds

    def line(self) -> str:
        """One human-readable line."""
        per = self.engine_seconds / self.transitions * 1000
        return (
            f"{self.backend:<10} {self.shape:<8} {self.tasks:>5} tasks  "
            f"{self.transitions:>5} transitions  {self.passes:>5} passes  "
            f"{self.seconds:7.2f} s total  {per:6.3f} ms/transition  "
            f"{self.engine_seconds / self.tasks * 1000:6.3f} ms/task"
        )


async def measure(url: str, backend: str, n: int, shape: str) -> Figures:
    """Drive one run of ``n`` no-op tasks on the store at ``url`` and time it."""
    store = await Store.open(url, migrate=True)
    try:
        engine, noop, waker = noop_engine(store)
        spec = dag(n, shape)
        run = await engine.create_run(namespace="bench", name="bench", spec=spec, params={})
        passes = 0

        async def count(_: Pass) -> None:
            nonlocal passes
            passes += 1

        t = time.perf_counter()
        final = await drive(engine, run.id, waker, poll_seconds=0.05, on_pass=count)
        seconds = time.perf_counter() - t
        if final.phase is not RunPhase.SUCCEEDED:
            raise SystemExit(f"benchmark run ended {final.phase}: {final.message}")
        # Pending (created), Running, Succeeded per task.
        transitions = sum(1 for e in await store.events(run.id) if e.kind == "TaskPhase")
        return Figures(backend, shape, n, transitions, passes, seconds, noop.seconds)
    finally:
        await store.close()


async def main(argv: list[str] | None = None) -> list[Figures]:
    """Run the benchmark on SQLite, and on PostgreSQL when a URL is given; print figures."""
    parser = argparse.ArgumentParser(prog="python -m bench.engine_overhead")
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--shape", choices=["layered", "wide", "chain"], action="append")
    parser.add_argument(
        "--database-url", help="also measure on this PostgreSQL database (it gets a new run)"
    )
    args = parser.parse_args(argv)
    shapes = args.shape or ["layered", "wide"]
    figures = []
    print("engine overhead per task transition (no-op executor, executor time excluded)")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            url = f"sqlite:///{Path(tmp) / f'{shape}.db'}"
            figures.append(await measure(url, "sqlite", args.tasks, shape))
            print(figures[-1].line(), flush=True)
    if args.database_url:
        for shape in shapes:
            figures.append(await measure(args.database_url, "postgresql", args.tasks, shape))
            print(figures[-1].line(), flush=True)
    return figures


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
