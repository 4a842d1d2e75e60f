"""Benchmarks 3 and 4: the operator end to end on the local control plane, and recovery.

One pass: a private PostgreSQL server, the local control plane (etcd, kube-apiserver,
controller-manager, scheduler and kwok, whose Job pods succeed at once), Maestro's CRDs
and one ``maestro operator`` process. N WorkflowRuns of the 10-task DAG are applied in
one request. When 40% of the expected task transitions are in the store, the operator
gets SIGKILL (right after a /metrics scrape, so no counts are lost) and is started again.

Figures (a task transition is a change of phase: two per task here):

- runs/minute: N over (last run's ``finished_at`` - submission), outage included;
- dependent-start latency, two ways: store to store (the upstream's Succeeded event to
  the dependent's Running event, microsecond timestamps) and Job to Job (the upstream
  Job's ``completionTime`` to the dependent Job's ``creationTimestamp``; Kubernetes
  keeps whole seconds, so each sample is +-1 s). Edges whose two ends straddle the
  outage are left out and counted;
- status patches per run and API writes per task transition (``/metrics`` of both
  processes: the counters restart with the process, so the two are added);
- operator peak RSS (``VmHWM``);
- recovery: restart to ``/readyz``, restart to the first new transition, duplicate Jobs
  (any Job whose name is not ``job_name(run, task, 1)``, or any second attempt).
"""

from __future__ import annotations

import io
import json
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    REPO,
    TEN_TASKS,
    Figure,
    Outcome,
    Postgres,
    percentile,
    postgres,
    ten_task_spec,
    use_test_fixtures,
)

use_test_fixtures()

from fixtures.control_plane import ControlPlane, local_control_plane  # noqa: E402
from fixtures.operator import OperatorProcess  # noqa: E402
from maestro.executors.container import job_name  # noqa: E402

NAMESPACE = "bench-e2e"
KILL_AT = 0.4
DEPS = dict(TEN_TASKS)


def _vm_hwm_kib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return float("nan")


def _prepare(plane: ControlPlane) -> None:
    plane.kubectl("apply", "-f", str(REPO / "crds"))
    deadline = time.monotonic() + 60
    while plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s",
        "crd/workflows.maestro.dev", "crd/workflowruns.maestro.dev", check=False,
    ).returncode != 0:  # fmt: skip
        if time.monotonic() > deadline:
            raise RuntimeError("CRDs not Established after 60 s")
        time.sleep(0.5)
    plane.kubectl("create", "namespace", NAMESPACE)
    # Pods are refused until the ServiceAccount controller has made "default".
    while plane.kubectl("get", "-n", NAMESPACE, "sa", "default", check=False).returncode:
        if time.monotonic() > deadline:
            raise RuntimeError("no default ServiceAccount after 60 s")
        time.sleep(0.2)


def _manifests(n: int) -> str:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "maestro.dev/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "bench"},
            "spec": ten_task_spec(),
        }
    ]
    docs += [
        {
            "apiVersion": "maestro.dev/v1alpha1",
            "kind": "WorkflowRun",
            "metadata": {"name": f"r{i:03d}"},
            "spec": {"workflowRef": {"name": "bench"}},
        }
        for i in range(n)
    ]
    return yaml.safe_dump_all(docs)


def _store_counts(pg: Postgres, db: str) -> tuple[int, int]:
    (transitions, finished), *_ = pg.admin_query(
        db,
        "SELECT (SELECT count(*) FROM events WHERE kind = 'TaskPhase' "
        "AND from_phase IS NOT NULL), "
        "(SELECT count(*) FROM runs WHERE finished_at IS NOT NULL)",
    )
    return int(transitions), int(finished)


def _metrics(op: OperatorProcess) -> dict[str, float]:
    return {
        "patches": op.metric("maestro_status_patches_total"),
        "writes": op.metric("maestro_api_writes"),
    }


