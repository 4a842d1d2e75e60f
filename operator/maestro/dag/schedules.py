"""What a WorkflowSchedule should do now: pure, so every rule is tested without a cluster.

The rules are Kubernetes CronJob's (controller v2), with WorkflowRuns for Jobs:

- Of all times due since the last scheduled one (or the schedule's creation), only the
  **most recent** is started; earlier ones are counted as missed. More than
  ``TOO_MANY_MISSED`` is reported, and the most recent still starts.
- With ``startingDeadlineSeconds``, a time older than that when it is noticed is
  skipped (reason ``MissedDeadline``), e.g. after an operator outage.
- ``Forbid`` with a run still active: the time is not started and not recorded, so it
  starts when the active run ends, if still within the deadline (CronJob does the same).
- ``Replace``: the active runs are cancelled (``spec.cancel``; their finally tasks run)
  and the new one starts.
- ``suspend``: nothing starts; times due meanwhile count as missed on resume.
- History: finished runs beyond ``successfulRunsHistoryLimit`` (Succeeded) and
  ``failedRunsHistoryLimit`` (Failed, Cancelled) are deleted, oldest first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from maestro.api.models import WorkflowScheduleSpec
from maestro.api.phases import RunPhase

TOO_MANY_MISSED = 100
_FAILED = {RunPhase.FAILED.value, RunPhase.CANCELLED.value}
_ENDED = _FAILED | {RunPhase.SUCCEEDED.value}


@dataclass(frozen=True)
class ScheduledRun:
    """A WorkflowRun this schedule created, as read from the cluster."""

    name: str
    phase: str | None
    created: datetime
    finished: datetime | None = None

    @property
    def active(self) -> bool:
        """Not ended yet (a run the operator has not picked up counts as active)."""
        return self.phase not in _ENDED


@dataclass(frozen=True)
class Tick:
    """What to do now."""

    start: datetime | None  # the scheduled time to create a run for
    cancel: tuple[str, ...]  # active runs to cancel first (Replace)
    delete: tuple[str, ...]  # finished runs beyond the history limits
    next_time: datetime | None
    active: tuple[str, ...]  # active after this tick (without the one started)
    missed: int  # due times not started (before the one started or skipped)
    skipped: str | None  # why a due time was not started, for the status


def uses_seconds(schedule: str) -> bool:
    """A six-field schedule (seconds last): the e2e test hook, refused by default."""
    return not schedule.startswith("@") and len(schedule.split()) == 6


def _zone(spec: WorkflowScheduleSpec) -> ZoneInfo:
    return ZoneInfo(spec.time_zone or "UTC")


def next_time(spec: WorkflowScheduleSpec, after: datetime) -> datetime:
    """The first scheduled time strictly after ``after`` (UTC)."""
    it = croniter(spec.schedule, after.astimezone(_zone(spec)))
    return it.get_next(datetime).astimezone(UTC)


def most_recent_due(
    spec: WorkflowScheduleSpec, since: datetime, now: datetime
) -> tuple[datetime | None, int]:
    """The latest scheduled time in (since, now] and how many there are (capped above
    ``TOO_MANY_MISSED``, so a long outage costs a bounded walk)."""
    it = croniter(spec.schedule, since.astimezone(_zone(spec)))
    latest: datetime | None = None
    count = 0
    while count <= TOO_MANY_MISSED:
        t = it.get_next(datetime).astimezone(UTC)
        if t > now:
            return latest, count
        latest, count = t, count + 1
    # Too many to walk: jump to the last one before now.
    back = croniter(spec.schedule, (now + timedelta(seconds=1)).astimezone(_zone(spec)))
    return back.get_prev(datetime).astimezone(UTC), count


def _history(runs: list[ScheduledRun], limit: int) -> list[str]:
    ended = sorted(runs, key=lambda r: (r.finished or r.created, r.name), reverse=True)
    return [r.name for r in ended[limit:]]


def tick(
    spec: WorkflowScheduleSpec,
    last_scheduled: datetime | None,
    created: datetime,
    runs: list[ScheduledRun],
    now: datetime,
) -> Tick:
    """Decide one step for a schedule whose runs are ``runs``."""
    active = [r.name for r in runs if r.active]
    delete = _history(
        [r for r in runs if r.phase == RunPhase.SUCCEEDED.value],
        spec.successful_runs_history_limit,
    ) + _history([r for r in runs if r.phase in _FAILED], spec.failed_runs_history_limit)
    upcoming = next_time(spec, now)
    if spec.suspend:
        return Tick(None, (), tuple(delete), None, tuple(active), 0, "Suspended")
    due, count = most_recent_due(spec, last_scheduled or created, now)
    if due is None:
        return Tick(None, (), tuple(delete), upcoming, tuple(active), 0, None)
    missed = count - 1
    deadline = spec.starting_deadline_seconds
    if deadline is not None and (now - due).total_seconds() > deadline:
        return Tick(
            None,
            (),
            tuple(delete),
            upcoming,
            tuple(active),
            count,
            f"MissedDeadline: {due.isoformat()} was due over startingDeadlineSeconds="
            f"{deadline} ago",
        )
    if active and spec.concurrency_policy == "Forbid":
        return Tick(
            None,
            (),
            tuple(delete),
            upcoming,
            tuple(active),
            missed,
            f"Forbidden: {due.isoformat()} waits, run {active[0]} is still active",
        )
    cancel = tuple(active) if spec.concurrency_policy == "Replace" else ()
    still = () if cancel else tuple(active)
    return Tick(due, cancel, tuple(delete), upcoming, still, missed, None)


def run_name(schedule: str, scheduled: datetime) -> str:
    """Deterministic: a restarted operator finds the run it already created."""
    return f"{schedule}-{int(scheduled.timestamp())}"
