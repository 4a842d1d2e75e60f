"""Benchmark: peering failover, SIGKILL of the active operator to the standby at work.

One pass: a private PostgreSQL server, the local control plane, Maestro's and Kopf's
peering CRDs, a KopfPeering object and two ``maestro operator --peering`` processes of
different priorities. Each repeat SIGKILLs the active one (no goodbye: its peering
record must expire), applies a WorkflowRun at once and times until that run's status
says Running, i.e. the standby took over and started it. A new standby (lower
priority) is started for the next repeat. Target: under 10 s (issue 12), with the
default ``--peering-lifetime`` of 6 s.
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

from bench.common import REPO, Figure, Outcome, postgres, use_test_fixtures

use_test_fixtures()

from fixtures.control_plane import ControlPlane, local_control_plane  # noqa: E402
from fixtures.operator import OperatorProcess  # noqa: E402

NAMESPACE = "bench-failover"
TARGET_S = 10.0


def _apply(plane: ControlPlane, *docs: dict[str, Any]) -> None:
    plane.kubectl("apply", "-n", NAMESPACE, "-f", "-", input=yaml.safe_dump_all(list(docs)))


def _run(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": name},
        "spec": {"workflowRef": {"name": "one"}},
    }


def _phase(plane: ControlPlane, name: str) -> str | None:
    out = plane.kubectl("get", "-n", NAMESPACE, "workflowrun", name, "-o", "json", check=False)
    if out.returncode:
        return None
    phase: str | None = (json.loads(out.stdout).get("status") or {}).get("phase")
    return phase


def _wait(plane: ControlPlane, name: str, phases: tuple[str, ...], timeout: float) -> float:
    """Seconds until the run's phase is one of ``phases``."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if _phase(plane, name) in phases:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise RuntimeError(f"run {name} not in {phases} after {timeout} s")


def _prepare(plane: ControlPlane) -> None:
    plane.kubectl("apply", "-f", str(REPO / "crds"))
    plane.kubectl("apply", "-f", str(REPO / "charts/maestro/crds/kopf.dev_peerings.yaml"))
    for crd in ("workflows.maestro.dev", "workflowruns.maestro.dev", "kopfpeerings.kopf.dev"):
        plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")
    plane.kubectl("create", "namespace", NAMESPACE)
    while plane.kubectl("get", "-n", NAMESPACE, "sa", "default", check=False).returncode:
        time.sleep(0.2)
    one = {"name": "a", "container": {"image": "busybox", "command": ["true"]}}
    _apply(
        plane,
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "maestro"}},
        {
            "apiVersion": "maestro.dev/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": "one"},
            "spec": {"tasks": [one]},
        },
    )


def measure(repeats: int) -> list[float]:
    """Failover seconds, one per repeat."""
    seconds: list[float] = []
    with (
        postgres() as pg,
        local_control_plane(log=io.StringIO()) as plane,
        tempfile.TemporaryDirectory(prefix="maestro-bench-failover-") as tmp,
    ):
        _prepare(plane)
        _, url = pg.new_database()

        def operator(priority: int) -> OperatorProcess:
            logs = Path(tmp) / f"p{priority}"
            logs.mkdir()
            op = OperatorProcess(
                plane.kubeconfig, url, NAMESPACE, logs,
                extra=["--peering", "maestro", "--priority", str(priority)],
            )  # fmt: skip
            op.start()
            return op

        priority = 1000
        active, standby = operator(priority), operator(priority // 2)
        try:
            _apply(plane, _run("warm-up"))
            _wait(plane, "warm-up", ("Succeeded",), 120)
            for i in range(repeats):
                active.kill(signal.SIGKILL)
                killed = time.monotonic()
                _apply(plane, _run(f"after-kill-{i}"))
                _wait(plane, f"after-kill-{i}", ("Running", "Succeeded"), 120)
                seconds.append(time.monotonic() - killed)
                priority //= 2
                active, standby = standby, operator(priority // 2)
        finally:
            for op in (active, standby):
                op.kill(signal.SIGTERM)
    return seconds


def run(quick: bool = False) -> Outcome:
    """The benchmark as ``python -m bench failover`` runs it."""
    values = measure(1 if quick else 3)
    return Outcome(
        figures=[
            Figure(
                "failover",
                "SIGKILL of the active operator -> standby starts a new run",
                "s",
                values,
                f"< {TARGET_S:g} s",
                max(values) < TARGET_S,
            )
        ],
        details={"seconds": values},
    )
