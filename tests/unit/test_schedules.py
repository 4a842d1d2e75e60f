"""WorkflowSchedule rules (CronJob's), pure: missed times, deadlines, policies, history."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from maestro.api.models import WorkflowSchedule, WorkflowScheduleSpec
from maestro.dag.schedules import ScheduledRun, most_recent_due, next_time, run_name, tick

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


def spec(**extra: Any) -> WorkflowScheduleSpec:
    return WorkflowScheduleSpec.model_validate(
        {"schedule": "*/5 * * * *", "runTemplate": {"workflowRef": {"name": "wf"}}, **extra}
    )


def run(name: str, phase: str | None, minutes: int) -> ScheduledRun:
    at = T0 + timedelta(minutes=minutes)
    return ScheduledRun(name, phase, at, at + timedelta(seconds=30) if phase else None)


def test_nothing_due_before_the_first_time() -> None:
    t = tick(spec(), None, T0, [], T0 + timedelta(minutes=4))
    assert t.start is None
    assert t.next_time == T0 + timedelta(minutes=5)


def test_due_time_starts_one_run_with_a_deterministic_name() -> None:
    t = tick(spec(), None, T0, [], T0 + timedelta(minutes=5, seconds=3))
    assert t.start == T0 + timedelta(minutes=5)
    assert t.missed == 0
    assert run_name("nightly", t.start) == f"nightly-{int(t.start.timestamp())}"


def test_after_an_outage_only_the_most_recent_time_starts() -> None:
    t = tick(spec(), T0, T0, [], T0 + timedelta(minutes=32))
    assert t.start == T0 + timedelta(minutes=30)
    assert t.missed == 5


def test_starting_deadline_skips_a_time_noticed_too_late() -> None:
    late = tick(spec(startingDeadlineSeconds=60), T0, T0, [], T0 + timedelta(minutes=7))
    assert late.start is None
    assert late.skipped is not None
    assert late.skipped.startswith("MissedDeadline")
    in_time = tick(spec(startingDeadlineSeconds=180), T0, T0, [], T0 + timedelta(minutes=7))
    assert in_time.start == T0 + timedelta(minutes=5)


def test_very_long_outage_is_a_bounded_walk() -> None:
    due, count = most_recent_due(spec(schedule="* * * * *"), T0, T0 + timedelta(days=30))
    assert due == T0 + timedelta(days=30)
    assert count > 100


@pytest.mark.parametrize(
    ("policy", "start", "cancel", "active"),
    [
        ("Allow", True, (), ("r1",)),
        ("Forbid", False, (), ("r1",)),
        ("Replace", True, ("r1",), ()),
    ],
)
def test_concurrency_policies(
    policy: str, start: bool, cancel: tuple[str, ...], active: tuple[str, ...]
) -> None:
    runs = [run("r1", "Running", 0)]
    t = tick(spec(concurrencyPolicy=policy), T0, T0, runs, T0 + timedelta(minutes=5))
    assert (t.start is not None) == start
    assert t.cancel == cancel
    assert t.active == active
    if policy == "Forbid":
        assert t.skipped is not None
        assert "r1 is still active" in t.skipped


def test_history_limits_delete_the_oldest_finished_runs() -> None:
    runs = [
        run("ok1", "Succeeded", 0),
        run("ok2", "Succeeded", 5),
        run("ok3", "Succeeded", 10),
        run("bad1", "Failed", 1),
        run("bad2", "Cancelled", 6),
        run("live", "Running", 11),
    ]
    t = tick(
        spec(successfulRunsHistoryLimit=2, failedRunsHistoryLimit=0),
        T0,
        T0,
        runs,
        T0 + timedelta(minutes=12),
    )
    assert set(t.delete) == {"ok1", "bad1", "bad2"}


def test_suspended_schedule_starts_nothing_and_missed_times_count_on_resume() -> None:
    t = tick(spec(suspend=True), T0, T0, [], T0 + timedelta(minutes=20))
    assert t.start is None
    assert t.skipped == "Suspended"
    assert t.next_time is None
    resumed = tick(spec(), T0, T0, [], T0 + timedelta(minutes=20))
    assert resumed.start == T0 + timedelta(minutes=20)
    assert resumed.missed == 3


def test_time_zone_and_daylight_saving() -> None:
    paris = spec(schedule="30 2 * * *", timeZone="Europe/Paris")
    # 2:30 does not exist in Paris on 2026-03-29 (clocks jump 2:00 -> 3:00).
    before = datetime(2026, 3, 28, 12, 0, tzinfo=UTC)
    assert next_time(paris, before) == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert next_time(spec(schedule="0 9 * * *", timeZone="America/New_York"), T0) == datetime(
        2026, 1, 1, 14, 0, tzinfo=UTC
    )


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"schedule": "61 * * * *"}, "schedule"),
        ({"schedule": "* * * *"}, "schedule"),
        ({"schedule": "* * * * * * *"}, "schedule"),
        ({"timeZone": "Mars/Base"}, "timeZone"),
        ({"concurrencyPolicy": "Sometimes"}, "concurrencyPolicy"),
        ({"startingDeadlineSeconds": -1}, "startingDeadlineSeconds"),
        ({"successfulRunsHistoryLimit": -1}, "successfulRunsHistoryLimit"),
        ({"runTemplate": {"workflowSpec": {}}}, "runTemplate.workflowRef"),
    ],
)
def test_bad_schedule_fields_are_named(payload: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        WorkflowSchedule.model_validate(
            {
                "spec": {
                    "schedule": "* * * * *",
                    "runTemplate": {"workflowRef": {"name": "wf"}},
                    **payload,
                }
            }
        )
    assert f"spec.{field}" in str(err.value)
