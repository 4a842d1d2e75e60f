"""Benchmark: throughput with 1, 2 and 3 active operator replicas (issue 20).

One PostgreSQL server and one local control plane (kwok: task pods succeed at once)
serve every pass. For N = 1, 2, 3: a namespace and a fresh database of its own, N
``maestro operator`` processes (``--replica scaleN-i``, default leases,
``--status-interval 1`` as in the operator bench), started and waited on until the 32
buckets are balanced; then R WorkflowRuns of the 10-task DAG of ``bench operator``
(``a -> (b,c,d) -> e -> (f,g,h) -> i -> j``) applied in one request.

Figures per N:

- wall time from the apply to the last run finished in the store (and until every
  WorkflowRun's status says so), and tasks Succeeded per second over the first; a pass
  stops after ``PASS_TIMEOUT_S`` (its wall time is then the timeout);
- per replica: CPU seconds (utime + stime from ``/proc/PID/stat``, from just before the
  apply to the end), peak RSS (``VmHWM``), runs it drove (the runs whose bucket,
  ``bucket_of(uid)``, it held: the buckets are checked unchanged from the apply to the
  end) and its engine passes (``maestro_reconcile_seconds_count`` of its ``/metrics``);
- CPU ms per task: the replicas' CPU summed, over the tasks that Succeeded;
- buckets each replica lost because its lease expired before it renewed it
  (``maestro_bucket_handovers_total{direction="lost"}``) and its mean renewal time;
- runs not Succeeded (store or resource), and duplicate pods: more than one pod for a
  (run-id, task, attempt) label triple, or any attempt > 1 in the store.

On a 2-core machine that also runs the API server, etcd, kwok and PostgreSQL, more
replicas are not expected to go faster: the figure to read is CPU per task and per
replica, which sizes a larger cluster (docs/performance.md).
"""

from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.common import TEN_TASKS, Figure, Outcome, Postgres, postgres, use_test_fixtures
from bench.failover import held, start_all, stop, wait_balanced
from bench.operator_e2e import _cpu_s, _crds, _manifests, _prepare, _store_counts, _vm_hwm_kib

use_test_fixtures()

from fixtures.control_plane import ControlPlane, local_control_plane  # noqa: E402
from fixtures.operator import OperatorProcess  # noqa: E402
from maestro.executors.container import LABEL_ATTEMPT, LABEL_RUN_ID, LABEL_TASK  # noqa: E402
from maestro.store.leases import bucket_of  # noqa: E402

COUNTS = (1, 2, 3)
PASS_TIMEOUT_S = 240.0  # per pass: what is not finished by then counts as not Succeeded
LOST = 'maestro_bucket_handovers_total{direction="lost"}'


def _pids(ops: list[OperatorProcess]) -> list[int]:
    pids = []
    for op in ops:
        assert op.proc is not None
        pids.append(op.proc.pid)
    return pids


def _duplicates(plane: ControlPlane, namespace: str) -> tuple[int, int]:
    """(pods in the namespace, pods beyond the first of a (run-id, task, attempt))."""
    pods = json.loads(plane.kubectl("get", "-n", namespace, "pods", "-o", "json").stdout)["items"]
    keys: Counter[tuple[str, str, str]] = Counter()
    for pod in pods:
        labels = pod["metadata"].get("labels") or {}
        if LABEL_TASK in labels:
            keys[
                (labels.get(LABEL_RUN_ID, ""), labels[LABEL_TASK], labels.get(LABEL_ATTEMPT, ""))
            ] += 1
    return sum(keys.values()), sum(c - 1 for c in keys.values())


def one_pass(plane: ControlPlane, pg: Postgres, logs: Path, n: int, runs: int) -> dict[str, Any]:
    """N replicas, ``runs`` runs of the 10-task DAG: raw results."""
    namespace = f"bench-scale-{n}"
    _prepare(plane, namespace)
    db, url = pg.new_database()
    ops = []
    for i in range(n):
        (logs / f"n{n}-{i}").mkdir()
        extra = ["--replica", f"scale{n}-{i}", "--status-interval", "1"]
        ops.append(OperatorProcess(plane.kubeconfig, url, namespace, logs / f"n{n}-{i}", extra))
    try:
        start_all(ops)
        wait_balanced(ops)
        return _drive(plane, pg, db, namespace, ops, runs)
    finally:
        for op in ops:
            stop(op)


