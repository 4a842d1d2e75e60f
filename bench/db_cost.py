"""Benchmark 5: what one task transition costs the database, and history queries at scale.

Cost: 20 runs of the 10-task DAG driven by the engine with no-op tasks on a fresh
PostgreSQL database; ``pg_stat_user_tables`` insert/update counters, the tables' total
size (``pg_total_relation_size``, indexes and TOAST included) and the WAL position are
read before and after, and divided by the task transitions (changes of phase).
Per-backend statistics reach the shared counters when a backend exits, so the store is
closed before the second reading.

History: 100,000 task attempts (1,000 runs x 100 tasks, three events each) are bulk
inserted with SQL into the store's own tables, then one run's ``store.attempts`` and
``store.events`` are timed (median of repeated calls).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

from bench.common import Figure, Outcome, Postgres, postgres, ten_task_spec, use_test_fixtures
from maestro.executors.noop import NoopExecutor

use_test_fixtures()

from maestro.api.models import WorkflowSpec  # noqa: E402
from maestro.engine import driver  # noqa: E402
from maestro.engine.engine import Engine  # noqa: E402
from maestro.store import Store  # noqa: E402

TABLES = ("runs", "task_attempts", "events")
COST_RUNS = 20
HISTORY_RUNS, HISTORY_TASKS = 1_000, 100


def _snapshot(pg: Postgres, db: str) -> dict[str, Any]:
    rows = pg.admin_query(
        db,
        "SELECT relname, n_tup_ins, n_tup_upd, pg_total_relation_size(relid) "
        "FROM pg_stat_user_tables WHERE relname IN ('runs', 'task_attempts', 'events')",
    )
    (lsn,) = pg.admin_query(db, "SELECT pg_current_wal_lsn()::text")[0]
    return {"tables": {r[0]: r[1:] for r in rows}, "lsn": lsn}


async def _drive_runs(url: str, count: int) -> int:
    store = await Store.open(url)
    try:
        waker = driver.Waker()
        engine = Engine(store, {"container": NoopExecutor(waker)})
        spec = WorkflowSpec.model_validate(ten_task_spec())
        transitions = 0
        for i in range(count):
            run = await engine.create_run(namespace="bench", name=f"cost-{i}", spec=spec, params={})
            await driver.drive(engine, run.id, waker, poll_seconds=0.05)
            transitions += sum(
                1
                for e in await store.events(run.id)
                if e.kind == "TaskPhase" and e.from_phase is not None
            )
        return transitions
    finally:
        await store.close()


def cost(pg: Postgres) -> dict[str, float]:
    """Rows inserted/updated, bytes of table growth and WAL bytes per task transition."""
    db, url = pg.new_database()

    async def migrate() -> None:
        await (await Store.open(url, migrate=True)).close()

    asyncio.run(migrate())
    time.sleep(0.6)
    before = _snapshot(pg, db)
    transitions = asyncio.run(_drive_runs(url, COST_RUNS))
    time.sleep(0.6)  # the backends' last statistics land in shared memory on exit
    after = _snapshot(pg, db)
    ins = upd = size = 0
    for table in TABLES:
        b, a = before["tables"][table], after["tables"][table]
        ins += a[0] - b[0]
        upd += a[1] - b[1]
        size += a[2] - b[2]
    (wal,) = pg.admin_query(
        db, f"SELECT pg_wal_lsn_diff('{after['lsn']}', '{before['lsn']}')::bigint"
    )[0]
    return {
        "transitions": transitions,
        "rows_inserted": ins / transitions,
        "rows_updated": upd / transitions,
        "table_bytes": size / transitions,
        "wal_bytes": int(wal) / transitions,
    }


_FILL = f"""
INSERT INTO runs (id, namespace, name, uid, workflow_name, spec, params, phase, reason,
                  message, controls, generation, created_at, started_at, finished_at,
                  updated_at)
