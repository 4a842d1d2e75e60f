"""Benchmark 2: dependent-start latency and transitions/s of the engine, no-op tasks.

The engine drives runs in this process with :class:`NoopExecutor`, whose tasks finish
the moment they are polled, so what is measured is the engine plus the store. The
latency of one dependency edge is read from the store's own event timestamps: the
upstream attempt's ``Running -> Succeeded`` event to the dependent's
``Pending -> Running`` event (the dependent takes the latest of its upstreams).

Shapes: a 200-task ``chain`` (every transition waits for the one before: latency) and a
``layered`` DAG of 20 layers x 10 tasks (independent tasks in one pass: throughput).
A task transition is a change of phase (``from_phase`` set): two per task here.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import Figure, Outcome, percentile, postgres, use_test_fixtures

use_test_fixtures()

from maestro.api.models import WorkflowSpec  # noqa: E402
from maestro.engine import driver  # noqa: E402
from maestro.engine.engine import Engine  # noqa: E402
from maestro.executors.noop import NoopExecutor  # noqa: E402
from maestro.store import EventRecord, Store  # noqa: E402

CHAIN = 200
LAYERS, WIDTH = 20, 10


def chain_spec(n: int) -> WorkflowSpec:
    """``n`` container tasks, each depending on the previous one."""
    tasks = [
        {
            "name": f"t{i}",
            "dependsOn": [f"t{i - 1}"] if i else [],
            "container": {"image": "busybox"},
        }
        for i in range(n)
    ]
    return WorkflowSpec.model_validate({"tasks": tasks})


def layered_spec(layers: int, width: int) -> WorkflowSpec:
    """``layers`` x ``width`` tasks; each depends on every task of the layer above."""
    tasks: list[dict[str, Any]] = []
    for layer in range(layers):
        above = [f"l{layer - 1}-{j}" for j in range(width)] if layer else []
        tasks += [
            {"name": f"l{layer}-{j}", "dependsOn": above, "container": {"image": "busybox"}}
            for j in range(width)
        ]
    return WorkflowSpec.model_validate({"tasks": tasks})


def edge_latencies(spec: WorkflowSpec, events: list[EventRecord]) -> list[float]:
    """Seconds from the last upstream's Succeeded event to each dependent's Running event."""
    done: dict[str, float] = {}
    running: dict[str, float] = {}
    for e in events:
        if e.kind != "TaskPhase" or e.task is None:
            continue
        if e.to_phase == "Succeeded":
            done[e.task] = e.at.timestamp()
        elif e.to_phase == "Running" and e.task not in running:
            running[e.task] = e.at.timestamp()
    return [
        running[t.name] - max(done[d] for d in t.depends_on)
        for t in spec.tasks
        if t.depends_on and t.name in running
    ]


async def drive_once(url: str, spec: WorkflowSpec, name: str) -> dict[str, Any]:
    """Create and drive one run to its end; latencies, transitions and wall time."""
    store = await Store.open(url, migrate=True)
    try:
        waker = driver.Waker()
        engine = Engine(store, {"container": NoopExecutor(waker)})
        run = await engine.create_run(namespace="bench", name=name, spec=spec, params={})
        t0 = time.perf_counter()
        final = await driver.drive(engine, run.id, waker, poll_seconds=0.05)
        wall = time.perf_counter() - t0
        if final.phase.value != "Succeeded":
            raise RuntimeError(f"benchmark run ended {final.phase}: {final.message}")
        events = await store.events(run.id)
    finally:
        await store.close()
    transitions = sum(1 for e in events if e.kind == "TaskPhase" and e.from_phase is not None)
    return {
        "latencies": edge_latencies(spec, events),
        "transitions": transitions,
        "wall": wall,
    }


def _measure(backend: str, new_url: Any, repeats: int, out: Outcome) -> None:
    chain, layered = chain_spec(CHAIN), layered_spec(LAYERS, WIDTH)
    p50s, p95s, chain_tps, layered_tps = [], [], [], []
    details = []
    for i in range(repeats):
        c = asyncio.run(drive_once(new_url(), chain, f"chain-{i}"))
        w = asyncio.run(drive_once(new_url(), layered, f"layered-{i}"))
        ms = [x * 1000 for x in c["latencies"]]
        p50s.append(percentile(ms, 50))
        p95s.append(percentile(ms, 95))
        chain_tps.append(c["transitions"] / c["wall"])
        layered_tps.append(w["transitions"] / w["wall"])
        details.append(
            {
                "chain": {k: c[k] for k in ("transitions", "wall")},
                "layered": {k: w[k] for k in ("transitions", "wall")},
                "p50_ms": p50s[-1],
                "p95_ms": p95s[-1],
            }
        )
    pg = backend == "postgresql"
    out.figures += [
        Figure(
            "engine",
            f"{backend}: dependent-start p50 (chain {CHAIN})",
            "ms",
            p50s,
            "< 10 ms" if pg else None,
            (sorted(p50s)[len(p50s) // 2] < 10) if pg else None,
        ),
        Figure("engine", f"{backend}: dependent-start p95 (chain {CHAIN})", "ms", p95s),
        Figure(
            "engine",
            f"{backend}: transitions/s (chain {CHAIN})",
            "1/s",
            chain_tps,
            ">= 500/s",
            sorted(chain_tps)[len(chain_tps) // 2] >= 500,
        ),
        Figure(
            "engine",
            f"{backend}: transitions/s (layered {LAYERS}x{WIDTH})",
            "1/s",
            layered_tps,
            ">= 500/s",
            sorted(layered_tps)[len(layered_tps) // 2] >= 500,
        ),
    ]
    out.details[backend] = details


def run(quick: bool = False) -> Outcome:
    """SQLite (a temp file) and PostgreSQL (the private server), fresh database per run."""
    out = Outcome()
    repeats = 1 if quick else 3
    with tempfile.TemporaryDirectory(prefix="maestro-bench-") as tmp:
        counter = iter(range(10_000))
        _measure(
            "sqlite",
            lambda: f"sqlite:///{Path(tmp) / f'engine-{next(counter)}.db'}",
            repeats,
            out,
        )
    with postgres() as pg:
        _measure("postgresql", lambda: pg.new_database()[1], repeats, out)
    return out
