"""Several active replicas share the runs by bucket (issue 20), on the local plane.

Three operators, 200 runs; mid-run one is SIGKILLed, one is SIGSTOPped past its lease
and resumed, one is stopped gracefully. Every run must still end Succeeded, no
(run, task, attempt) may ever have two pods, and the paused replica must find its
buckets gone (its drivers stopped, its writes refused) instead of writing on.
Takeover times are printed here and measured by ``python -m bench failover``.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures.control_plane import ControlPlane
from fixtures.operator import OperatorProcess, apply
from maestro.store.leases import BUCKETS

RUNS = 200
LEASE = 5.0


def _eventually(check: Callable[[], bool], what: str, timeout: float = 120.0) -> float:
    """Seconds until ``check()`` holds; fails naming ``what`` after ``timeout``."""
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.1)
    return time.monotonic() - started


def _held(op: OperatorProcess) -> list[int]:
    """The buckets a replica says (on /readyz) it holds; [] when it does not answer."""
    try:
        status, body = op.get("/readyz")
    except OSError:
        return []
    return list(json.loads(body).get("buckets") or []) if status in (200, 503) else []


def _covered(replicas: list[OperatorProcess]) -> bool:
    """Every bucket held by exactly one of ``replicas``."""
    held = [b for op in replicas for b in _held(op)]
    return sorted(held) == list(range(BUCKETS))


def _balanced(replicas: list[OperatorProcess]) -> bool:
    share = BUCKETS / len(replicas)
    return _covered(replicas) and all(abs(len(_held(op)) - share) < 1 for op in replicas)


@pytest.fixture
def replicas(
    control_plane: ControlPlane, crds: None, namespace: str, postgres_url: str, tmp_path: Path
) -> Iterator[list[OperatorProcess]]:
    """Three operators on one namespace and one database."""
    started: list[OperatorProcess] = []
    try:
        for i in range(3):
            logs = tmp_path / f"replica-{i}"
            logs.mkdir()
            op = OperatorProcess(
                control_plane.kubeconfig, postgres_url, namespace, logs,
                extra=["--lease-seconds", str(LEASE), "--db-pool-size", "15"],
            )  # fmt: skip
            op.start()
            started.append(op)
        yield started
    finally:
        for op in started:
            if op.proc is not None and op.proc.poll() is None:
                op.proc.send_signal(signal.SIGCONT)
            op.kill(signal.SIGTERM)


def _runs(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    out = cp.kubectl("get", "workflowruns", "-n", namespace, "-o", "json").stdout
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def _pods(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    out = cp.kubectl("get", "pods", "-n", namespace, "-l", "maestro.dev/run-id", "-o", "json")
    items: list[dict[str, Any]] = json.loads(out.stdout)["items"]
    return items


def test_three_replicas_share_200_runs_through_kill_pause_and_graceful_stop(
    control_plane: ControlPlane, namespace: str, replicas: list[OperatorProcess]
) -> None:
    a, b, c = replicas
    _eventually(lambda: _balanced(replicas), "32 buckets balanced over 3 replicas")
    counts = sorted(len(_held(op)) for op in replicas)
    assert counts == [10, 11, 11], counts  # each within one of its share (32 / 3)

    def task(name: str, *after: str) -> dict[str, Any]:
        annotations = {"maestro.dev/kwok-delay": "1s"}
        return {
            "name": name,
            "dependsOn": list(after),
            "container": {"image": "busybox", "podMetadata": {"annotations": annotations}},
        }

    tasks = [task("a"), task("b", "a"), task("c", "a"), task("d", "b", "c")]
    wf = {"apiVersion": "maestro.dev/v1alpha1", "kind": "Workflow", "metadata": {"name": "so"}}
    apply(control_plane, namespace, {**wf, "spec": {"tasks": tasks}})
    runs = [
        {
            "apiVersion": "maestro.dev/v1alpha1",
            "kind": "WorkflowRun",
            "metadata": {"name": f"r{i:03d}"},
            "spec": {"workflowRef": {"name": "so"}},
        }
        for i in range(RUNS)
    ]
    apply(control_plane, namespace, *runs)
    _eventually(lambda: len(_pods(control_plane, namespace)) >= 100, "100 task pods")

    # 1. SIGKILL: no goodbye, the others take its buckets when its lease runs out.
    a.kill(signal.SIGKILL)
    took = _eventually(lambda: _covered([b, c]), "b and c cover the killed replica's buckets")
    print(f"takeover after SIGKILL: {took:.1f}s (lease {LEASE}s)")

    # 2. SIGSTOP past the lease: c ends up with everything; b, resumed, has lost it all.
    assert b.proc is not None
    b.proc.send_signal(signal.SIGSTOP)
    took = _eventually(lambda: len(_held(c)) == BUCKETS, "c holds every bucket")
    print(f"takeover from a paused replica: {took:.1f}s")
    b.proc.send_signal(signal.SIGCONT)
    _eventually(
        lambda: b.metric('maestro_bucket_handovers_total{direction="lost"}') > 0,
        "the resumed replica notices its buckets are gone",
    )
    a.start()  # the killed one comes back under its name
    _eventually(lambda: _balanced(replicas), "balanced again after the pause")

    # 3. A graceful stop hands over at once.
    c.kill(signal.SIGTERM)
    took = _eventually(lambda: _covered([a, b]), "a and b cover the stopped replica's buckets")
    print(f"takeover after a graceful stop: {took:.1f}s")
    assert "gave back" in c.log()
    assert c.proc is not None
    assert c.proc.returncode == 0, c.log()[-3000:]  # a clean exit

    def all_ended() -> bool:
        return all(
            (r.get("status") or {}).get("phase") in ("Succeeded", "Failed", "Cancelled")
            for r in _runs(control_plane, namespace)
        )

    _eventually(all_ended, f"{RUNS} runs ended", timeout=900)
    found = _runs(control_plane, namespace)
    assert len(found) == RUNS
    phases = Counter(r["status"]["phase"] for r in found)
    assert phases == {"Succeeded": RUNS}, phases
    for r in found:
        attempts = {t: s["attempts"] for t, s in r["status"]["tasks"].items()}
        assert attempts == dict.fromkeys("abcd", 1), (r["metadata"]["name"], attempts)
    pods = _pods(control_plane, namespace)
    keys = ("maestro.dev/run-id", "maestro.dev/task", "maestro.dev/attempt")
    per_attempt = Counter(tuple(p["metadata"]["labels"][k] for k in keys) for p in pods)
    assert len(pods) == 4 * RUNS
    assert set(per_attempt.values()) == {1}
    for pod in pods:  # each pod is labelled with its run's bucket (the watches select on it)
        assert 0 <= int(pod["metadata"]["labels"]["maestro.dev/bucket"]) < BUCKETS
    refused = b.log().count("stops here: bucket")
    driven = {op.port: op.metric("maestro_runs_finished_total") for op in (a, b)}
    print(f"paused replica: {refused} drivers refused a write; runs finished per replica {driven}")