SELECT 'hist-' || lpad(g::text, 8, '0'), 'bench', 'hist-' || g, 'uid-' || g, 'bench',
       '{{"tasks": []}}'::jsonb, '{{}}'::jsonb, 'Succeeded', NULL, NULL,
       '{{"suspend": false, "cancel": false, "approvals": []}}'::jsonb, 1,
       now(), now(), now(), now()
FROM generate_series(1, {HISTORY_RUNS}) g;
INSERT INTO task_attempts (run_id, task, attempt, phase, reason, message, outputs, job_name,
                           not_before, created_at, started_at, finished_at)
SELECT r.id, 'task-' || t, 1, 'Succeeded', 'Succeeded', 'job completed',
       '{{"version": "1.2.3"}}'::jsonb, r.name || '-task-' || t || '-1', NULL,
       now(), now(), now()
FROM runs r CROSS JOIN generate_series(1, {HISTORY_TASKS}) t WHERE r.id LIKE 'hist-%';
INSERT INTO events (run_id, task, attempt, kind, from_phase, to_phase, reason, message, at)
SELECT a.run_id, a.task, 1, 'TaskPhase', p.f, p.t, p.r, NULL, now()
FROM task_attempts a CROSS JOIN (VALUES (NULL, 'Pending', 'Created'),
                                        ('Pending', 'Running', NULL),
                                        ('Running', 'Succeeded', 'Succeeded')) AS p(f, t, r)
WHERE a.run_id LIKE 'hist-%'
ORDER BY a.run_id, a.task;
ANALYZE;
"""


def history(pg: Postgres, calls: int) -> dict[str, Any]:
    """Milliseconds per ``attempts()`` and ``events()`` of one run in a 100k-attempt store."""
    db, url = pg.new_database()

    async def migrate() -> None:
        await (await Store.open(url, migrate=True)).close()

    asyncio.run(migrate())
    t0 = time.perf_counter()
    pg.admin_query(db, _FILL)
    fill = time.perf_counter() - t0
    (count,) = pg.admin_query(db, "SELECT count(*) FROM task_attempts")[0]
    run_id = f"hist-{HISTORY_RUNS // 2:08d}"

    async def query() -> tuple[list[float], list[float], int, int]:
        store = await Store.open(url)
        try:
            await store.attempts(run_id)  # warm the pool and the plan cache
            att_ms, ev_ms = [], []
            n_att = n_ev = 0
            for _ in range(calls):
                t = time.perf_counter()
                n_att = len(await store.attempts(run_id))
                att_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                n_ev = len(await store.events(run_id))
                ev_ms.append((time.perf_counter() - t) * 1000)
            return att_ms, ev_ms, n_att, n_ev
        finally:
            await store.close()

    att_ms, ev_ms, n_att, n_ev = asyncio.run(query())
    return {
        "attempts_in_store": int(count),
        "fill_seconds": fill,
        "attempts_ms": att_ms,
        "events_ms": ev_ms,
        "attempts_returned": n_att,
        "events_returned": n_ev,
    }


def run(quick: bool = False) -> Outcome:
    """Cost per transition (3 repeats) and history query times (one store, many calls)."""
    out = Outcome()
    with postgres() as pg:
        costs = [cost(pg) for _ in range(1 if quick else 3)]
        hist = history(pg, 10 if quick else 30)
    unit = "per transition"
    for key, label, u in (
        ("rows_inserted", "rows inserted", "rows"),
        ("rows_updated", "rows updated", "rows"),
        ("table_bytes", "table+index growth", "B"),
        ("wal_bytes", "WAL written", "B"),
    ):
        out.figures.append(Figure("db", f"{label} {unit}", u, [c[key] for c in costs]))
    for key, label in (("attempts_ms", "attempts()"), ("events_ms", "events()")):
        values = hist[key]
        returned = hist["attempts_returned" if key == "attempts_ms" else "events_returned"]
        out.figures.append(
            Figure(
                "db",
                f"{label} of 1 run ({returned} rows) in a "
                f"{hist['attempts_in_store'] // 1000}k-attempt store",
                "ms",
                values,
                "< 50 ms",
                statistics.median(values) < 50,
            )
        )
    out.details = {"cost": costs, "history": hist}
    return out
