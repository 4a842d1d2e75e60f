"""Unit checks of what users see (issue 13): messages, generations, editors, task order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import yaml
from click.testing import CliRunner

from maestro.api.models import WorkflowSpec
from maestro.api.phases import RunPhase, TaskPhase
from maestro.cli.cluster import task_order
from maestro.cli.main import cli
from maestro.dag.scheduler import Controls, RunState, TaskState, decide
from maestro.dag.validate import plan
from maestro.operator.runs import editor_of
from maestro.operator.status import observe_generation

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def _state(spec: WorkflowSpec, tasks: dict[str, TaskState], **controls: object) -> RunState:
    return RunState(
        spec=spec,
        plan=plan(spec),
        phase=RunPhase.RUNNING,
        started_at=NOW - timedelta(seconds=10),
        controls=Controls(**controls),  # type: ignore[arg-type]
        tasks=tasks,
        params={},
        run_info={"id": "r", "name": "r", "namespace": "ns"},
    )


def _running(message: str) -> TaskState:
    return TaskState(
        1, TaskPhase.RUNNING, "Started", message, started_at=NOW - timedelta(seconds=5)
    )


def test_a_timeout_says_so_in_the_run_message() -> None:
    spec = WorkflowSpec.model_validate(
        {
            "tasks": [
                {"name": "slow", "timeoutSeconds": 2, "container": {"image": "x"}},
                {"name": "gate", "timeoutSeconds": 2, "approval": {}},
            ],
            "failFast": False,
        }
    )
    running = {"slow": _running("running"), "gate": _running("waiting for approval")}
    decision = decide(_state(spec, running), NOW)
    stops = {a.task: a.message for a in decision.actions}  # type: ignore[attr-defined]
    assert stops == {
        "slow": "attempt 1 timed out after 2s",
        "gate": "approval timed out after 2s",
    }
    assert decision.run[-1].phase is RunPhase.FAILED
    assert decision.run[-1].message == "task 'slow' failed: attempt 1 timed out after 2s"


def test_a_cancel_names_who_cancelled() -> None:
    spec = WorkflowSpec.model_validate({"tasks": [{"name": "a", "container": {"image": "x"}}]})
    cancelled = {"a": TaskState(1, TaskPhase.CANCELLED, "RunCancelled", "stopped")}
    decision = decide(_state(spec, cancelled, cancel=True, cancelled_by="alice"), NOW)
    assert (decision.run[-1].phase, decision.run[-1].message) == (
        RunPhase.CANCELLED,
        "cancelled by alice",
    )


def test_a_stop_of_the_last_running_tasks_decides_the_outcome_in_the_same_pass() -> None:
    """A cancel (or run timeout) that stops the main DAG's last running tasks, an
    approval gate among them, ends the run Cancelled (or Failed) in that pass: the
    stopped tasks count, not only the ones never started."""
    spec = WorkflowSpec.model_validate(
        {
            "tasks": [
                {"name": "gate", "approval": {}},
                {"name": "work", "container": {"image": "x"}},
            ],
            "timeoutSeconds": 60,
        }
    )
    running = {"gate": _running("waiting for approval"), "work": _running("running")}
    cancelled = decide(_state(spec, running, cancel=True, cancelled_by="alice"), NOW)
    assert sorted(a.task for a in cancelled.actions) == ["gate", "work"]  # type: ignore[attr-defined]
    assert cancelled.outcome == "Cancelled"
    last = cancelled.run[-1]
    assert (last.phase, last.reason, last.message) == (
        RunPhase.CANCELLED,
        "RunCancelled",
        "cancelled by alice",
    )
    timed_out = decide(_state(spec, running), NOW + timedelta(seconds=60))
    assert timed_out.outcome == "Failed"
    assert timed_out.run[-1].reason == "RunTimedOut"


def test_observe_generation_moves_status_and_every_condition() -> None:
    status = {
        "phase": "Succeeded",
        "observedGeneration": 1,
        "conditions": [
            {"type": "Ready", "status": "True", "observedGeneration": 1},
            {"type": "Stalled", "status": "False", "observedGeneration": 1},
        ],
    }
    patch = observe_generation(status, 3)
    assert patch["observedGeneration"] == 3
    assert [(c["type"], c["status"], c["observedGeneration"]) for c in patch["conditions"]] == [
        ("Ready", "True", 3),
        ("Stalled", "False", 3),
    ]
    assert "phase" not in patch  # a merge patch: nothing else is touched


def test_editor_is_the_newest_manager_of_the_field() -> None:
    meta = {
        "managedFields": [
            {"manager": "kubectl-client-side-apply", "time": "2026-01-01T00:00:00Z",
             "fieldsV1": {"f:spec": {"f:approvals": {}, "f:workflowRef": {}}}},
            {"manager": "alice", "time": "2026-01-01T00:05:00Z",
             "fieldsV1": {"f:spec": {"f:approvals": {}}}},
            {"manager": "maestro", "time": "2026-01-01T00:09:00Z",
             "fieldsV1": {"f:status": {}}},
        ]
    }  # fmt: skip
    assert editor_of(meta, "approvals") == "alice"
    assert editor_of(meta, "cancel") == "unknown"


def test_tasks_are_listed_in_dag_order_with_finally_last() -> None:
    spec = {
        "tasks": [
            {"name": "deploy", "dependsOn": ["build"], "container": {"image": "x"}},
            {"name": "build", "container": {"image": "x"}},
        ],
        "finally": [{"name": "a-cleanup", "container": {"image": "x"}}],
    }
    tasks = {n: {"phase": "Succeeded"} for n in ("a-cleanup", "build", "deploy")}
    obj = {"status": {"workflowSpec": spec, "tasks": tasks}}
    assert task_order(obj) == ["build", "deploy", "a-cleanup"]
    # Without the snapshot (too big for status): by start time.
    tasks["deploy"]["startedAt"] = "2026-01-01T00:00:02Z"
    tasks["build"]["startedAt"] = "2026-01-01T00:00:01Z"
    assert task_order({"status": {"tasks": tasks}}) == ["build", "deploy", "a-cleanup"]


def test_validate_resolves_a_run_against_the_workflow_given_with_it(tmp_path: Path) -> None:
    wf = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "deploy"},
        "spec": {"params": [{"name": "env"}], "tasks": [{"name": "a", "approval": {}}]},
    }
    run = {
        "apiVersion": "maestro.dev/v1alpha1",
        "kind": "WorkflowRun",
        "metadata": {"name": "r"},
        "spec": {"workflowRef": {"name": "deploy"}, "params": {"env": "x", "colour": "red"}},
    }
    (tmp_path / "wf.yaml").write_text(yaml.safe_dump(wf))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    result = CliRunner().invoke(
        cli, ["validate", str(tmp_path / "wf.yaml"), str(tmp_path / "run.yaml")]
    )
    assert result.exit_code == 1
    assert f"{tmp_path / 'run.yaml'}: params.colour: not declared by the workflow" in result.stderr
    # Alone, the run cannot be checked against anything: only its own shape.
    alone = CliRunner().invoke(cli, ["validate", str(tmp_path / "run.yaml")])
    assert alone.exit_code == 0, alone.output