def _ts(value: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _latencies(
    done: dict[tuple[str, str], float],
    started: dict[tuple[str, str], float],
    gap: tuple[float, float],
) -> tuple[list[float], int]:
    """Dependent-start seconds per edge, and how many edges straddled the outage."""
    out, skipped = [], 0
    for (run, task), t_start in started.items():
        deps = DEPS[task]
        if not deps or any((run, d) not in done for d in deps):
            continue
        t_done = max(done[(run, d)] for d in deps)
        if t_done < gap[1] and t_start > gap[0]:
            skipped += 1
            continue
        out.append(t_start - t_done)
    return out, skipped


def measure(n: int) -> dict[str, Any]:
    """One end-to-end pass with ``n`` runs and one operator kill; raw results."""
    with (
        postgres() as pg,
        local_control_plane(log=io.StringIO()) as plane,
        tempfile.TemporaryDirectory(prefix="maestro-bench-op-") as logs,
    ):
        db, url = pg.new_database()
        _prepare(plane)
        op = OperatorProcess(plane.kubeconfig, url, NAMESPACE, Path(logs))
        op.start()
        try:
            return _drive(plane, pg, db, op, n)
        finally:
            op.kill(signal.SIGTERM)


def _drive(
    plane: ControlPlane, pg: Postgres, db: str, op: OperatorProcess, n: int
) -> dict[str, Any]:
    expected = n * len(TEN_TASKS) * 2
    t_submit = time.time()
    plane.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=_manifests(n))
    before_kill: dict[str, float] = {"patches": 0.0, "writes": 0.0}
    recovery: dict[str, Any] = {}
    hwm: list[float] = []
    t_kill = t_restart = float("inf")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        transitions, finished = _store_counts(pg, db)
        if not recovery and transitions >= KILL_AT * expected:
            assert op.proc is not None
            hwm.append(_vm_hwm_kib(op.proc.pid))
            before_kill = _metrics(op)
            t_kill = time.time()
            op.kill(signal.SIGKILL)
            t_restart = time.time()
            op.start(wait_ready=False)
            op.wait_ready(timeout=120)
            recovery["ready_s"] = time.time() - t_restart
            while True:
                (first,) = pg.admin_query(
                    db,
                    "SELECT extract(epoch FROM min(at)) FROM events "
                    f"WHERE at > to_timestamp({t_restart})",
                )[0]
                if first is not None:
                    recovery["first_transition_s"] = float(first) - t_restart
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            recovery["transitions_at_kill"] = transitions
            continue
        if finished >= n:
            break
        time.sleep(0.5)
    # Status is patched at most every --status-interval: wait for the resources too.
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = json.loads(
            plane.kubectl("get", "-n", NAMESPACE, "workflowruns", "-o", "json").stdout
        )["items"]
        if all(
            (r.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled")
            for r in runs
        ):
            break
        time.sleep(0.5)
    assert op.proc is not None
    hwm.append(_vm_hwm_kib(op.proc.pid))
    after = _metrics(op)
    jobs = json.loads(
        plane.kubectl(
            "get", "jobs", "-n", NAMESPACE, "-l", "maestro.dev/run-id", "-o", "json"
        ).stdout
    )["items"]
    rows = pg.admin_query(
        db,
        "SELECT r.name, e.task, e.to_phase, extract(epoch FROM e.at), e.attempt "
        "FROM events e JOIN runs r ON r.id = e.run_id "
        "WHERE e.kind = 'TaskPhase' AND e.from_phase IS NOT NULL",
    )
    (last_finish, succeeded, attempts2), *_ = pg.admin_query(
        db,
        "SELECT extract(epoch FROM max(finished_at)), count(*) FILTER (WHERE phase = 'Succeeded'), "
        "(SELECT count(*) FROM task_attempts WHERE attempt > 1) FROM runs",
    )
    done = {(r[0], r[1]): float(r[3]) for r in rows if r[2] == "Succeeded"}
    running = {(r[0], r[1]): float(r[3]) for r in rows if r[2] == "Running"}
    gap = (t_kill, t_restart + recovery.get("first_transition_s", 0.0))
    store_lat, store_skipped = _latencies(done, running, gap)
    job_done: dict[tuple[str, str], float] = {}
    job_created: dict[tuple[str, str], float] = {}
    expected_names = {job_name(f"r{i:03d}", t, 1) for i in range(n) for t in DEPS}
    unexpected = []
    for job in jobs:
        meta = job["metadata"]
        key = (
            meta["labels"].get("maestro.dev/run", ""),
            meta["labels"].get("maestro.dev/task", ""),
        )
        if meta["name"] not in expected_names or key in job_created:
            unexpected.append(meta["name"])
        job_created[key] = _ts(meta["creationTimestamp"])
        if (job.get("status") or {}).get("completionTime"):
            job_done[key] = _ts(job["status"]["completionTime"])
    job_lat, job_skipped = _latencies(job_done, job_created, gap)
    transitions = len(rows)
    k8s_succeeded = sum(1 for r in runs if (r.get("status") or {}).get("phase") == "Succeeded")
    return {
        "runs": n,
        "elapsed_s": float(last_finish) - t_submit if last_finish else float("nan"),
        "store_succeeded": int(succeeded),
        "k8s_succeeded": k8s_succeeded,
        "transitions": transitions,
        "expected_transitions": expected,
        "store_latency_s": store_lat,
        "store_latency_skipped": store_skipped,
        "job_latency_s": job_lat,
        "job_latency_skipped": job_skipped,
        "patches": before_kill["patches"] + after["patches"],
        "writes": before_kill["writes"] + after["writes"],
        "vm_hwm_kib": hwm,
        "jobs": len(jobs),
        "duplicate_jobs": len(unexpected) + int(attempts2),
        "unexpected_job_names": unexpected[:20],
        "recovery": recovery,
    }


def run(quick: bool = False, runs: int = 100) -> Outcome:
    """Benchmarks 3 and 4 from one pass (one repeat: a pass takes minutes)."""
    n = 10 if quick else runs
    r = measure(n)
    out = Outcome(details=r)
    lost = n - min(r["store_succeeded"], r["k8s_succeeded"])
    store_ms = [x * 1000 for x in r["store_latency_s"]]
    writes_per = r["writes"] / r["transitions"] if r["transitions"] else float("nan")
    rec = r["recovery"]
    out.figures += [
        Figure("operator", f"runs/minute ({n} runs x 10 tasks, kill included)", "1/min",
               [n / r["elapsed_s"] * 60]),
        Figure("operator", "runs lost", "runs", [lost], "0", lost == 0),
        Figure("operator", "dependent-start p50, store events", "ms", [percentile(store_ms, 50)]),
        Figure("operator", "dependent-start p95, store events", "ms", [percentile(store_ms, 95)],
               "< 1 s", percentile(store_ms, 95) < 1000),
        Figure("operator", "dependent-start p50, Job times (+-1 s)", "s",
               [percentile(r["job_latency_s"], 50)]),
        Figure("operator", "dependent-start p95, Job times (+-1 s)", "s",
               [percentile(r["job_latency_s"], 95)], "< 1 s",
               percentile(r["job_latency_s"], 95) < 1.0),
        Figure("operator", "status patches per run", "patches", [r["patches"] / n]),
        Figure("operator", "API writes per task transition", "writes", [writes_per], "<= 2",
               writes_per <= 2),
        Figure("operator", "operator peak RSS (VmHWM, max of 2 processes)", "MiB",
               [max(r["vm_hwm_kib"]) / 1024]),
        Figure("recovery", "SIGKILL -> restarted operator ready", "s",
               [rec.get("ready_s", float("nan"))]),
        Figure("recovery", "restart -> first new transition", "s",
               [rec.get("first_transition_s", float("nan"))]),
        Figure("recovery", "duplicate Jobs", "Jobs", [r["duplicate_jobs"]], "0",
               r["duplicate_jobs"] == 0),
    ]  # fmt: skip
    return out
