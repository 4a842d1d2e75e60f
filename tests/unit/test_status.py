"""The WorkflowRun status view: size bounds and kstatus conditions."""

import json
from datetime import UTC, datetime, timedelta

from maestro.api.models import WorkflowSpec
from maestro.api.phases import RunPhase, TaskPhase
from maestro.operator.status import conditions, run_status, summarize_outputs
from maestro.store import AttemptRecord, RunRecord

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _run(spec: WorkflowSpec, phase: RunPhase) -> RunRecord:
    return RunRecord(
        id="r-1",
        namespace="ns",
        name="big",
        uid="u",
        workflow_name="wf",
        spec=spec.model_dump(mode="json", by_alias=True, exclude_none=True),
        params={},
        phase=phase,
        reason=None,
        message="",
        controls={},
        generation=1,
        created_at=NOW,
        started_at=NOW,
        finished_at=None,
        updated_at=NOW,
    )


def test_thousand_task_status_stays_small() -> None:
    n = 1000
    tasks = [
        {"name": f"task-{i:04d}", "container": {"image": "registry.example/app:1.0"}}
        for i in range(n)
    ]
    spec = WorkflowSpec.model_validate({"tasks": tasks})
    big_outputs = {f"key{k}": "x" * 5000 for k in range(20)}
    latest = {
        t["name"]: AttemptRecord(
            run_id="r-1",
            task=t["name"],
            attempt=3,
            phase=TaskPhase.FAILED,
            reason="Error",
            message="exit code 1: " + "y" * 5000,
            outputs=big_outputs,
            job_name=f"big-{t['name']}-3",
            not_before=None,
            created_at=NOW,
            started_at=NOW,
            finished_at=NOW + timedelta(seconds=5),
        )
        for t in tasks
    }
    status = run_status(
        _run(spec, RunPhase.RUNNING),
        spec,
        latest,
        live_message="",
        generation=1,
        previous_conditions=[],
        now=NOW,
        include_spec=True,
    )
    size = len(json.dumps(status))
    # etcd refuses objects over 1.5 MiB; the worst case must leave a wide margin.
    assert size < 1_000_000, size
    assert status["progress"] == f"{n}/{n}"
    # Each task's share shrank, yet every task still says something.
    assert 0 < len(status["tasks"]["task-0000"]["message"]) < 512
    assert status["tasks"]["task-0999"]["outputs"]


def test_small_run_keeps_full_detail() -> None:
    spec = WorkflowSpec.model_validate({"tasks": [{"name": "a", "approval": {}}]})
    att = AttemptRecord(
        run_id="r-1",
        task="a",
        attempt=1,
        phase=TaskPhase.FAILED,
        reason="Error",
        message="m" * 2000,
        outputs={"k": "v" * 100},
        job_name=None,
        not_before=None,
        created_at=NOW,
        started_at=NOW,
        finished_at=NOW,
    )
    status = run_status(
        _run(spec, RunPhase.RUNNING),
        spec,
        {"a": att},
        live_message="",
        generation=1,
        previous_conditions=[],
        now=NOW,
        include_spec=True,
    )
    assert len(status["tasks"]["a"]["message"]) == 512
    assert status["tasks"]["a"]["outputs"] == {"k": "v" * 100}


def test_outputs_summary_is_bounded_and_marks_the_cut() -> None:
    summary = summarize_outputs({f"k{i}": "v" * 300 for i in range(10)})
    assert summary is not None
    assert len(json.dumps(summary)) <= 1200
    assert summary["…"] == "more in the store: maestro get"
    assert summary["k0"].endswith("…")
    assert summarize_outputs({"a": 1}) == {"a": 1}


def test_conditions_follow_kstatus_and_keep_transition_times() -> None:
    running = conditions(RunPhase.RUNNING, "Started", "1 running", 3, [], NOW)
    by_type = {c["type"]: c for c in running}
    assert {t: c["status"] for t, c in by_type.items()} == {
        "Ready": "False",
        "Succeeded": "Unknown",
        "Reconciling": "True",
        "Stalled": "False",
    }
    assert all(c["observedGeneration"] == 3 for c in running)
    later = NOW + timedelta(minutes=5)
    failed = {
        c["type"]: c for c in conditions(RunPhase.FAILED, "TaskFailed", "x", 3, running, later)
    }
    assert failed["Stalled"]["status"] == "True"
    assert failed["Succeeded"]["status"] == "False"
    assert failed["Ready"]["lastTransitionTime"] == by_type["Ready"]["lastTransitionTime"]
    assert failed["Stalled"]["lastTransitionTime"] == "2026-01-01T00:05:00Z"
