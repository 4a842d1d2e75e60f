"""Benchmarks 3 and 4: the operator end to end on the local control plane, and recovery.

One PostgreSQL server and one local control plane (etcd, kube-apiserver,
controller-manager, scheduler and kwok, whose task pods succeed at once) serve every
pass; each pass gets its own namespace, database and ``maestro operator`` process
(watching that namespace, default ``--status-interval``). Passes:

- ``ten``: N WorkflowRuns of the 10-task DAG ``a -> (b,c,d) -> e -> (f,g,h) -> i -> j``
  applied in one request (the issue's comparison with Argo Workflows);
- ``wide``: one run of a 1,000-task DAG (``start`` -> 998 parallel tasks -> ``end``);
- ``chain``: one run of a 200-task chain;
- ``fanout``: one run of ``start -> fan (forEach over 1,000 items) -> end`` (issue 16:
  the instances are expanded by the operator, not written out in the Workflow);
- ``recovery``: the ``ten`` pass again, with SIGKILL of the operator when 40% of the
  expected task transitions are in the store, and a restart.

Figures of each pass:

- dependent-start latency, seen from outside: a watcher in this process (its own pod
  watch, not the operator's) notes when it sees each upstream pod reach Succeeded and
  each dependent pod appear; a sample is dependent-seen minus the last upstream-seen;
- operator CPU per task: utime + stime of the operator process (``/proc/PID/stat``)
  from just before the apply to the end, over the pass's tasks;
- operator peak RSS (``VmHWM``);
- API requests per task, all clients: the delta of the API server's
  ``apiserver_request_total`` (its ``/metrics``) over the pass, over its tasks. This
  counts everything the plane did meanwhile (scheduler, kwok, controller-manager,
  leases, this watcher and the bench's own few kubectl calls);
- runs Succeeded, and for ``recovery`` duplicate pods (any pod not named
  ``pod_name(run, task, 1)``, or any second attempt) and lost runs.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import yaml

from bench.common import (
    REPO,
    TEN_TASKS,
    Figure,
    Outcome,
    Postgres,
    Shape,
    dag_spec,
    percentile,
    postgres,
    use_test_fixtures,
)

use_test_fixtures()

from fixtures.control_plane import ControlPlane, local_control_plane  # noqa: E402
from fixtures.operator import OperatorProcess  # noqa: E402
from maestro.executors.container import pod_name  # noqa: E402

KILL_AT = 0.4
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def wide(n: int = 1000) -> Shape:
    """``start`` -> n-2 parallel tasks -> ``end``."""
    middle = [f"w{i:04d}" for i in range(n - 2)]
    return [("start", []), *((m, ["start"]) for m in middle), ("end", middle)]


def chain(n: int = 200) -> Shape:
    """t0000 -> t0001 -> ... (n tasks)."""
    return [(f"t{i:04d}", [f"t{i - 1:04d}"] if i else []) for i in range(n)]


FAN_ITEMS = 1000


def fanout_spec(n: int = FAN_ITEMS) -> tuple[Shape, dict[str, Any]]:
    """``start -> fan[0..n-1] -> end`` as the tasks it becomes, and the Workflow spec that
    says it with one forEach task."""
    spec = dag_spec([("start", []), ("fan", ["start"]), ("end", ["fan"])])
    spec["tasks"][1]["forEach"] = {"items": list(range(n))}
    instances = [f"fan[{i}]" for i in range(n)]
    return [("start", []), *((i, ["start"]) for i in instances), ("end", instances)], spec


FAN_SHAPE, FAN_SPEC = fanout_spec()
# A fan-out instance's pod label is ``task.N`` (label values cannot hold brackets).
_INSTANCE_LABEL = re.compile(r"(.+)\.(\d+)")


def _vm_hwm_kib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return float(line.split()[1])
    return float("nan")


def _cpu_s(pid: int) -> float:
    return sum(_cpu_split_s(pid))


def _cpu_split_s(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of a process."""
    # Fields after the command (which may hold spaces) start at state; utime, stime are
    # the 14th and 15th fields of the whole line.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLOCK_TICK, int(fields[12]) / CLOCK_TICK


def _api_requests(plane: ControlPlane) -> float:
    text = plane.kubectl("get", "--raw", "/metrics").stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("apiserver_request_total{")
    )


