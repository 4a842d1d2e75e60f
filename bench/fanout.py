"""Fan-out at scale: a 1,000-instance fan-out driven end to end by the engine, and the
validation of a 1,000-combination matrix.

The fan-out runs with the in-process no-op executor (every attempt succeeds when
polled) on a real store, so the figures are Maestro's own cost per instance: the
expansion (1,000 Pending records in one transaction), the decisions, the CAS writes,
and the fan-in of 1,000 outputs into lists. CPU is this process's user+system time.

    python -m bench.fanout                                   # SQLite in a temp dir
    python -m bench.fanout --database-url postgresql://...   # and PostgreSQL
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from maestro.api.models import WorkflowSpec
from maestro.api.phases import RunPhase
from maestro.dag import fanout, templates
from maestro.dag.validate import plan, validate
from maestro.engine.driver import drive
from maestro.executors.noop import noop_engine
from maestro.store import Store


def fan_spec(n: int, concurrency: int | None) -> WorkflowSpec:
    """``n`` instances of one no-op task and a fan-in reading their outputs."""
    each: dict[str, object] = {"items": list(range(n))}
    if concurrency:
        each["concurrency"] = concurrency
    return WorkflowSpec.model_validate(
        {
            "tasks": [
                {
                    "name": "fan",
                    "forEach": each,
                    "container": {"image": "none", "args": ["{{ item }}"]},
                },
                {
                    "name": "join",
                    "dependsOn": ["fan"],
                    # Its inputs are the 1,000 instances' outputs, gathered in item order.
                    "container": {"image": "none", "args": ["join"]},
                },
            ]
        }
    )


def _cpu() -> float:
    t = os.times()
    return t.user + t.system


async def run_fanout(url: str, backend: str, n: int, concurrency: int | None) -> str:
    """Drive one fan-out of ``n`` instances; one line of figures."""
    store = await Store.open(url, migrate=True)
    try:
        engine, _, waker = noop_engine(store)
        run = await engine.create_run(
            namespace="bench", name="fan", spec=fan_spec(n, concurrency), params={}
        )
        cpu, wall = _cpu(), time.perf_counter()
        final = await drive(engine, run.id, waker, poll_seconds=0.05)
        wall, cpu = time.perf_counter() - wall, _cpu() - cpu
        if final.phase is not RunPhase.SUCCEEDED:
            raise SystemExit(f"fan-out run ended {final.phase}: {final.message}")
        tasks = n + 1
        return (
            f"{backend:<10} fan-out {n:>5} instances (concurrency {concurrency or 'none'}): "
            f"{wall:6.2f} s wall, {60 / wall:6.2f} runs/min, {tasks * 60 / wall:8.0f} tasks/min, "
            f"{cpu / tasks * 1000:6.2f} ms CPU per task"
        )
    finally:
        await store.close()


def validate_matrix(rows: int, cols: int) -> str:
    """Validate, plan and expand a ``rows`` x ``cols`` matrix; one line of figures."""
    doc = {
        "tasks": [
            {
                "name": "m",
                "forEach": {
                    "matrix": [
                        {"name": "os", "items": [f"os{i}" for i in range(rows)]},
                        {"name": "py", "items": [f"3.{i}" for i in range(cols)]},
                    ]
                },
                "container": {"image": "none", "args": ["{{ item.os }}", "{{ item.py }}"]},
            }
        ]
    }
    t = time.perf_counter()
    spec = WorkflowSpec.model_validate(doc)
    problems = validate(spec)
    plan(spec)
    checked = time.perf_counter() - t
    t = time.perf_counter()
    items = fanout.items(spec.tasks[0], templates.Context({}, {}, {}))
    expanded = time.perf_counter() - t
    assert not problems, problems
    assert len(items) == rows * cols
    return (
        f"matrix {rows}x{cols} = {len(items)} instances: parse+validate+plan "
        f"{checked * 1000:6.1f} ms, expansion {expanded * 1000:6.1f} ms"
    )


async def main(argv: list[str] | None = None) -> list[str]:
    """Print the figures (SQLite, and PostgreSQL when a URL is given)."""
    parser = argparse.ArgumentParser(prog="python -m bench.fanout")
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=None)
    parser.add_argument("--database-url", help="also measure on this PostgreSQL database")
    args = parser.parse_args(argv)
    lines = [f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"]
    lines.append(validate_matrix(25, 40))
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{Path(tmp) / 'fan.db'}"
        lines.append(await run_fanout(url, "sqlite", args.instances, args.concurrency))
    if args.database_url:
        lines.append(
            await run_fanout(args.database_url, "postgresql", args.instances, args.concurrency)
        )
    lines.append(f"load average {os.getloadavg()[0]:.2f} after")
    for line in lines:
        print(line, flush=True)
    return lines


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