def _drive(
    plane: ControlPlane,
    pg: Postgres,
    db: str,
    namespace: str,
    ops: list[OperatorProcess],
    runs: int,
) -> dict[str, Any]:
    tasks = runs * len(TEN_TASKS)
    pids = _pids(ops)
    buckets_before = [held(op) for op in ops]
    passes_before = [op.metric("maestro_reconcile_seconds_count") for op in ops]
    lost_before = [op.metric(LOST) for op in ops]
    cpu_before = [_cpu_s(pid) for pid in pids]
    load_before = os.getloadavg()
    t_submit = time.time()
    plane.kubectl("apply", "-n", namespace, "-f", "-", input=_manifests(TEN_TASKS, runs, None))
    deadline = time.monotonic() + PASS_TIMEOUT_S
    finished = 0
    while time.monotonic() < deadline:
        _, finished = _store_counts(pg, db)
        if finished >= runs:
            break
        time.sleep(0.2)
    t_store = time.time()
    items: list[dict[str, Any]] = []
    while True:
        items = json.loads(
            plane.kubectl("get", "-n", namespace, "workflowruns", "-o", "json").stdout
        )["items"]
        if (
            finished < runs
            or time.monotonic() > deadline
            or all(
                (r.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled")
                for r in items
            )
        ):
            break
        time.sleep(0.5)
    t_status = time.time()
    cpu = [_cpu_s(pid) - before for pid, before in zip(pids, cpu_before, strict=True)]
    hwm = [_vm_hwm_kib(pid) for pid in pids]
    passes = [
        op.metric("maestro_reconcile_seconds_count") - before
        for op, before in zip(ops, passes_before, strict=True)
    ]
    lost = [op.metric(LOST) - before for op, before in zip(ops, lost_before, strict=True)]
    renew = [
        op.metric("maestro_lease_renew_seconds_sum")
        / max(1.0, op.metric("maestro_lease_renew_seconds_count"))
        for op in ops
    ]
    buckets_after = [held(op) for op in ops]
    (last_finish, succeeded, attempts2, tasks_done), *_ = pg.admin_query(
        db,
        "SELECT extract(epoch FROM max(finished_at)), count(*) FILTER (WHERE phase = 'Succeeded'), "
        "(SELECT count(*) FROM task_attempts WHERE attempt > 1), "
        "(SELECT count(*) FROM task_attempts WHERE phase = 'Succeeded') FROM runs",
    )
    holder = {b: i for i, bs in enumerate(buckets_after) for b in bs or ()}
    driven = Counter(holder.get(bucket_of(r["metadata"]["uid"]), -1) for r in items)
    pods, duplicates = _duplicates(plane, namespace)
    # All finished: apply to the last finish in the store; else the whole (timed-out) pass.
    done = finished >= runs and last_finish is not None
    elapsed = float(last_finish) - t_submit if done else t_store - t_submit
    return {
        "replicas": len(ops),
        "runs": runs,
        "tasks": tasks,
        "elapsed_s": elapsed,
        "store_done_seen_s": t_store - t_submit,
        "status_done_s": t_status - t_submit,
        "all_finished": done,
        "tasks_succeeded": int(tasks_done),
        "tasks_per_s": int(tasks_done) / elapsed,
        "cpu_s": cpu,
        "cpu_ms_per_task": sum(cpu) * 1000 / max(1, int(tasks_done)),
        "leases_lost": lost,
        "lease_renew_mean_s": renew,
        "vm_hwm_mib": [h / 1024 for h in hwm],
        "engine_passes": passes,
        "runs_driven": [driven.get(i, 0) for i in range(len(ops))],
        "runs_unowned": driven.get(-1, 0),
        "buckets": [len(b or ()) for b in buckets_after],
        "buckets_unchanged": buckets_before == buckets_after,
        "store_succeeded": int(succeeded),
        "k8s_succeeded": sum(
            1 for r in items if (r.get("status") or {}).get("phase") == "Succeeded"
        ),
        "pods": pods,
        "duplicate_pods": duplicates + int(attempts2),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
    }


def measure(runs: int, counts: tuple[int, ...] = COUNTS) -> dict[int, dict[str, Any]]:
    """One pass per replica count, on one plane and one PostgreSQL server."""
    with (
        postgres() as pg,
        local_control_plane(log=io.StringIO()) as plane,
        tempfile.TemporaryDirectory(prefix="maestro-bench-scale-") as logs,
    ):
        _crds(plane)
        results: dict[int, dict[str, Any]] = {}
        for n in counts:
            try:
                results[n] = one_pass(plane, pg, Path(logs), n, runs)
            except Exception as err:  # one failed pass must not lose the others' figures
                results[n] = {"replicas": n, "error": f"{type(err).__name__}: {err}"}
            print(f"scaleout {n}: {json.dumps(results[n], default=str)}", file=sys.stderr)
        return results


def _figures(r: dict[str, Any]) -> list[Figure]:
    n, name = r["replicas"], "scaleout"
    label = f"{n} replica{'s' if n > 1 else ''}, {r['runs']} x 10"
    lost = r["runs"] - min(r["store_succeeded"], r["k8s_succeeded"])
    figures = [
        Figure(name, f"elapsed ({label})", "s", [r["elapsed_s"]]),
        Figure(name, f"throughput ({label})", "tasks/s", [r["tasks_per_s"]]),
        Figure(name, f"CPU per task, all replicas ({label})", "ms", [r["cpu_ms_per_task"]]),
        Figure(name, f"CPU per replica ({label})", "s", r["cpu_s"]),
        Figure(name, f"peak RSS per replica ({label})", "MiB", r["vm_hwm_mib"]),
        Figure(name, f"runs driven per replica ({label})", "runs",
               [float(x) for x in r["runs_driven"]]),
        Figure(name, f"engine passes per replica ({label})", "passes", r["engine_passes"]),
        Figure(name, f"buckets lost to lease expiry, per replica ({label})", "buckets",
               r["leases_lost"], "0", sum(r["leases_lost"]) == 0),
        Figure(name, f"runs lost or not Succeeded ({label})", "runs", [lost], "0", lost == 0),
        Figure(name, f"duplicate pods ({label})", "pods", [r["duplicate_pods"]], "0",
               r["duplicate_pods"] == 0),
    ]  # fmt: skip
    return figures


def run(quick: bool = False) -> Outcome:
    """The benchmark as ``python -m bench scaleout`` runs it (100 runs, 20 with --quick)."""
    results = measure(20 if quick else 100)
    out = Outcome(details={str(n): r for n, r in results.items()})
    for r in results.values():
        if "error" not in r:
            out.figures += _figures(r)
    return out