class PodWatcher(threading.Thread):
    """An outside observer: when this process sees each task pod appear and succeed."""

    def __init__(self, plane: ControlPlane, namespace: str) -> None:
        super().__init__(daemon=True)
        self.plane = plane
        self.namespace = namespace
        self.pods = f"/api/v1/namespaces/{namespace}/pods"
        self.created: dict[tuple[str, str], float] = {}
        self.succeeded: dict[tuple[str, str], float] = {}
        self.names: set[str] = set()  # every task pod seen
        self.stop = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None  # the kubectl following the watch
        # The raw list, not `kubectl get -o json` (whose client-side List has no version).
        listed = orjson.loads(plane.kubectl("get", "--raw", self.pods).stdout)
        self.version = listed["metadata"]["resourceVersion"]

    def _lines(self) -> Iterator[bytes]:
        # kubectl copies the watch's body as it comes: one JSON event a line.
        url = f"{self.pods}?watch=1&resourceVersion={self.version}&timeoutSeconds=60"
        with subprocess.Popen(
            self.plane.kubectl_argv("get", "--raw", url),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        ) as self.proc:
            assert self.proc.stdout is not None
            try:
                yield from (line for line in self.proc.stdout if line.strip())
            finally:
                self.proc.kill()

    def close(self) -> None:
        """Stop watching (the kubectl now, not when its watch times out)."""
        self.stop.set()
        if self.proc is not None:
            self.proc.kill()

    def run(self) -> None:
        while not self.stop.is_set():
            # Each pass ends when the API server ends the stream (or the connection
            # breaks): resume from the last version.
            self._follow()

    def _follow(self) -> None:
        """One watch request, noting what it shows."""
        for line in self._lines():
            seen = time.time()
            event = orjson.loads(line)
            obj = event["object"]
            meta = obj.get("metadata") or {}
            self.version = meta.get("resourceVersion") or self.version
            labels = meta.get("labels") or {}
            if "maestro.dev/task" not in labels:
                continue
            task = labels["maestro.dev/task"]
            if m := _INSTANCE_LABEL.fullmatch(task):
                task = f"{m[1]}[{m[2]}]"  # the instance's name, as the shape has it
            key = (labels["maestro.dev/run"], task)
            self.names.add(meta["name"])
            if key not in self.created:
                self.created[key] = seen
            phase = (obj.get("status") or {}).get("phase")
            if phase == "Succeeded" and key not in self.succeeded:
                self.succeeded[key] = seen

    def latencies(self, shape: Shape, gap: tuple[float, float]) -> tuple[list[float], int]:
        """Seconds from the last upstream's success to the dependent's creation per task
        with dependencies; and how many straddled an operator outage (left out)."""
        deps = dict(shape)
        out, skipped = [], 0
        for (run, task), t_start in self.created.items():
            ups = deps.get(task) or []
            if not ups or any((run, u) not in self.succeeded for u in ups):
                continue
            t_done = max(self.succeeded[(run, u)] for u in ups)
            if t_done < gap[1] and t_start > gap[0]:
                skipped += 1
                continue
            out.append(t_start - t_done)
        return out, skipped


def _prepare(plane: ControlPlane, namespace: str) -> None:
    plane.create_namespace(namespace, timeout=60)


def _crds(plane: ControlPlane) -> None:
    plane.kubectl("apply", "-f", str(REPO / "crds"))
    deadline = time.monotonic() + 60
    while plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=30s",
        "crd/workflows.maestro.dev", "crd/workflowruns.maestro.dev", check=False,
    ).returncode != 0:  # fmt: skip
        if time.monotonic() > deadline:
            raise RuntimeError("CRDs not Established after 60 s")
        time.sleep(0.5)


def _manifests(shape: Shape, n: int, spec: dict[str, Any] | None) -> str:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "maestro.dev/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "bench"},
            "spec": spec or dag_spec(shape),
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


def _transactions(pg: Postgres, db: str) -> int:
    """Transactions the database has counted (pg_stat_database, flushed at least every
    second; this query is one of them)."""
    ((n,),) = pg.admin_query(
        db,
        "SELECT xact_commit + xact_rollback FROM pg_stat_database "
        "WHERE datname = current_database()",
    )
    return int(n)


# The operator's store statements: every statement it runs (SQLAlchemy's cursor events),
# not the BEGIN and COMMIT around them.
STATEMENTS = "maestro_store_query_duration_seconds_count"


