"""Benchmark 1: parse + validate + order DAGs of 1k, 10k and 50k tasks, time and memory.

Three shapes: ``wide`` (one root, fan-out, one sink that joins everything), ``chain``
(each task depends on the previous one) and ``layered`` (random layers, each task
depending on 1-3 tasks of the layer above, fixed seed so every run sees the same DAG).

``WorkflowSpec`` refuses more than ``MAX_TASKS`` (5,000) tasks, because that is what one
etcd object can hold. Past that, the tasks are parsed with pydantic one list at a time
(``TypeAdapter(list[Task])``) and the spec is assembled with ``model_construct``: the
only check skipped is the length bound itself, so the figures stay comparable.
"""

from __future__ import annotations

import gc
import random
import time
import tracemalloc
from typing import Any

from bench.common import Figure, Outcome, use_test_fixtures

use_test_fixtures()

from pydantic import TypeAdapter  # noqa: E402

from maestro.api.models import MAX_TASKS, Task, WorkflowSpec  # noqa: E402
from maestro.dag.validate import plan, validate  # noqa: E402

SIZES = (1_000, 10_000, 50_000)
SHAPES = ("wide", "chain", "layered")
SEED = 20240601
_TASKS = TypeAdapter(list[Task])


def _task(name: str, deps: list[str]) -> dict[str, Any]:
    return {"name": name, "dependsOn": deps, "container": {"image": "busybox"}}


def make_spec(shape: str, n: int) -> dict[str, Any]:
    """The raw (wire-format) spec of an ``n``-task DAG of the given shape."""
    names = [f"t{i}" for i in range(n)]
    tasks: list[dict[str, Any]]
    if shape == "wide":
        middle = names[1:-1]
        tasks = [_task(names[0], [])]
        tasks += [_task(m, [names[0]]) for m in middle]
        tasks.append(_task(names[-1], middle))
    elif shape == "chain":
        tasks = [_task(names[0], [])] + [_task(names[i], [names[i - 1]]) for i in range(1, n)]
    elif shape == "layered":
        rng = random.Random(SEED + n)
        width = max(10, int(n**0.5))
        tasks, i = [], 0
        previous: list[str] = []
        while i < n:
            layer = names[i : i + rng.randint(width // 2, width * 3 // 2)]
            for name in layer:
                deps = rng.sample(previous, min(len(previous), rng.randint(1, 3)))
                tasks.append(_task(name, deps))
            previous, i = layer, i + len(layer)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return {"tasks": tasks}


def parse(raw: dict[str, Any]) -> WorkflowSpec:
    """The pydantic parse a real spec goes through (see the module doc past MAX_TASKS)."""
    if len(raw["tasks"]) <= MAX_TASKS:
        return WorkflowSpec.model_validate(raw)
    return WorkflowSpec.model_construct(tasks=_TASKS.validate_python(raw["tasks"]), finally_=[])


def once(raw: dict[str, Any]) -> dict[str, float]:
    """Seconds for parse, validate and plan (topological order) of one spec."""
    t0 = time.perf_counter()
    spec = parse(raw)
    t1 = time.perf_counter()
    problems = validate(spec)
    t2 = time.perf_counter()
    the_plan = plan(spec)
    t3 = time.perf_counter()
    if problems or len(the_plan.order) != len(raw["tasks"]):
        raise RuntimeError(f"benchmark DAG is invalid: {problems[:3]}")
    return {"parse": t1 - t0, "validate": t2 - t1, "plan": t3 - t2, "total": t3 - t0}


def peak_bytes(raw: dict[str, Any]) -> int:
    """Peak memory allocated while parsing, validating and ordering (tracemalloc)."""
    gc.collect()
    tracemalloc.start()
    try:
        spec = parse(raw)
        validate(spec)
        plan(spec)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def repeats_for(n: int, quick: bool) -> int:
    """Fewer repeats for big DAGs: the spread is small and the minutes are not."""
    if quick:
        return 1
    return 5 if n <= 1_000 else 3


def run(quick: bool = False) -> Outcome:
    """Every shape and size; figures: total seconds, and memory bytes per task."""
    out = Outcome()
    sizes = SIZES[:2] if quick else SIZES
    for shape in SHAPES:
        for n in sizes:
            raw = make_spec(shape, n)
            times = [once(raw) for _ in range(repeats_for(n, quick))]
            peak = peak_bytes(raw)
            totals = [t["total"] for t in times]
            target, met = None, None
            if n == 10_000:
                target = "< 0.5 s"
                met = sorted(totals)[len(totals) // 2] < 0.5
            out.figures.append(
                Figure(
                    "dag", f"{shape} {n // 1000}k: parse+validate+order", "s", totals, target, met
                )
            )
            out.figures.append(
                Figure(
                    "dag", f"{shape} {n // 1000}k: peak memory per task", "KiB", [peak / n / 1024]
                )
            )
            out.details[f"{shape}-{n}"] = {"times": times, "peak_bytes": peak}
            del raw
    return out