def one_pass(
    plane: ControlPlane,
    pg: Postgres,
    logs: Path,
    name: str,
    shape: Shape,
    n: int,
    kill: bool,
    spec: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Apply ``n`` runs of ``shape`` in a namespace of their own; raw results."""
    namespace = f"bench-{name}"
    _prepare(plane, namespace)
    db, url = pg.new_database()
    op = OperatorProcess(
        plane.kubeconfig, url, namespace, logs / name, extra=["--status-interval", "1"]
    )
    (logs / name).mkdir()
    # Deployed as the chart does it: `maestro db upgrade` first, then the operator (which
    # then never imports Alembic; docs/performance.md).
    op.migrate_first()
    op.start()
    watcher = PodWatcher(plane, namespace)
    watcher.start()
    try:
        return _drive(plane, pg, db, op, watcher, shape, n, kill, spec)
    finally:
        watcher.close()
        op.kill(signal.SIGTERM)


def _drive(
    plane: ControlPlane,
    pg: Postgres,
    db: str,
    op: OperatorProcess,
    watcher: PodWatcher,
    shape: Shape,
    n: int,
    kill: bool,
    spec: dict[str, Any] | None,
) -> dict[str, Any]:
    tasks = n * len(shape)
    expected = tasks * 2
    assert op.proc is not None
    requests_before = _api_requests(plane)
    statements = -op.metric(STATEMENTS)
    xacts, polls = -_transactions(pg, db), 0
    cpu = -_cpu_s(op.proc.pid)
    user, system = _cpu_split_s(op.proc.pid)
    split = [-user, -system]
    t_submit = time.time()
    plane.kubectl("apply", "-n", watcher.namespace, "-f", "-", input=_manifests(shape, n, spec))
    recovery: dict[str, Any] = {}
    hwm: list[float] = []
    t_kill = t_restart = float("inf")
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        transitions, finished = _store_counts(pg, db)
        polls += 1
        if kill and not recovery and transitions >= KILL_AT * expected:
            hwm.append(_vm_hwm_kib(op.proc.pid))
            statements += op.metric(STATEMENTS)  # the restarted process counts from 0
            cpu += _cpu_s(op.proc.pid)
            split = [a + b for a, b in zip(split, _cpu_split_s(op.proc.pid), strict=True)]
            t_kill = time.time()
            op.kill(signal.SIGKILL)
            t_restart = time.time()
            op.start(wait_ready=False)
            cpu -= _cpu_s(op.proc.pid)
            split = [a - b for a, b in zip(split, _cpu_split_s(op.proc.pid), strict=True)]
            op.wait_ready(timeout=120)
            recovery["ready_s"] = time.time() - t_restart
            while time.monotonic() < deadline:
                (first,) = pg.admin_query(
                    db,
                    "SELECT extract(epoch FROM min(at)) FROM events "
                    f"WHERE at > to_timestamp({t_restart})",
                )[0]
                polls += 1
                if first is not None:
                    recovery["first_transition_s"] = float(first) - t_restart
                    break
                time.sleep(0.05)
            recovery["transitions_at_kill"] = transitions
            continue
        if finished >= n:
            break
        time.sleep(0.2)
    # Status is patched at most every --status-interval: wait for the resources too.
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = json.loads(
            plane.kubectl("get", "-n", watcher.namespace, "workflowruns", "-o", "json").stdout
        )["items"]
        if all(
            (r.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled")
            for r in runs
        ):
            break
        time.sleep(0.5)
    cpu += _cpu_s(op.proc.pid)
    split = [a + b for a, b in zip(split, _cpu_split_s(op.proc.pid), strict=True)]
    hwm.append(_vm_hwm_kib(op.proc.pid))
    requests = _api_requests(plane) - requests_before
    statements += op.metric(STATEMENTS)
    time.sleep(1.5)  # the server's statistics are flushed about every second
    xacts += _transactions(pg, db) - polls - 1  # not this benchmark's own queries
    (last_finish, succeeded, attempts2), *_ = pg.admin_query(
        db,
        "SELECT extract(epoch FROM max(finished_at)), count(*) FILTER (WHERE phase = 'Succeeded'), "
        "(SELECT count(*) FROM task_attempts WHERE attempt > 1) FROM runs",
    )
    gap = (t_kill, t_restart + recovery.get("first_transition_s", 0.0))
    latency, skipped = watcher.latencies(shape, gap)
    expected_names = {pod_name(f"r{i:03d}", t, 1) for i in range(n) for t, _ in shape}
    unexpected = sorted(watcher.names - expected_names)
    k8s_succeeded = sum(1 for r in runs if (r.get("status") or {}).get("phase") == "Succeeded")
    return {
        "runs": n,
        "tasks": tasks,
        "elapsed_s": float(last_finish) - t_submit if last_finish else float("nan"),
        "store_succeeded": int(succeeded),
        "k8s_succeeded": k8s_succeeded,
        "latency_s": latency,
        "latency_skipped": skipped,
        "cpu_s": cpu,
        "cpu_user_s": split[0],
        "cpu_system_s": split[1],
        "api_requests": requests,
        "store_statements": statements,
        "store_transactions": xacts,
        "vm_hwm_kib": hwm,
        "pods_seen": len(watcher.names),
        "duplicate_pods": len(unexpected) + int(attempts2),
        "unexpected_pod_names": unexpected[:20],
        "recovery": recovery,
        "loadavg": os.getloadavg(),
    }


# name -> (the tasks a run becomes, SIGKILL mid-pass, the Workflow spec when not the shape's)
PASSES: dict[str, tuple[Shape, bool, dict[str, Any] | None]] = {
    "ten": (TEN_TASKS, False, None),
    "wide": (wide(), False, None),
    "chain": (chain(), False, None),
    "recovery": (TEN_TASKS, True, None),
    "fanout": (FAN_SHAPE, False, FAN_SPEC),
}


def measure(runs: int, passes: list[str]) -> dict[str, dict[str, Any]]:
    """Every pass named, on one plane and one PostgreSQL server."""
    with (
        postgres() as pg,
        local_control_plane(log=io.StringIO()) as plane,
        tempfile.TemporaryDirectory(prefix="maestro-bench-op-") as logs,
    ):
        _crds(plane)
        results = {}
        for name in passes:
            shape, kill, spec = PASSES[name]
            n = runs if shape is TEN_TASKS else 1
            # A pass named again (`--passes ten ten`, to see the spread) is ten-2, ten-3...
            key = (
                name
                if name not in results
                else f"{name}-{sum(k.split('-')[0] == name for k in results) + 1}"
            )
            results[key] = one_pass(plane, pg, Path(logs), key, shape, n, kill, spec)
        return results


def _figures(name: str, r: dict[str, Any]) -> list[Figure]:
    base = name.split("-")[0]
    label = {
        "ten": f"{r['runs']} runs x 10 tasks",
        "wide": "1 run x 1,000 wide",
        "chain": "1 run x 200 chain",
        "fanout": f"1 run, forEach over {FAN_ITEMS:,}",
        "recovery": f"{r['runs']} x 10, SIGKILL",
    }[base]
    ms = [x * 1000 for x in r["latency_s"]]
    tasks = r["tasks"]
    lost = r["runs"] - min(r["store_succeeded"], r["k8s_succeeded"])
    figures = [
        Figure(name, f"elapsed ({label})", "s", [r["elapsed_s"]]),
        Figure(name, "runs lost or not Succeeded", "runs", [lost], "0", lost == 0),
        Figure(name, "dependent-start p50 (outside watcher)", "ms", [percentile(ms, 50)],
               "<= 500", percentile(ms, 50) <= 500),
        Figure(name, "dependent-start p95 (outside watcher)", "ms", [percentile(ms, 95)],
               "<= 1500", percentile(ms, 95) <= 1500),
        Figure(name, "operator CPU per task", "ms", [r["cpu_s"] * 1000 / tasks], "<= 10",
               r["cpu_s"] * 1000 / tasks <= 10),
        Figure(name, "operator CPU per task: in the kernel", "ms",
               [r.get("cpu_system_s", float("nan")) * 1000 / tasks]),
        Figure(name, "operator peak RSS (VmHWM)", "MiB", [max(r["vm_hwm_kib"]) / 1024],
               "<= 160", max(r["vm_hwm_kib"]) / 1024 <= 160),
        Figure(name, "API requests per task (all clients)", "req", [r["api_requests"] / tasks],
               "<= 8", r["api_requests"] / tasks <= 8),
        Figure(name, "store statements per task (operator)", "stmt",
               [r.get("store_statements", float("nan")) / tasks]),
        Figure(name, "store transactions per task (database)", "xact",
               [r.get("store_transactions", float("nan")) / tasks]),
    ]  # fmt: skip
    if base == "recovery":
        rec = r["recovery"]
        figures += [
            Figure(name, "SIGKILL -> restarted operator ready", "s",
                   [rec.get("ready_s", float("nan"))]),
            Figure(name, "restart -> first new transition", "s",
                   [rec.get("first_transition_s", float("nan"))]),
            Figure(name, "duplicate pods", "pods", [r["duplicate_pods"]], "0",
                   r["duplicate_pods"] == 0),
        ]  # fmt: skip
    return figures


def run(quick: bool = False, runs: int = 100, passes: list[str] | None = None) -> Outcome:
    """Every pass once (a pass takes about a minute; the machine is shared)."""
    names = passes or (["ten", "recovery"] if quick else list(PASSES))
    results = measure(10 if quick else runs, names)
    out = Outcome(details=results)
    for name, r in results.items():
        out.figures += _figures(name, r)
    return out
